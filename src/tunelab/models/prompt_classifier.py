"""A masked LM that classifies through cloze templates and a verbalizer (prompt-based fine-tuning).

The class score is the masked-LM logit of the label's words at the template's mask position (averaged over a
label's words), computed from the head's features against those words' output-embedding rows only, never the
whole vocabulary. With several templates their log-probabilities are averaged (an ensemble). A batch that
is not a prompt yet (plain tokenized text, as any tool makes it) is put into the templates first, so the
exported classifier predicts from the same batches as every other text classifier. The template format is
`tunelab.cloze`, shared with the training collator.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from tunelab.cloze import Prompts
from tunelab.cloze import word_ids as label_words
from tunelab.contracts import ATTENTION_MASK, INPUT_IDS, MLM_LABELS, Output


class PromptClassifier(nn.Module):
    """`lm` (a masked-LM TextModel) + templates + label words -> class log-probabilities."""

    modality = "text"
    head = "masked_lm"
    artifact_kind = "prompt-classifier"  # tunelab.artifacts.kinds.PROMPT_CLASSIFIER (artifacts builds models, not back)

    def __init__(self, lm: nn.Module, tokenizer: Any, templates: Sequence[str], verbalizer: Mapping[str, Any],
                 labels: Sequence[str], max_length: int) -> None:
        """Fails (naming the word) on a label word that is not one token of `tokenizer`."""
        super().__init__()
        self.prompts = Prompts(tokenizer, list(templates), max_length)
        word_ids, word_label = label_words(tokenizer, verbalizer, labels, templates)
        self.labels = list(labels)
        self.verbalizer = {str(k): [str(w) for w in (v if isinstance(v, Sequence) and not isinstance(v, str) else [v])]
                           for k, v in dict(verbalizer).items()}
        num_labels = len(self.labels)
        self.lm = lm
        self.lm.sparse_mlm = True  # the head runs on the mask positions only
        self.register_buffer("word_ids", torch.tensor(list(word_ids)), persistent=False)
        average = torch.zeros(num_labels, len(word_ids))
        average[torch.tensor(list(word_label)), torch.arange(len(word_ids))] = 1.0
        self.register_buffer("average", average / average.sum(1, keepdim=True), persistent=False)

    @property
    def net(self) -> nn.Module:
        return self.lm.net

    def card_fields(self) -> dict[str, Any]:
        """What the exported folder's card carries, so that `artifacts.load` rebuilds this classifier."""
        return {"prompt": {"templates": [t.source for t in self.prompts.templates], "verbalizer": self.verbalizer,
                           "max_length": self.prompts.max_length}}

    @property
    def mlm_head(self) -> nn.Module:
        return self.lm.mlm_head

    def prompt(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A plain tokenized batch put into the templates (a prompt batch, with `mlm_labels`, as it is)."""
        if MLM_LABELS in batch:
            return batch
        ids, mask = batch[INPUT_IDS], batch.get(ATTENTION_MASK)
        records = [row[m.bool()].tolist() if mask is not None else row.tolist()
                   for row, m in zip(ids, mask if mask is not None else ids, strict=True)]
        return {k: v.to(ids.device) for k, v in self.prompts.rows(records).items()}

    def word_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The label words' logits at each row's mask (rows × words): the head's features against those words'
        rows of the vocabulary projection, where the head splits; else the head's logits at those words."""
        out = self.lm(batch, project=False)
        if out.logits is not None:
            return out.logits[:, self.word_ids]
        projection = self.lm.vocab_projection
        weight = projection.weight[self.word_ids]
        bias = projection.bias[self.word_ids] if projection.bias is not None else None
        return nn.functional.linear(out.features, weight, bias)

    def forward(self, batch: dict[str, torch.Tensor], **_: bool) -> Output:
        batch = self.prompt(batch)
        scores = (self.word_logits(batch).float() @ self.average.T).log_softmax(-1)
        templates = len(self.prompts.templates)
        return Output(scores.view(templates, -1, scores.shape[-1]).mean(0), scores)
