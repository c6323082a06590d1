"""The distillation teacher: a trained model, frozen and kept out of the student's module tree.

The network is held by a plain object rather than registered as a submodule, so it never reaches the
optimizer, the checkpoint, `model/`, DDP, or the `train()` switch Lightning flips on the task (which
would turn the teacher's dropout back on). Finding and loading one from a `model/` folder goes through
`tunelab.artifacts`, which builds networks from this package, so it lives above: `tunelab.tasks.teacher`.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from tunelab.contracts import Output
from tunelab.models.text import TextModel
from tunelab.models.vision import ImageModel


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
