"""LoRA through `peft`: adapters injected in place, merged back for export, or re-wrapped as a `PeftModel`.

Adapters are injected into the model's own network (`peft.inject_adapter_in_model`), so the task, the masked-LM
fast path and the features hook see the same modules as without LoRA. For export, `merged` folds each adapter
into its base layer (a plain transformers/timm model), and `peft_model` rebuilds the same network as a
`PeftModel` over the untouched base weights, which writes the adapter in peft's own format.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Protocol

from torch import nn

from tunelab.errors import TunelabError
from tunelab.models.head_params import head_modules


class LoraSettings(Protocol):
    """What `inject` reads of a `tunelab.models.tuning.Tuning` (typed here, so lora does not import tuning,
    which calls lora)."""

    rank: int
    alpha: float
    dropout: float
    target_modules: list[str] | str | None

# BERT-family attention projections LoRA adapts by default (Hu et al. 2021: queries and values)
TEXT_TARGETS = {
    "bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"], "camembert": ["query", "value"], "ernie": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"], "deberta": ["in_proj"], "deberta-v2": ["query_proj", "value_proj"],
    "albert": ["query", "value"], "mpnet": ["q", "v"],
}
# timm: attention projections where the model has them (ViT, DeiT, BEiT, Swin...), else the blocks' convolutions
TIMM_PATTERNS = (r".*\.qkv", r".*\.attn\.(q|v)", r"(layer\d+|stages\.\d+|blocks\.\d+).*\.conv\d*")
ADAPTED = (nn.Linear, nn.Conv2d, nn.Embedding)


def default_targets(model: nn.Module) -> list[str] | str:
    """The modules LoRA adapts when `tuning.target_modules` is null."""
    if getattr(model, "modality", "") == "image":
        names = _candidates(model.net)
        for pattern in TIMM_PATTERNS:
            if any(re.fullmatch(pattern, n) for n in names):
                return pattern
        raise TunelabError(f"{type(model.net).__name__}: no default LoRA targets (expected attention 'qkv' or block "
                           "convolutions); set tuning.target_modules to some of its modules")
    model_type = model.net.config.model_type
    if model_type not in TEXT_TARGETS:
        raise TunelabError(f"no default LoRA targets for model_type={model_type!r} (known: {sorted(TEXT_TARGETS)}); "
                           f"set tuning.target_modules, e.g. to some of {sorted(_leaf_names(model.net))}")
    return TEXT_TARGETS[model_type]


def _candidates(net: nn.Module) -> list[str]:
    """Module names LoRA could adapt: linear, convolution (ungrouped) and embedding layers."""
    return [n for n, m in net.named_modules()
            if isinstance(m, ADAPTED) and getattr(m, "groups", 1) == 1]


def _leaf_names(net: nn.Module) -> set[str]:
    return {n.rsplit(".", 1)[-1] for n in _candidates(net)}


def matches(net: nn.Module, targets: list[str] | str) -> list[str]:
    """The module names peft would adapt: a string is a full-match regex, a list matches names or their ends."""
    names = _candidates(net)
    if isinstance(targets, str):
        return [n for n in names if re.fullmatch(targets, n)]
    return [n for n in names if any(n == t or n.endswith(f".{t}") for t in targets)]


def inject(model: nn.Module, tuning: LoraSettings) -> None:
    """Add LoRA adapters to `model.net`; `model.lora_targets` records what they adapt, for the export."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = tuning.target_modules or default_targets(model)
    found = matches(model.net, targets)
    if not found:
        raise TunelabError(
            f"tuning.target_modules={targets!r} matches no module of {type(model.net).__name__} (expected names "
            f"among its linear/conv layers: {', '.join(sorted(_leaf_names(model.net)))})"
        )
    config = LoraConfig(r=tuning.rank, lora_alpha=tuning.alpha, lora_dropout=tuning.dropout, target_modules=found)
    inject_adapter_in_model(config, model.net)
    model.lora_config = config


def _unwrap(net: nn.Module, merge: bool) -> nn.Module:
    """Replace every peft layer of `net` by its base layer, with the adapter folded in when `merge`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(net.named_modules()):
        if isinstance(module, BaseTunerLayer):
            if merge:
                module.merge()
            parent, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent) if parent else net, child, module.get_base_layer())
    net.__dict__.pop("peft_config", None)
    return net


def merged(model: nn.Module) -> nn.Module:
    """A copy of `model` with every adapter merged into its layer: a plain transformers/timm network."""
    out = copy.deepcopy(model)
    _unwrap(out.net, merge=True)
    del out.lora_config
    return out


def saved_module_names(model: nn.Module) -> list[str]:
    """peft's `modules_to_save`: the head, and a pooler the base checkpoint may lack (a masked LM's has none, so
    `from_pretrained` would draw it anew); masked LMs keep their own head."""
    if getattr(model, "head", "classifier") != "classifier":
        return []
    keep = [*head_modules(model), getattr(getattr(model.net, "base_model", None), "pooler", None)]
    return [n for n, m in model.net.named_modules() if any(m is k for k in keep if k is not None)]


def peft_model(model: nn.Module, base: str | None) -> Any:
    """The trained network as a `PeftModel` over its base weights (adapters and classifier), for
    `save_pretrained` in peft's format; `base` is what `PeftModel.from_pretrained` will be given."""
    from peft import LoraConfig, get_peft_model

    plain = _unwrap(copy.deepcopy(model).net, merge=False)  # the whole model: its hooks refer to it
    lora = model.lora_config
    config = LoraConfig(r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                        target_modules=sorted(lora.target_modules), modules_to_save=saved_module_names(model) or None,
                        base_model_name_or_path=base)
    wrapped = get_peft_model(plain, config)
    adapters = {f"base_model.model.{k}": v for k, v in model.net.state_dict().items() if "lora_" in k}
    missing = set(adapters) - set(wrapped.state_dict())
    if missing:
        raise TunelabError(f"LoRA export: adapter weights without a place in the PeftModel: {sorted(missing)[:3]}")
    wrapped.load_state_dict(adapters, strict=False)
    return wrapped
