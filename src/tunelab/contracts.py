"""The contracts `data/`, `models/` and `tasks/` share: batch keys, the ignored label, what a backbone returns.

Batches are dicts with fixed keys. Text: `input_ids`, `attention_mask`, optional `labels` (class ids, -100
for an unlabelled record) or `mlm_labels` (-100 where nothing is predicted) with, for static shapes,
`mlm_positions` (batch × k indices of the predicted positions). Images: `pixel_values`, optional `labels`.
A domain-paired batch is `{"source": batch, "target": batch}`; a batch of the teacher cache carries each
record's `index`. This module depends on torch alone, so any layer of the package can import it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100  # a label position or record to leave out of the loss (cross_entropy's default)

# batch keys
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
LABELS = "labels"
MLM_LABELS = "mlm_labels"
MLM_POSITIONS = "mlm_positions"
WORD_STARTS = "word_starts"  # stored per example for whole-word masking; not part of a batch
PIXEL_VALUES = "pixel_values"
INDEX = "index"
SOURCE, TARGET = "source", "target"

Layer = int | str  # a hidden-state index (0: embeddings, i: after layer i) or "features" (what the head sees)


@dataclass
class Output:
    """What every backbone returns: class logits and the features the head saw (a masked LM asked not to
    project: no logits, and the features its vocabulary projection would see)."""

    logits: torch.Tensor | None
    features: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


def at_predicted(x: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The rows of `x` (batch × length × ...) at the predicted positions, flattened in one order for labels,
    hidden states and logits: where `mlm_labels` is not -100, or at `mlm_positions` (batch × k indices whose
    extra entries carry label -100: static shapes for torch.compile)."""
    positions = batch.get(MLM_POSITIONS)
    if positions is None:
        return x[batch[MLM_LABELS] != IGNORE_INDEX]
    index = positions.view(*positions.shape, *[1] * (x.dim() - 2)).expand(-1, -1, *x.shape[2:])
    return x.gather(1, index).flatten(0, 1)


def masked_targets(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The token ids to predict, one per row of the sparse MLM logits (-100 on `mlm_positions` padding)."""
    return at_predicted(batch[MLM_LABELS], batch)
