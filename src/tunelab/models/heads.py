"""Heads that sit on a backbone's features: the domain discriminator and an optional bottleneck.

The discriminator follows DANN (Ganin et al., 2016) and Transfer-Learning-Library: an MLP of
1024-1024 hidden units with ReLU and either dropout (the paper) or batch norm (the library),
ending in one logit, "target or not".

The bottleneck is affine (Linear + BatchNorm), so in eval mode it folds exactly into a linear
classifier behind it: the exported model is then the backbone's own classifier, of its usual
shape, computing the same logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def mlp(in_features: int, hidden: Sequence[int], out_features: int, batch_norm: bool = False,
        dropout: float = 0.0) -> nn.Sequential:
    """Linear -> [BatchNorm] -> ReLU -> [Dropout] for each hidden size, then a linear output."""
    layers: list[nn.Module] = []
    width = in_features
    for size in hidden:
        layers.append(nn.Linear(width, size))
        if batch_norm:
            layers.append(nn.BatchNorm1d(size))
        layers.append(nn.ReLU(inplace=True))
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = size
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


class DomainDiscriminator(nn.Module):
    """Features -> one logit per sample (positive: target domain)."""

    def __init__(self, in_features: int, hidden: Sequence[int] = (1024, 1024), batch_norm: bool = False,
                 dropout: float = 0.5) -> None:
        super().__init__()
        self.net = mlp(in_features, list(hidden), 1, batch_norm=batch_norm, dropout=dropout)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).squeeze(-1)


class Bottleneck(nn.Module):
    """A lower-dimensional feature space (Linear + BatchNorm) shared by classifier and discriminator."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.norm = nn.BatchNorm1d(out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.linear(x))

    @torch.no_grad()
    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, b) with `self.eval()(x) == x @ W.T + b`: batch norm's running statistics folded in."""
        scale = self.norm.weight / torch.sqrt(self.norm.running_var + self.norm.eps)
        weight = self.linear.weight * scale[:, None]
        bias = (self.linear.bias - self.norm.running_mean) * scale + self.norm.bias
        return weight, bias

    @torch.no_grad()
    def fold_into(self, head: nn.Linear, into: nn.Linear) -> None:
        """Write `head(self(x))` (eval mode) into the linear layer `into`, which takes the raw features."""
        weight, bias = self.affine()
        into.weight.copy_(head.weight @ weight)
        into.bias.copy_(head.weight @ bias + head.bias)
