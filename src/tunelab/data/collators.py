"""Masked-language-model collator: pads a list of examples and picks the tokens the model must predict.

Masks are drawn when a batch is built, so every epoch sees new masks for the same block (dynamic
masking, as in RoBERTa). Evaluation loaders pass a `seed`: a batch's masks then depend only on its
content, so validation loss and the example panel are comparable from epoch to epoch.

Whole-word masking picks words, not pieces: word boundaries come from the WordPiece `##` prefix
when the tokenizer is a WordPiece one, otherwise from the tokenizer's word ids, which the
DataModule stores as `word_starts` when `needs_word_ids` is true.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import PreTrainedTokenizerBase

from tunelab.contracts import ATTENTION_MASK, IGNORE_INDEX, INPUT_IDS, MLM_LABELS, MLM_POSITIONS, WORD_STARTS
from tunelab.errors import TunelabError


def wordpiece_prefix(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The continuing-subword prefix (`##`) of a WordPiece tokenizer, else None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = getattr(backend, "model", None)
    if type(model).__name__ == "WordPiece":
        return model.continuing_subword_prefix
    return None


class MaskingCollator:
    """Pad, then choose `mask_prob` of the maskable tokens; of those, `replace_prob` become the mask
    token, `random_prob` a random token, and the rest stay as they are (BERT's 80/10/10).

    Output: `input_ids`, `attention_mask`, `mlm_labels` (-100 where nothing is predicted) and, with
    `fixed_count`, `mlm_positions` (batch × k indices, the same k for every batch of a given length) so
    the prediction head sees static shapes (torch.compile).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        mask_prob: float = 0.15,
        replace_prob: float = 0.8,
        random_prob: float = 0.1,
        whole_word: bool = False,
        fixed_count: bool = False,
        seed: int | None = None,
    ) -> None:
        check_probabilities(mask_prob, replace_prob, random_prob)
        if tokenizer.mask_token_id is None:
            raise TunelabError(
                f"the tokenizer {type(tokenizer).__name__} has no mask token (expected a masked-LM tokenizer "
                "such as BERT's; set data.tokenizer or model.pretrained to one)"
            )
        self.tokenizer = tokenizer
        self.mask_prob, self.replace_prob, self.random_prob = mask_prob, replace_prob, random_prob
        self.whole_word, self.fixed_count, self.seed = whole_word, fixed_count, seed
        self.mask_id = int(tokenizer.mask_token_id)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.mask_token_id)
        vocab = len(tokenizer)
        self.special = torch.zeros(vocab, dtype=torch.bool)
        self.special[[i for i in tokenizer.all_special_ids if i < vocab]] = True
        self.random_pool = (~self.special).nonzero().squeeze(1)
        self.prefix = wordpiece_prefix(tokenizer)
        self.continuation = self._continuation_table(vocab) if whole_word and self.prefix else None

    @property
    def needs_word_ids(self) -> bool:
        """Whole-word masking with a tokenizer that marks no continuation pieces needs stored word ids."""
        return self.whole_word and self.continuation is None

    def _continuation_table(self, vocab: int) -> torch.Tensor:
        table = torch.zeros(vocab, dtype=torch.bool)
        for token, i in self.tokenizer.get_vocab().items():
            if i < vocab and token.startswith(self.prefix):
                table[i] = True
        return table

    # ----------------------------------------------------------------- batch building
    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask, word_starts = self.pad(examples)
        generator = self._generator(input_ids)
        maskable = attention_mask.bool() & ~self.special[input_ids]
        starts = self._word_starts(input_ids, maskable, word_starts) if self.whole_word else None
        chosen = (self._choose_fixed if self.fixed_count else self._choose_dynamic)(maskable, starts, generator)
        labels = torch.where(chosen, input_ids, IGNORE_INDEX)
        batch = {INPUT_IDS: self._corrupt(input_ids, chosen, generator), ATTENTION_MASK: attention_mask,
                 MLM_LABELS: labels}
        if self.fixed_count:
            k = math.ceil(self.mask_prob * input_ids.shape[1])
            batch[MLM_POSITIONS] = torch.argsort(chosen.to(torch.int8), dim=1, descending=True, stable=True)[:, :k]
        return batch

    def pad(self, examples: Sequence[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Right-pad `input_ids` (and `word_starts` when stored) to the longest example."""
        rows = [torch.as_tensor(e[INPUT_IDS], dtype=torch.long) for e in examples]
        ids = pad_sequence(rows, batch_first=True, padding_value=self.pad_id)
        lengths = torch.tensor([len(r) for r in rows])
        mask = (torch.arange(ids.shape[1]) < lengths[:, None]).long()
        starts = None
        if WORD_STARTS in examples[0]:
            flags = [torch.as_tensor(e[WORD_STARTS], dtype=torch.bool) for e in examples]
            starts = pad_sequence(flags, batch_first=True, padding_value=True)
        elif self.needs_word_ids:
            raise TunelabError(
                "whole-word masking with a tokenizer without `##` pieces needs word ids, and the batch has no "
                "word_starts (build the data with TextDataModule, which stores them for this collator)"
            )
        return ids, mask, starts

    def _generator(self, input_ids: torch.Tensor) -> torch.Generator | None:
        """Training: the global RNG (seeded per worker by Lightning). Evaluation: a content-seeded RNG."""
        if self.seed is None:
            return None
        digest = zlib.crc32(input_ids.numpy().tobytes())
        return torch.Generator().manual_seed(self.seed * 1_000_003 + digest)

    def _word_starts(self, ids: torch.Tensor, maskable: torch.Tensor, stored: torch.Tensor | None) -> torch.Tensor:
        """True where a new word begins; every token that is not maskable is a word of its own."""
        starts = stored if stored is not None else ~self.continuation[ids]
        special = ~maskable
        after_special = torch.zeros_like(special)
        after_special[:, 1:] = special[:, :-1]
        starts = starts | special | after_special
        starts[:, 0] = True
        return starts

    def _choose_dynamic(self, maskable: torch.Tensor, starts: torch.Tensor | None,
                        generator: torch.Generator | None) -> torch.Tensor:
        draws = torch.rand(maskable.shape, generator=generator)
        if starts is not None:  # one draw per word, shared by all its pieces
            draws = draws.gather(1, starts.long().cumsum(1) - 1)
        return maskable & (draws < self.mask_prob)

    def _choose_fixed(self, maskable: torch.Tensor, starts: torch.Tensor | None,
                      generator: torch.Generator | None) -> torch.Tensor:
        """Exactly round(mask_prob × maskable) tokens per row (whole words: as many words as fit)."""
        count = maskable.sum(1)
        budget = torch.where(count > 0, (self.mask_prob * count).round().clamp(min=1), 0)
        if starts is None:
            starts = torch.ones_like(maskable)
        word = starts.long().cumsum(1) - 1
        size = torch.zeros(maskable.shape, dtype=torch.long).scatter_add_(1, word, maskable.long())
        score = torch.rand(maskable.shape, generator=generator).masked_fill(size == 0, -1.0)
        order = score.argsort(dim=1, descending=True)
        fits = size.gather(1, order).cumsum(1) <= budget[:, None]
        keep = torch.zeros_like(maskable).scatter_(1, order, fits & (size.gather(1, order) > 0))
        return maskable & keep.gather(1, word)

    def _corrupt(self, ids: torch.Tensor, chosen: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        draws = torch.rand(ids.shape, generator=generator)
        to_mask = chosen & (draws < self.replace_prob)
        to_random = chosen & (draws >= self.replace_prob) & (draws < self.replace_prob + self.random_prob)
        out = ids.masked_fill(to_mask, self.mask_id)
        picks = torch.randint(len(self.random_pool), (int(to_random.sum()),), generator=generator)
        out[to_random] = self.random_pool[picks]
        return out


def check_probabilities(mask_prob: float, replace_prob: float, random_prob: float) -> None:
    """Fail before training on probabilities that cannot be right."""
    if not 0.0 < mask_prob < 1.0:
        raise TunelabError(f"data.collator.mask_prob={mask_prob} (expected a probability strictly between 0 and 1)")
    for name, value in (("replace_prob", replace_prob), ("random_prob", random_prob)):
        if not 0.0 <= value <= 1.0:
            raise TunelabError(f"data.collator.{name}={value} (expected a probability between 0 and 1)")
    if replace_prob + random_prob > 1.0 + 1e-9:
        raise TunelabError(
            f"data.collator.replace_prob + random_prob = {replace_prob + random_prob} (expected at most 1; "
            "the rest of the chosen tokens are kept unchanged)"
        )
