"""The vocabulary projection and cross-entropy of a masked-LM head as one autograd function.

The stock path writes the rows × vocabulary logits, a log-softmax of them, a zero-filled gradient,
and a log-softmax gradient: four passes over the largest tensor of the step. Here each chunk of rows
goes projection → log-softmax → loss, prediction and softmax while it is still in cache, and the
softmax minus the one-hot targets is kept as the logits' gradient, so backward is just the two
matrix products. Same loss, gradients and predictions as `F.linear` + `F.cross_entropy` (mean over
targets that are not -100), tested; under CPU/CUDA autocast the products run in its dtype as
`F.linear` would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunelab.contracts import IGNORE_INDEX

CHUNK_ROWS = 128  # 128 × 30522 fp32 logits: 16 MB, within a server CPU's last-level cache


class LinearCrossEntropy(torch.autograd.Function):
    """(loss, predictions) of `hidden @ weightᵀ + bias` against `targets`; predictions carry no gradient."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                dtype: torch.dtype, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = hidden.to(dtype), weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        probs = h.new_empty((len(h), len(w)))
        losses = torch.empty(len(h), dtype=torch.float32, device=h.device)
        predictions = torch.empty(len(h), dtype=torch.long, device=h.device)
        with torch.autocast(h.device.type, enabled=False):
            for start in range(0, len(h), chunk):
                rows = slice(start, start + chunk)
                logits = F.linear(h[rows], w, b)
                predictions[rows] = logits.argmax(-1)
                log_probs = logits.float().log_softmax(-1)
                target = targets[rows].clamp(min=0)[:, None]
                losses[rows] = -log_probs.gather(1, target).squeeze(1)
                grad = torch.exp(log_probs, out=probs[rows])
                grad.scatter_add_(1, target, grad.new_full(target.shape, -1.0))  # softmax - one-hot
        valid = targets != IGNORE_INDEX  # ignored rows weigh 0: here, and on the small tensors in backward
        weights = valid / valid.sum().clamp(min=1)
        ctx.save_for_backward(h, w, probs, weights)
        ctx.dtypes = hidden.dtype, weight.dtype, None if bias is None else bias.dtype
        ctx.mark_non_differentiable(predictions)
        return (losses * weights).sum(), predictions

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _: torch.Tensor) -> tuple:
        h, w, probs, weights = ctx.saved_tensors
        weights = weights * grad_loss
        hidden_dtype, weight_dtype, bias_dtype = ctx.dtypes
        grad_hidden = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_hidden = ((probs @ w).to(weights.dtype) * weights[:, None]).to(hidden_dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = (probs.t() @ (h * weights[:, None].to(h.dtype))).to(weight_dtype)
        if bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = torch.mv(probs.t(), weights.to(probs.dtype)).to(bias_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, chunk: int = CHUNK_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of `F.linear(hidden, weight, bias)` over the targets that are not -100, and each row's
    top-scoring class, without keeping the logits."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    return LinearCrossEntropy.apply(hidden, weight, bias, targets, dtype, chunk)
