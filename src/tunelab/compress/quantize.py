"""int8 for CPU inference: onnxruntime dynamic (default), PyTorch dynamic, onnxruntime static QDQ (CNNs).

- onnxruntime's dynamic quantization of the exported graph: int8 weights, activations quantized per
  batch at run time; the fastest CPU path for transformer encoders here.
- PyTorch's built-in dynamic quantization (`torch.ao.quantization.quantize_dynamic`, deprecated but still
  there) of every `nn.Linear`, for the PyTorch backend (`tunelab.models.int8`, which loading rebuilds with).
- onnxruntime static quantization (QDQ, calibrated on training batches) for CNNs, whose convolutions
  dynamic quantization leaves in fp32.

A dynamo export carries `value_info` shape annotations that onnxruntime's quantizer can trip over, so they
are cleared first.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tunelab.models.int8 import quantize_linear


def _cleared(src: Path, dst: Path) -> Path:
    import onnx

    model = onnx.load(str(src))
    del model.graph.value_info[:]
    onnx.save(model, str(dst))
    return dst


def onnx_dynamic(src: Path, dst: Path) -> Path:
    """Dynamic int8 of the graph's MatMul/Gemm weights (onnxruntime.quantization.quantize_dynamic)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp, _quiet():
        quantize_dynamic(_cleared(src, Path(tmp) / "clean.onnx"), dst, weight_type=QuantType.QInt8)
    return dst


class _Reader:
    """onnxruntime's CalibrationDataReader over numpy feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.feeds, None)


def onnx_static(src: Path, dst: Path, batches: Iterable[dict[str, torch.Tensor]], names: list[str]) -> Path:
    """Static int8, QDQ format, per-channel weights, activation ranges calibrated (min/max) on `batches`."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    feeds = [{n: b[n].cpu().numpy() for n in names} for b in batches]
    reader = type("Reader", (_Reader, CalibrationDataReader), {})(feeds)
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(_cleared(src, Path(tmp) / "clean.onnx")), str(prepared), skip_symbolic_shape=True)
        quantize_static(prepared, dst, reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return dst


def torch_dynamic(model: nn.Module) -> nn.Module:
    """A copy of `model` (a TextModel) with every nn.Linear dynamically quantized to int8."""
    quantized = copy.deepcopy(model).eval()
    quantized.net = quantize_linear(quantized.net)
    return quantized


class _quiet:
    """onnxruntime.quantization logs advice at WARNING on every call."""

    def __enter__(self) -> None:
        self.level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)

    def __exit__(self, *_: object) -> None:
        logging.getLogger().setLevel(self.level)


def torchao_note() -> str:
    """Why torchao's int8 is not the default backend (measured by `make bench` where it is installed)."""
    try:
        version = metadata.version("torchao")
    except metadata.PackageNotFoundError:
        return ("torchao: not installed, so not measured in this run. It is not the default: its CPU int8 is "
                "fast only under torch.compile (a compile per new input shape), while onnxruntime's dynamic "
                "int8 needs no compiler and ships as a file any onnxruntime loads.")
    return (f"torchao {version}: int8 dynamic activation + int8 weight is measured by `make bench`; not the "
            "default because it is fast on CPU only under torch.compile.")
