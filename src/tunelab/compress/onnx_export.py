"""ONNX export of a classifier with dynamic batch (and sequence) axes, checked against PyTorch on real inputs.

The dynamo exporter (`torch.onnx.export(..., dynamo=True)`, the default in torch 2.9+) traces the network's
own forward; the graph takes the batch keys as inputs and returns `logits`. Every export is run in
onnxruntime on batches of other shapes than the one it was traced with and compared with PyTorch.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from tunelab.contracts import ATTENTION_MASK, INPUT_IDS, PIXEL_VALUES
from tunelab.errors import TunelabError


class TextLogits(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.net(input_ids=input_ids, attention_mask=attention_mask).logits


class ImageLogits(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values)


def graph_module(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """The network as a module of plain tensors (a copy in eval mode, on the CPU, in float32)."""
    net = copy.deepcopy(model).net.to("cpu", torch.float32).eval()  # the wrapper too: the head's hook holds it
    if model.modality == "image":
        return ImageLogits(net), [PIXEL_VALUES]
    if hasattr(net, "set_attn_implementation"):
        net.set_attn_implementation("sdpa")  # the stock attention: what the exporter knows
    return TextLogits(net), [INPUT_IDS, ATTENTION_MASK]


def export(model: nn.Module, path: Path, example: dict[str, torch.Tensor], opset: int | None = None) -> Path:
    """Write `model` (a TextModel or ImageModel) to `path` as ONNX; `example` is one real batch."""
    module, names = graph_module(model)
    args = tuple(example[name].cpu() for name in names)
    batch = torch.export.Dim("batch", min=1)
    if model.modality == "image":
        shapes = {PIXEL_VALUES: {0: batch}}
    else:
        sequence = torch.export.Dim("sequence", min=2, max=int(model.net.config.max_position_embeddings))
        shapes = {name: {0: batch, 1: sequence} for name in names}
    path.parent.mkdir(parents=True, exist_ok=True)
    quiet = logging.getLogger("onnx_ir")  # logs every initializer it deduplicates at INFO
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module, args, str(path), input_names=names, output_names=["logits"],
                              dynamic_shapes=shapes, dynamo=True, optimize=True, verbose=False,
                              external_data=False, **({"opset_version": opset} if opset else {}))
        except Exception as e:  # the exporter's errors name the operator it could not translate
            raise TunelabError(f"export=onnx: {type(model.net).__name__} could not be exported "
                               f"({str(e).splitlines()[0][:300]})") from None
        finally:
            quiet.setLevel(level)
    return path


def max_difference(model: nn.Module, onnx_net: object, batches: Iterable[dict[str, torch.Tensor]]) -> float:
    """Largest |logit difference| between PyTorch and onnxruntime over `batches` (fp32, eval mode)."""
    model.eval()
    worst = 0.0
    with torch.inference_mode():
        for batch in batches:
            worst = max(worst, float((model(batch).logits - onnx_net(batch).logits).abs().max()))
    return worst
