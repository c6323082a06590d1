"""Which of a model's modules and parameters are its head.

Both the tuning methods (`tunelab.models.tuning`: what trains, at which rate) and LoRA's export
(`tunelab.models.lora`: what peft saves whole) ask this, so it lives below both.
"""

from __future__ import annotations

from torch import nn


def head_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of the head: a text classifier's modules outside its encoder (BERT's classifier,
    DistilBERT's pre_classifier and classifier), timm's classifier, or a masked LM's head (see `head_names`)."""
    if getattr(model, "head", "classifier") == "masked_lm":
        return [model.mlm_head]
    if getattr(model, "modality", "") == "text":
        net = model.net
        return [m for m in net.children() if m is not net.base_model and any(True for _ in m.parameters())]
    return [model.classifier]


def head_names(model: nn.Module) -> set[str]:
    """Names (as `model.named_parameters` gives them) of the head's parameters; a masked LM's output embeddings
    are its input embeddings too, so they stay with the backbone."""
    shared = set()
    if getattr(model, "modality", "") == "text":
        shared = {id(p) for p in model.net.get_input_embeddings().parameters()}
    ids = {id(p) for m in head_modules(model) for p in m.parameters()} - shared
    return {name for name, p in model.named_parameters() if id(p) in ids}
