"""Export: weight conversion (weights.py, quant.py), the ONNX graphs (onnx_graph.py, graphs.py) and the
bundle writer (bundle.py)."""
