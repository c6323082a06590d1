"""The collator of prompt-based fine-tuning (LM-BFF, Gao et al. 2021; PET, Schick & Schütze 2021).

`PromptCollator` turns tokenized records into prompt rows under each cloze template (the format:
`tunelab.cloze`): `input_ids`, `attention_mask`, `labels`, and `mlm_labels` (-100 except at the mask), so the
masked-LM head runs on the mask position alone. With several templates, row `t * batch + i` is record `i`
under template `t`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tunelab.cloze import Prompts
from tunelab.contracts import INPUT_IDS, LABELS


class PromptCollator(Prompts):
    """Tokenized records -> prompt rows under each template, with their labels."""

    def __init__(self, tokenizer: Any, templates: Sequence[str], max_length: int = 128, seed: int | None = None) -> None:
        del seed  # nothing is random here; evaluation loaders pass one to every collator
        super().__init__(tokenizer, templates, max_length)

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.rows([list(e[INPUT_IDS]) for e in examples])
        if LABELS in examples[0]:
            batch[LABELS] = torch.tensor([int(e[LABELS]) for e in examples])
        return batch
