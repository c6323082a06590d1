"""The cloze template format that prompt-based fine-tuning's batches and its exported classifier share.

A template is text with one `{text}` slot and one `{mask}` slot (`[MASK]` or `<mask>` also mark it), e.g.
`"{text} overall, it is {mask}."`. It is applied to token ids, not strings: the record's own tokens (as the
DataModule tokenized them) go into the text slot, truncated so the whole row fits `max_length`, and the
template's pieces are tokenized once. So a classifier that carries its templates can rebuild the prompt from
any plainly tokenized batch. A verbalizer maps each label to one or more words that must each be one token.

The training collator (`tunelab.data.prompts.PromptCollator`) and the classifier
(`tunelab.models.prompt_classifier.PromptClassifier`) both build rows with `Prompts`; data and models may not
import each other, so the format sits below both, beside `tunelab.contracts`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

from tunelab.contracts import ATTENTION_MASK, IGNORE_INDEX, INPUT_IDS, MLM_LABELS
from tunelab.errors import TunelabError

TEXT, MASK = "{text}", "{mask}"
MASK_SPELLINGS = ("[MASK]", "<mask>")
SLOT = re.compile(r"(\{text\}|\{mask\})")


def normalise(template: str) -> str:
    for spelling in MASK_SPELLINGS:
        template = template.replace(spelling, MASK)
    return template


def check_template(template: Any, key: str = "task.templates") -> str:
    """One `{text}` and one `{mask}` slot, or an error naming the template and what it lacks."""
    if not isinstance(template, str):
        raise TunelabError(f"{key}: {template!r} is not a string (expected e.g. '{TEXT} It was {MASK}.')")
    text = normalise(template)
    for slot, what in ((TEXT, "the record's text"), (MASK, "the word to predict")):
        if text.count(slot) != 1:
            raise TunelabError(f"{key}: {template!r} has {text.count(slot)} {slot} slots (expected exactly one, for "
                               f"{what}, e.g. '{TEXT} It was {MASK}.')")
    return text


@dataclass
class Template:
    """A template compiled for one tokenizer: its parts as token ids, the text slot and the mask slot."""

    source: str
    parts: list[list[int] | str]  # token ids, or TEXT / MASK
    cls: list[int]
    sep: list[int]
    mask_id: int

    @classmethod
    def compile(cls, template: str, tokenizer: Any) -> Template:
        text = check_template(template)
        parts: list[list[int] | str] = []
        for piece in SLOT.split(text):
            if piece in (TEXT, MASK):
                parts.append(piece)
            elif piece:
                parts.append(list(tokenizer(piece, add_special_tokens=False)["input_ids"]))
        cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
        if cls_id is None:
            cls_id = tokenizer.bos_token_id
        if sep_id is None:
            sep_id = tokenizer.eos_token_id
        return cls(template, parts, [cls_id] if cls_id is not None else [], [sep_id] if sep_id is not None else [],
                   int(tokenizer.mask_token_id))

    @property
    def fixed_length(self) -> int:
        return len(self.cls) + len(self.sep) + sum(1 if p == MASK else len(p) for p in self.parts if p != TEXT)

    def apply(self, text_ids: Sequence[int], max_length: int) -> tuple[list[int], int]:
        """The prompt row for a record's tokens (without special tokens), and its mask position."""
        room = max_length - self.fixed_length
        if room < 1:
            raise TunelabError(f"task.templates: {self.source!r} needs {self.fixed_length} tokens, which leaves no "
                               f"room for the text in data.max_length={max_length} (expected a longer max_length)")
        row, where = list(self.cls), -1
        for part in self.parts:
            if part == TEXT:
                row += list(text_ids[:room])
            elif part == MASK:
                where = len(row)
                row.append(self.mask_id)
            else:
                row += part
        return row + self.sep, where


def word_ids(tokenizer: Any, verbalizer: Mapping[str, Sequence[str]], labels: Sequence[str],
             templates: Sequence[str]) -> tuple[list[int], list[int]]:
    """Token ids of the label words and the label index of each, in `labels` order; every label needs words and
    every word must be one token of this tokenizer's vocabulary (a word spelled after a space where the
    templates put a space before the mask, as byte-level BPE vocabularies store it)."""
    verbalizer = {str(k): list(v) if isinstance(v, Sequence) and not isinstance(v, str) else [v]
                  for k, v in dict(verbalizer or {}).items()}
    missing = [label for label in labels if not verbalizer.get(label)]
    extra = sorted(set(verbalizer) - set(labels))
    if missing or extra:
        raise TunelabError(f"task.verbalizer: labels {missing or extra} {'have no words' if missing else 'are not in the data'} "
                           f"(expected a word list for each label of {list(labels)})")
    spaced = any(re.search(r"\s\{mask\}", normalise(t)) for t in templates)
    ids, owner = [], []
    for index, label in enumerate(labels):
        for word in verbalizer[label]:
            pieces = tokenizer(f" {word}" if spaced else str(word), add_special_tokens=False)["input_ids"]
            if len(pieces) != 1 or pieces[0] == tokenizer.unk_token_id:
                shown = tokenizer.convert_ids_to_tokens(pieces)
                what = (f"is {len(pieces)} tokens {shown}" if len(pieces) != 1 else
                        f"is not in the vocabulary (it becomes {shown[0]})")
                raise TunelabError(f"task.verbalizer.{label}: {word!r} {what} for this tokenizer (expected one token "
                                   "of its vocabulary, since the mask predicts one token; pick another word)")
            ids.append(int(pieces[0]))
            owner.append(index)
    return ids, owner


def text_tokens(ids: Sequence[int], special: set[int]) -> list[int]:
    """A tokenized record's own tokens: its special tokens ([CLS], [SEP], padding) left out."""
    return [i for i in ids if i not in special]


class Prompts:
    """Templates compiled for one tokenizer, and the prompt rows they make of tokenized records."""

    def __init__(self, tokenizer: Any, templates: Sequence[str], max_length: int = 128) -> None:
        if tokenizer.mask_token_id is None:
            raise TunelabError(f"the tokenizer {type(tokenizer).__name__} has no mask token (expected a masked-LM "
                               "tokenizer, e.g. the one saved with model.pretrained)")
        if not templates:
            raise TunelabError("task.templates is empty (expected at least one template, e.g. '{text} It was {mask}.')")
        self.templates = [Template.compile(t, tokenizer) for t in templates]
        self.max_length = max_length
        self.special = set(tokenizer.all_special_ids)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)

    def rows(self, records: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """Prompt rows for records given as token ids (special tokens are dropped first): `input_ids`,
        `attention_mask`, and `mlm_labels` (-100 except at the mask); row `t * len(records) + i` is record `i`
        under template `t`."""
        built = [t.apply(text_tokens(ids, self.special), self.max_length) for t in self.templates for ids in records]
        ids = pad_sequence([torch.tensor(r) for r, _ in built], batch_first=True, padding_value=self.pad_id)
        lengths = torch.tensor([len(r) for r, _ in built])
        mask = (torch.arange(ids.shape[1]) < lengths[:, None]).long()
        targets = torch.full_like(ids, IGNORE_INDEX)
        where = torch.tensor([w for _, w in built])
        targets[torch.arange(len(built)), where] = ids[torch.arange(len(built)), where]
        return {INPUT_IDS: ids, ATTENTION_MASK: mask, MLM_LABELS: targets}
