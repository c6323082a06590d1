"""int8 linear layers: PyTorch dynamic quantization of a network's `nn.Linear` layers.

Compression quantizes with it (`tunelab.compress.quantize.torch_dynamic`), and loading an `int8-classifier`
folder (`tunelab.artifacts.quantized`) rebuilds the same layers before reading their weights; it lives in
models so that artifacts need not import compress.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn


def quantize_linear(net: nn.Module) -> nn.Module:
    """In place: a copy would drag along the TextModel that the head's hook holds."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantize_dynamic is deprecated, and says so on every call
        return torch.ao.quantization.quantize_dynamic(net, {nn.Linear}, dtype=torch.qint8, inplace=True)
