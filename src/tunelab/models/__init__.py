"""Backbones from transformers and timm, heads and adapters."""
