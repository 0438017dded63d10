"""Calibrated weight quantization (GPTQ, AWQ) into standard GPTQ checkpoints, and fp32 simulation of our quantizer."""
