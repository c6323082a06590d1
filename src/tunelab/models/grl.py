"""Gradient reversal (Ganin & Lempitsky, 2015): identity forward, `-lambda * grad` backward.

The domain discriminator behind it learns to tell the domains apart, while the features in front
of it receive the reversed gradient and learn to make the domains indistinguishable: one loss,
one backward pass, a minimax game.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class _ReverseGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, lambd: float) -> torch.Tensor:
        ctx.lambd = lambd
        return x.view_as(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.neg() * ctx.lambd, None


def reverse_gradient(x: torch.Tensor, lambd: float = 1.0) -> torch.Tensor:
    """`x` unchanged; in backward, the incoming gradient times `-lambd`."""
    return _ReverseGrad.apply(x, float(lambd))


class GradientReversal(nn.Module):
    """Module form of `reverse_gradient`; the task sets `lambd` every step from the schedule."""

    def __init__(self, lambd: float = 1.0) -> None:
        super().__init__()
        self.lambd = float(lambd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reverse_gradient(x, self.lambd)

    def extra_repr(self) -> str:
        return f"lambd={self.lambd}"


def dann_lambda(progress: float, gamma: float = 10.0, max_value: float = 1.0) -> float:
    """The paper's schedule `2 / (1 + exp(-gamma * p)) - 1`, 0 at the start and ~1 at the end.

    Starting at zero keeps the untrained discriminator's noisy gradient away from the features
    while the label classifier is still learning them.
    """
    p = min(max(float(progress), 0.0), 1.0)
    return max_value * (2.0 / (1.0 + math.exp(-gamma * p)) - 1.0)
