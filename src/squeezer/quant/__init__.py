"""Quantization: pure primitives, quantized layers, and the `quantize` transform."""
