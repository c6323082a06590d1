"""The distillation teacher: a trained model, loaded frozen and kept out of the student's module tree.

Sources, in `teacher.path`: nothing (the newest `task=finetune` run, or `task=mlm` for a masked-LM
teacher), a run folder (its `model/`), a Hugging Face classification (or masked-LM) folder or hub name,
a timm folder written by `ImageModel.export`, or a timm model name with `teacher.weights=<file>`.
The network is held by a plain object rather than registered as a submodule, so it never reaches the
optimizer, the checkpoint, `model/`, DDP, or the `train()` switch Lightning flips on the task (which
would turn the teacher's dropout back on).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from tunelab import artifacts
from tunelab.contracts import Output
from tunelab.errors import TunelabError
from tunelab.models.text import TextModel
from tunelab.models.vision import ImageModel

MAKE_ONE = "python train.py task=finetune"
MADE_BY = {"classifier": ("finetune", MAKE_ONE), "masked_lm": ("mlm", "python train.py task=mlm")}


class Teacher:
    """A frozen classifier or masked LM (`TextModel`, `ImageModel`) that answers under `torch.inference_mode`."""

    def __init__(self, net: TextModel | ImageModel, source: str, labels: list[str] | None,
                 tokenizer: Any | None = None, problem: Any = None, pretrained: bool = False) -> None:
        self.net = net.eval().requires_grad_(False)
        self.source = source
        self.labels = labels  # None: the checkpoint names no classes (LABEL_0, LABEL_1, ...)
        self.tokenizer = tokenizer
        self.problem = problem  # what its outputs mean (`tunelab.problems`); None for a masked LM
        # whether it grew from a pretrained checkpoint (or came from elsewhere), not from scratch here: such a
        # teacher's own architecture with fewer layers is the student practitioners start from
        self.pretrained = pretrained
        self.head = getattr(net, "head", "classifier")
        if net.modality == "image":
            self.num_classes = int(net.net.num_classes)
        else:  # a masked-LM teacher's classes are its vocabulary
            self.num_classes = int(net.net.config.num_labels if self.head == "classifier" else net.net.config.vocab_size)

    @property
    def modality(self) -> str:
        return self.net.modality

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def to(self, device: torch.device | str) -> Teacher:
        self.net.to(device)
        return self

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.net.parameters())

    def num_layers(self) -> int:
        """Hidden states 0..num_layers exist for text teachers; image teachers expose only `features`."""
        return int(self.net.net.config.num_hidden_layers) if self.modality == "text" else 0

    def width(self) -> int:
        return self.net.feature_size

    def __call__(self, batch: dict[str, torch.Tensor], output_hidden_states: bool = False,
                 output_attentions: bool = False) -> Output:
        with torch.inference_mode():
            out = self.net(batch, output_hidden_states=output_hidden_states, output_attentions=output_attentions)
        # inference tensors cannot be saved for the student's backward pass; plain copies can
        return Output(
            out.logits.clone(),
            out.features.clone(),
            tuple(h.clone() for h in out.hidden_states) if out.hidden_states else None,
            tuple(a.clone() for a in out.attentions) if out.attentions else None,
        )

    def fingerprint(self) -> str:
        """A hash of the weights: part of the teacher-output cache key."""
        h = hashlib.sha256(type(self.net.net).__name__.encode())
        for name, tensor in sorted(self.net.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:20]


def load_teacher(path: str | None = None, weights: str | None = None, trust_remote_code: bool = False,
                 log_dir: str = "logs", head: str = "classifier") -> Teacher:
    """Find and load the teacher named by the `teacher` config (see the module docstring)."""
    if head not in MADE_BY:
        raise TunelabError(f"teacher.head={head!r}: expected one of {sorted(MADE_BY)}")
    task, command = MADE_BY[head]
    if path is None:
        default = Path(log_dir) / task / "latest" / "model"
        if not (default / "config.json").is_file():
            raise TunelabError(
                f"teacher.path is not set and there is no trained model at {default} to distil from: make a "
                f"teacher first with `{command}` (same data=, a larger model=, e.g. model=bert_mini), or set "
                "teacher.path=<run folder, model folder or hub name>"
            )
        path = str(default.resolve())
    if head == "classifier" and weights:
        return _from_timm_name(str(path), weights)
    local = Path(str(path)).expanduser()
    if head == "classifier" and not local.is_dir():
        if artifacts.is_local(str(path)):
            raise TunelabError(f"teacher.path: {local} is not a folder (expected a run folder, a model folder, or a "
                               f"hub name); make a teacher with `{MAKE_ONE}`")
        import timm

        if timm.is_model(str(path)):
            raise TunelabError(f"teacher.path={path} is a timm model name: give its trained weights with "
                               "teacher.weights=<file.safetensors> (a teacher without trained weights teaches nothing)")
    kinds = [artifacts.MASKED_LM] if head == "masked_lm" else [artifacts.TEXT_CLASSIFIER, artifacts.IMAGE_CLASSIFIER]
    try:
        found = artifacts.load(str(path), role="teacher.path", trust_remote_code=trust_remote_code, kinds=kinds)
    except TunelabError as e:
        raise TunelabError(f"{e}; expected a model like the model/ of a `{command}` run") from None
    return Teacher(found.net, found.source, found.labels, found.tokenizer,
                   found.problem if head == "classifier" else None, grew_from_pretrained(found.card))


def grew_from_pretrained(card: dict) -> bool:
    """A model this project trained from a pretrained checkpoint (its card names a `pretrained` parent), or one
    made elsewhere (no card): not a from-scratch model of this project."""
    if not card:
        return True
    return any((p or {}).get("role") == "pretrained" for p in card.get("parents") or [])


def _from_timm_name(name: str, weights: str) -> Teacher:
    """A timm architecture with a trained weights file; its class count is read from the file."""
    from safetensors import safe_open

    path = Path(weights).expanduser()
    if not path.is_file():
        raise TunelabError(f"teacher.weights: file not found: {path} (expected the teacher's .safetensors weights)")
    import timm

    if not timm.is_model(name):
        raise TunelabError(f"teacher.path: unknown timm model {name!r} (with teacher.weights, give a timm name)")
    cfg = timm.models.get_pretrained_cfg(name)
    classifier = (cfg.classifier if cfg is not None else None) or "fc"
    key = f"{classifier if isinstance(classifier, str) else classifier[0]}.weight"
    try:
        with safe_open(str(path), "pt") as f:
            rows = f.get_slice(key).get_shape()[0] if key in set(f.keys()) else None
    except Exception as e:
        raise TunelabError(f"teacher.weights: {path} is not a readable safetensors file ({e})") from None
    if rows is None:
        raise TunelabError(f"teacher.weights: {path} has no classifier {key!r} for {name} (expected a fine-tuned "
                           f"{name}, e.g. the model.safetensors of a `{MAKE_ONE} model=timm` run)")
    try:
        net = ImageModel("classifier", [str(i) for i in range(rows)], name=name, pretrained_file=str(path),
                         keep_classifier=True)
    except TunelabError as e:
        raise TunelabError(f"teacher: {e}") from None
    return Teacher(net, f"{name} + {path}", None)
