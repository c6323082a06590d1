"""Prompt-based fine-tuning (LM-BFF, Gao et al. 2021; PET, Schick & Schütze 2021): classification as a cloze.

Each record is put into a template (`"{text} overall, it is {mask}."`) and the masked LM's own head scores
the verbalizer's label words at the mask; the loss is cross-entropy over those words' logits alone, so
a pretrained masked LM starts from what it already knows instead of from a fresh classifier. The network is
a `PromptClassifier` (`tunelab.models.prompt_classifier`); the collator that builds the prompts is
`tunelab.data.prompts.PromptCollator`. Metrics, steps and tuning methods are fine-tuning's; the export is a
`prompt-classifier` folder that carries its templates and verbalizer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from lightning import LightningDataModule
from omegaconf import DictConfig
from torch import nn

from tunelab.cloze import check_template
from tunelab.data.prompts import PromptCollator
from tunelab.errors import TunelabError
from tunelab.models.prompt_classifier import PromptClassifier
from tunelab.models.tuning import Tuning
from tunelab.tasks.finetune import FinetuneTask

MASKED_LM_KINDS = ("masked-lm", "prompt-classifier")


class PromptTask(FinetuneTask):
    """Cross-entropy over the label words' logits at the template's mask, with fine-tuning's metrics."""

    def __init__(
        self,
        model: Callable[..., nn.Module],
        datamodule: LightningDataModule,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        tuning: Tuning | None = None,
        templates: Sequence[str] = ("{text} It was {mask}.",),
        verbalizer: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        problem = getattr(datamodule, "problem", None)
        if problem is not None and problem.name != "classification":
            raise TunelabError(f"task=prompt classifies through label words, one class per record (expected "
                               f"problem=classification, got problem={problem.name}; use task=finetune)")
        collator = getattr(datamodule, "masking", None)
        if not isinstance(collator, PromptCollator):
            raise TunelabError("task=prompt needs labelled text batched by tunelab.data.prompts.PromptCollator "
                               "(expected data.collator as conf/task/prompt.yaml sets it)")
        lm = model(head="masked_lm", tokenizer=datamodule.tokenizer)
        network = PromptClassifier(lm, datamodule.tokenizer, list(templates), verbalizer or {}, datamodule.labels,
                                   collator.max_length)
        super().__init__(lambda **_: network, datamodule, optimizer, scheduler, tuning)

    def export_adapter(self, base: str | None) -> None:
        """The merged masked LM is the export (a LoRA adapter alone is written for classifiers only)."""
        return None


# ----------------------------------------------------------------------------- checks before any work
def check_config(cfg: DictConfig) -> str | None:
    """task=prompt: templates with both slots, and a backbone that has a masked-LM head to score words with."""
    task = cfg.get("task")
    if not isinstance(task, DictConfig) or not str(task.get("_target_", "")).endswith("prompt.PromptTask"):
        return None
    templates = task.get("templates")
    if not templates:
        return "task.templates is empty (expected at least one template, e.g. '{text} It was {mask}.')"
    for i, template in enumerate(templates):
        try:
            check_template(template, f"task.templates[{i}]")
        except TunelabError as e:
            return str(e)
    return masked_lm_problem(cfg.get("model"))


def masked_lm_problem(model: Any) -> str | None:
    """Why `model.pretrained` cannot be scored with its masked-LM head, or None."""
    source = model.get("pretrained") if isinstance(model, DictConfig) else None
    if not source:
        return ("task=prompt scores label words with a pretrained masked-LM head, and model.pretrained is not set "
                "(expected model.pretrained=<a task=mlm run or model folder, or a Hugging Face masked-LM folder>)")
    from tunelab import artifacts

    try:
        folder = artifacts.model_dir(str(source), "model.pretrained")
    except TunelabError:
        return None  # a hub name, or a folder whose loading says what is wrong with it
    card, config = artifacts.read_card(folder), artifacts.read_config(folder, "model.pretrained")
    kind = card.get("kind")
    archs = config.get("architectures") or []
    if kind in MASKED_LM_KINDS or (kind is None and any(a.endswith("ForMaskedLM") for a in archs)):
        return None
    what = kind or (archs[0] if archs else config.get("architecture", "a model without architectures"))
    return (f"model.pretrained={source} is a {what}, which has no masked-LM head for task=prompt to score label "
            "words with (expected the model/ of a task=mlm run or a Hugging Face *ForMaskedLM folder)")
