"""Pruning, quantization, export and prediction."""
