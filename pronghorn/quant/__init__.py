"""Quantized base weights (bitsandbytes 4-bit NF4 and 8-bit)."""
