"""Checkpoint inputs: HF directories (checkpoint.py), GGUF (gguf_import.py), GPTQ (gptq.py) and
synthetic random weights (synthetic.py)."""
