"""Unstructured pruning: the smallest-magnitude weights of every linear and convolution layer set to zero.

Global magnitude pruning (`torch.nn.utils.prune.global_unstructured` with L1 magnitude) over all linear
and conv weights at once, then made permanent (`prune.remove`: plain tensors with zeros, no masks). The
shapes stay, so dense CPU kernels run just as long (the report measures it); what shrinks is a
compressed copy of the weights file. `LinearPruning` does the same during fine-tuning, as Lightning's
`ModelPruning` callback restricted to those layers (`callbacks=pruning`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from lightning.pytorch.callbacks import ModelPruning
from torch import nn
from torch.nn.utils import prune as torch_prune

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


def prunable(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, "weight") for every linear and conv layer: embeddings and norms keep their weights."""
    return [(m, "weight") for m in model.modules() if isinstance(m, PRUNABLE)]


def prune_global(model: nn.Module, amount: float) -> nn.Module:
    """A copy of `model` with a fraction `amount` of its linear/conv weights (the smallest, globally) zeroed."""
    pruned = copy.deepcopy(model)
    params = prunable(pruned)
    if amount > 0:
        torch_prune.global_unstructured(params, pruning_method=torch_prune.L1Unstructured, amount=float(amount))
        for module, name in params:
            torch_prune.remove(module, name)
    return pruned


def sparsity(model: nn.Module) -> float:
    """Fraction of zeros among the linear/conv weights (quantized linears count their int8 weights)."""
    zeros = total = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if callable(weight) and not isinstance(weight, torch.Tensor):  # dynamically quantized Linear
            weight = weight().int_repr() - weight().q_zero_point()
        if isinstance(module, PRUNABLE) or (weight is not None and "quantized" in type(module).__module__):
            zeros += int((weight == 0).sum())
            total += weight.numel()
    return zeros / total if total else 0.0


class LinearPruning(ModelPruning):
    """`ModelPruning` on the linear and conv weights only, with the surviving weights kept (no lottery-ticket
    reset) and the masks made permanent at the end, so the exported model is plain and sparse."""

    def __init__(self, amount: float = 0.5, pruning_fn: str = "l1_unstructured", use_global_unstructured: bool = True,
                 **kwargs: object) -> None:
        kwargs.setdefault("use_lottery_ticket_hypothesis", False)
        kwargs.setdefault("make_pruning_permanent", True)
        kwargs.setdefault("parameter_names", ["weight"])
        super().__init__(pruning_fn, amount=amount, use_global_unstructured=use_global_unstructured, **kwargs)

    def filter_parameters_to_prune(self, parameters_to_prune: Sequence[tuple[nn.Module, str]]
                                   ) -> Sequence[tuple[nn.Module, str]]:
        return [(m, name) for m, name in parameters_to_prune if isinstance(m, PRUNABLE)]
