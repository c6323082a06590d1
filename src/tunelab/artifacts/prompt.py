"""Prompt-based classifiers (kind `prompt-classifier`): a masked LM plus the templates and verbalizer it
classifies with.

The folder is the masked LM's `save_pretrained` folder with its tokenizer (it loads in plain transformers as a
`fill-mask` model); the card's `prompt` holds the templates, the verbalizer (label -> words) and the
`max_length` prompts are cut to. `load` rebuilds the `PromptClassifier`, which takes plainly tokenized
batches like any text classifier and returns class scores. `artifacts.save` writes the folder (the
network names its kind and card fields).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.artifacts.kinds import PROMPT_CLASSIFIER
from tunelab.errors import TunelabError


def load(folder: Path, card: dict, config: dict, role: str) -> Any:
    from tunelab.artifacts import Artifact
    from tunelab.folders import own_tokenizer
    from tunelab.models.prompt_classifier import PromptClassifier
    from tunelab.models.text import TextModel

    prompt, labels = card.get("prompt") or {}, card.get("labels")
    if not prompt.get("templates") or not prompt.get("verbalizer") or not labels:
        raise TunelabError(f"{role}: {folder / 'tunelab.json'} has no prompt templates, verbalizer or labels "
                           "(expected the card a task=prompt run writes)")
    tokenizer = own_tokenizer(str(folder))
    if tokenizer is None:
        raise TunelabError(f"{role}: {folder} has no tokenizer (expected the one saved with the masked LM)")
    try:
        lm = TextModel("masked_lm", tokenizer=tokenizer, pretrained=str(folder))
    except TunelabError as e:
        raise TunelabError(f"{role}: {e}") from None
    max_length = int(prompt.get("max_length") or (card.get("preprocessing") or {}).get("text", {}).get("max_length")
                     or 128)
    net = PromptClassifier(lm, tokenizer, prompt["templates"], prompt["verbalizer"], labels, max_length)
    return Artifact(str(folder), PROMPT_CLASSIFIER, net.eval(), labels, tokenizer, card.get("preprocessing") or {},
                    card)
