"""How much of a backbone trains: full, head only, the top k blocks, biases (BitFit), LoRA; layer-wise LR decay.

Every task that trains a backbone takes a `Tuning` (the `tuning=` config group) and calls `apply(model)` once
its model exists, then asks `lr_groups(model)` for the optimizer's parameter groups, so the methods behave
the same in fine-tuning, distillation's student, DANN and the prompt task.

Parameters are placed by depth, after ELECTRA's layer-wise decay: 0 the embeddings (timm: the stem), 1..n the
blocks, n+1 what sits above them (pooler, final norm), n+2 the head. The head is the model's own classifier
(for a masked LM: its head's transform and output bias, never the output embeddings it shares with the
input). With `layer_decay=d` a parameter at depth i trains at `lr * d ** (n + 2 - i)`. LoRA goes through
`peft` (`tunelab.models.lora`); which parameters are the head, `tunelab.models.head_params` says.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from tunelab.errors import TunelabError
from tunelab.models.head_params import head_modules, head_names

METHODS = ("full", "head", "top_k", "bitfit", "lora")
# a block's index in a parameter name: BERT-family `encoder.layer.3.`, DistilBERT `transformer.layer.3.`,
# others `layers.3.` / `h.3.` / `blocks.3.`
BLOCK = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)\.")
EMBEDDINGS = re.compile(r"(?:^|\.)(?:embeddings|embed_tokens|wte|wpe|word_embeddings)(?:\.|$)")


@dataclass
class Tuning:
    """One tuning method and its settings (conf/tuning/*.yaml)."""

    method: str = "full"
    k: int | None = None  # top_k: how many of the last blocks train (with everything above them and the head)
    layer_decay: float | None = None  # full: each block's rate is the one above it times this; null: one rate
    backbone_lr_mult: float = 1.0  # full: one multiplier for every backbone rate (the head keeps lr)
    rank: int = 8  # lora
    alpha: float = 16.0
    dropout: float = 0.1
    target_modules: list[str] | str | None = None  # null: the architecture's defaults (tunelab.models.lora)
    lr: Any = None  # the optimizer's default rates for this method (read by conf/optimizer, not here)

    def __post_init__(self) -> None:
        check(self)
        if self.target_modules is not None and not isinstance(self.target_modules, str):
            self.target_modules = [str(t) for t in self.target_modules]

    # ----------------------------------------------------------------- which parameters train
    def apply(self, model: nn.Module) -> None:
        """Set `requires_grad` on `model` (a TextModel or ImageModel) for this method; LoRA adds its adapters."""
        if self.method == "lora":
            from tunelab.models.lora import inject

            inject(model, self)
        keep = self.trains(model)
        for name, p in model.named_parameters():
            p.requires_grad_(keep(name))

    def trains(self, model: nn.Module) -> Callable[[str], bool]:
        """Predicate on parameter names: true for those this method trains."""
        depth, n = depths(model)
        head = head_names(model)
        if self.method == "full":
            return lambda name: True
        if self.method == "head":
            return lambda name: name in head
        if self.method == "top_k":
            if self.k > n:
                raise TunelabError(f"tuning.k={self.k} exceeds the model's {n} blocks (expected 1..{n})")
            return lambda name: name in head or depth(name) > n - self.k
        if self.method == "bitfit":
            return lambda name: name in head or name.endswith("bias")
        return lambda name: name in head or "lora_" in name  # lora

    def train_modes(self, model: nn.Module) -> None:
        """A frozen backbone keeps its batch-norm statistics and runs without dropout (head-only training)."""
        if self.method == "head":
            model.eval()
            for module in head_modules(model):
                module.train()

    # ----------------------------------------------------------------- learning rates
    def lr_groups(self, model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module, float, Callable]]:
        """(group name, module, lr multiplier, keep(param name)) for `Task.configure_optimizers`: one group per
        depth with layer-wise decay, else backbone and head (the backbone at `backbone_lr_mult`)."""
        head = head_names(model)
        if self.layer_decay is not None and self.method in ("full", "top_k"):
            depth, n = depths(model)
            top = n + 2

            def at(i: int) -> Callable[[str], bool]:
                return lambda name: (top if name in head else depth(name)) == i

            return [(f"{prefix}depth_{i}", model, self.layer_decay ** (top - i), at(i)) for i in range(top + 1)]
        return [(f"{prefix}backbone", model, self.backbone_lr_mult, lambda name: name not in head),
                (f"{prefix}head", model, 1.0, lambda name: name in head)]


def check(t: Tuning) -> None:
    """Settings that cannot be right, before any model is built."""
    if t.method not in METHODS:
        raise TunelabError(f"tuning.method={t.method!r} (expected one of {', '.join(METHODS)})")
    if t.method == "top_k" and not (isinstance(t.k, int) and t.k >= 1):
        raise TunelabError(f"tuning.k={t.k!r} (expected the number of last blocks to train, an integer >= 1)")
    if t.layer_decay is not None and not 0 < t.layer_decay <= 1:
        raise TunelabError(f"tuning.layer_decay={t.layer_decay} (expected a number in (0, 1], or null)")
    if t.layer_decay is not None and t.method not in ("full", "top_k"):
        raise TunelabError(f"tuning.layer_decay={t.layer_decay} applies to tuning=full or top_k, not "
                           f"tuning={t.method} (expected tuning.layer_decay=null)")


# ----------------------------------------------------------------------------- where parameters sit
def depths(model: nn.Module) -> tuple[Callable[[str], int], int]:
    """A parameter name's depth (0 embeddings, 1..n blocks, n+1 above them, n+2 the head) and n."""
    if getattr(model, "modality", "") == "image":
        return _timm_depths(model)
    n = int(model.net.config.num_hidden_layers)
    head = head_names(model)

    def depth(name: str) -> int:
        if name in head:
            return n + 2
        if found := BLOCK.search(name):
            return int(found.group(1)) + 1
        return 0 if EMBEDDINGS.search(name) else n + 1

    return depth, n


def _timm_depths(model: nn.Module) -> tuple[Callable[[str], int], int]:
    """timm's own grouping (`group_matcher`): stem 0, blocks 1..n, and the last group (head, final norm) above."""
    from timm.models import group_parameters

    groups = group_parameters(model.net, model.net.group_matcher(coarse=False))
    last = max(groups)
    by_name = {f"net.{name}": i for i, names in groups.items() for name in names}
    head = head_names(model)

    def depth(name: str) -> int:
        return last + 1 if name in head else by_name.get(name, last)

    return depth, last - 1


def trainable_summary(module: nn.Module) -> dict[str, float]:
    """Trainable and total parameter counts (each shared tensor once) and the trainable share in percent."""
    seen: dict[int, tuple[int, bool]] = {}
    for p in module.parameters():
        seen[id(p)] = (p.numel(), p.requires_grad)
    total = sum(n for n, _ in seen.values())
    trainable = sum(n for n, grad in seen.values() if grad)
    return {"params/trainable": float(trainable), "params/total": float(total),
            "params/trainable_pct": 100.0 * trainable / max(total, 1)}
