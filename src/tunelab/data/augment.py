"""Token-level noise for text: random token dropout, replacement and adjacent swaps.

The text counterpart of image augmentation: it wraps a padding collator and perturbs each
example's token ids before padding, so it works for any tokenizer and any text task. Special
tokens ([CLS], [SEP], ...) are never touched. Randomness comes from torch, so Lightning's
`seed_everything(workers=True)` makes it reproducible in every DataLoader worker.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from tunelab.errors import TunelabError


class TokenNoise:
    """A collator wrapper: `drop`, `replace` and `swap` are per-token probabilities."""

    def __init__(self, collator: Callable[[list[dict]], Any], tokenizer: PreTrainedTokenizerBase,
                 drop: float = 0.0, replace: float = 0.0, swap: float = 0.0) -> None:
        for name, p in (("drop", drop), ("replace", replace), ("swap", swap)):
            if not 0.0 <= p < 1.0:
                raise TunelabError(f"token noise {name}={p} (expected a probability in [0, 1))")
        self.collator = collator
        self.drop, self.replace, self.swap = drop, replace, swap
        self.special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
        vocab = torch.arange(len(tokenizer))
        self.vocab = vocab[~torch.isin(vocab, self.special)]

    def __call__(self, features: list[dict]) -> Any:
        return self.collator([self.perturb(f) for f in features])

    def perturb(self, feature: dict) -> dict:
        ids = torch.as_tensor(feature["input_ids"], dtype=torch.long)
        special = torch.isin(ids, self.special)
        if self.swap:
            ids = self._swap(ids, special)
        if self.replace:
            hit = (torch.rand(len(ids)) < self.replace) & ~special
            ids = torch.where(hit, self.vocab[torch.randint(len(self.vocab), (len(ids),))], ids)
        if self.drop:
            keep = (torch.rand(len(ids)) >= self.drop) | special
            if (keep & ~special).any() or not (~special).any():  # never drop every word
                ids = ids[keep]
        out = {k: v for k, v in feature.items() if k not in ("input_ids", "attention_mask", "token_type_ids")}
        out["input_ids"] = ids.tolist()
        out["attention_mask"] = [1] * len(ids)
        if "token_type_ids" in feature:
            out["token_type_ids"] = [0] * len(ids)
        return out

    def _swap(self, ids: torch.Tensor, special: torch.Tensor) -> torch.Tensor:
        """Swap token i with i+1 (both ordinary tokens) with probability `swap`, without overlaps."""
        ids = ids.clone()
        can = ~special[:-1] & ~special[1:]
        picks = ((torch.rand(len(ids) - 1) < self.swap) & can).nonzero().flatten().tolist() if len(ids) > 1 else []
        last = -2
        for i in picks:
            if i > last + 1:
                ids[i], ids[i + 1] = ids[i + 1].clone(), ids[i].clone()
                last = i
        return ids

    def __repr__(self) -> str:
        return f"TokenNoise(drop={self.drop}, replace={self.replace}, swap={self.swap})"
