"""Dropout with a mask that is cheap to draw on CPU, for hidden states and attention weights.

On CPU, PyTorch draws one Bernoulli sample per element for dropout, and scaled-dot-product attention
leaves its fused kernel for the unfused math whenever attention dropout is on: at BERT-mini scale the
two took about a tenth of a masked-LM training step. Here the keep mask is cut from 64-bit random
words, four 16-bit lanes per word (the drop probability rounded to a multiple of 1/65536), and applied
with one `where`; attention with dropout runs the same math as PyTorch's fallback with that mask.
The distribution, the 1/(1-p) scaling and the generator (so `seed_everything` reproduces a run) are
those of `nn.Dropout`. On other devices, and under torch.compile (which fuses dropout itself), the
stock ops run. Importing this module changes nothing: `use_cpu_dropout` registers the attention with
transformers (`register`) when it first switches a model to it; `runtime.cpu_dropout=false` keeps text
models on the stock modules.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

LANES = 4  # 16-bit lanes per 64-bit random word
LEVELS = 1 << 16
ATTENTION = "sdpa_cpu_dropout"  # transformers' `sdpa`, with this dropout on CPU


def _fast(x: torch.Tensor, p: float) -> bool:
    return x.device.type == "cpu" and 0.0 < p < 1.0 and not torch.compiler.is_compiling()


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """Boolean mask, True with probability 1 - p (p rounded to 1/65536), from the default generator."""
    n = math.prod(shape)
    words = torch.randint(-(2**63), 2**63 - 1, (-(-n // LANES),), dtype=torch.int64, device=device)
    return (words.view(torch.int16)[:n] >= round(p * LEVELS) - LEVELS // 2).view(shape)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """`F.dropout(x, p, training)`, with `keep_mask` on CPU."""
    if not (training and _fast(x, p)):
        return F.dropout(x, p, training)
    return torch.where(keep_mask(x.shape, p, x.device), x, 0.0).mul_(1.0 / (1.0 - p))


class Dropout(nn.Dropout):
    """`nn.Dropout` (same `p`, no state) drawing its mask with `keep_mask` on CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 mask: torch.Tensor | None = None, p: float = 0.0,
                                 scale: float | None = None) -> torch.Tensor:
    """`F.scaled_dot_product_attention` (non-causal; boolean mask True = attend, or additive); with dropout
    on CPU, softmax(q kᵀ · scale + mask) @ v with `dropout` on the weights."""
    if not _fast(query, p):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=p, scale=scale)
    scores = query @ key.transpose(-1, -2) * (scale if scale is not None else query.shape[-1] ** -0.5)
    if mask is not None:
        scores = (scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool
                  else scores + mask)
    return dropout(scores.softmax(-1), p) @ value


def sdpa_cpu_dropout(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' `sdpa` attention, except for plain attention with dropout on CPU (not causal, no position
    bias or soft-capping, query, key and value with the same heads), which takes `scaled_dot_product_attention`
    above."""
    special = kwargs.get("is_causal") or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None
    if (not _fast(query, dropout) or special or getattr(module, "is_causal", False)
            or key.shape[1] != query.shape[1]):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    out = scaled_dot_product_attention(query, key, value, attention_mask, dropout, scaling)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make `ATTENTION` an attention implementation transformers knows (`sdpa_cpu_dropout`, with `sdpa`'s
    masks). Idempotent; needed in every process that runs a model set to it."""
    AttentionInterface.register(ATTENTION, sdpa_cpu_dropout)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def use_cpu_dropout(net: PreTrainedModel) -> None:
    """Swap every `nn.Dropout` of `net` for `Dropout`, and its `sdpa` attention for `sdpa_cpu_dropout`.
    Nothing saved changes: dropout holds no weights, and the attention choice is not written to config.json."""
    register()
    for parent in list(net.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.Dropout:
                setattr(parent, name, Dropout(child.p))
    if net.config._attn_implementation == "sdpa" and net._can_set_attn_implementation():
        net.set_attn_implementation(ATTENTION)
