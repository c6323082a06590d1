"""Structured channel pruning of timm CNNs with torch-pruning.

torch-pruning traces the network's dependency graph so that a removed output channel of a convolution also
leaves the batch norm after it, the next convolution's inputs and every residual branch that adds to it; the
channels of each group are ranked by the L2 norm of their weights (`GroupMagnitudeImportance`). The
classifier keeps its outputs. The result is a smaller dense model, saved as a `pruned-classifier`
(`tunelab.artifacts.pruned` resizes a freshly built timm model to the saved tensors before loading them).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from tunelab.errors import TunelabError


def prune_channels(model: nn.Module, example: torch.Tensor, amount: float) -> nn.Module:
    """A copy of `model` (an ImageModel) with a fraction `amount` of the channels of every prunable group
    removed."""
    import torch_pruning as tp

    pruned = copy.deepcopy(model).eval()
    net = pruned.net
    try:
        pruner = tp.pruner.MetaPruner(net, example[:1].cpu(), importance=tp.importance.GroupMagnitudeImportance(p=2),
                                      pruning_ratio=float(amount), ignored_layers=[net.get_classifier()])
        pruner.step()
    except Exception as e:  # torch-pruning names the operation it could not follow
        raise TunelabError(f"prune=channels: torch-pruning could not prune {type(net).__name__} "
                           f"({str(e).splitlines()[0][:300]}; use prune=unstructured)") from None
    return pruned
