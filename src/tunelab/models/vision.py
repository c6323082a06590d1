"""Image networks from `timm`: any model name, weights from a local file when given.

The network keeps timm's own classifier so the exported folder (timm config + model.safetensors)
loads with plain `timm.create_model` and gives the same logits.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

from tunelab.contracts import PIXEL_VALUES, Output
from tunelab.errors import TunelabError


class ImageModel(nn.Module):
    """A timm model whose features are its pre-logits and whose head is its own classifier."""

    modality = "image"

    def __init__(
        self,
        head: str = "classifier",
        labels: list[str] | None = None,
        tokenizer: object | None = None,
        *,
        name: str = "resnet18",
        pretrained_file: str | None = None,
        drop_rate: float = 0.0,
        drop_path_rate: float | None = None,
        gradient_checkpointing: bool = False,
        keep_classifier: bool = False,
        problem_type: str | None = None,
    ) -> None:
        """`problem_type` is the problem's (timm has no such field: the card records it)."""
        super().__init__()
        del tokenizer, problem_type
        self.fresh_head = not keep_classifier
        if head != "classifier":
            raise TunelabError(f"image models support head=classifier only (got {head!r})")
        if not labels:
            raise TunelabError("an image classifier needs labelled data")
        if name not in timm.list_models(name) and not timm.is_model(name):
            raise TunelabError(f"model.name: unknown timm model {name!r} (see timm.list_models())")
        kwargs = {}
        if pretrained_file:
            path = Path(pretrained_file).expanduser()
            if not path.is_file():
                raise TunelabError(f"model.pretrained_file: file not found: {path} (expected .safetensors or .pth)")
            overlay = {"file": str(path.resolve())}
            if keep_classifier:  # timm drops a classifier whose size differs from the pretrained config's
                overlay["num_classes"] = len(labels)
            kwargs = {"pretrained": True, "pretrained_cfg_overlay": overlay}
        if drop_path_rate is not None:
            kwargs["drop_path_rate"] = drop_path_rate
        self.name, self.labels = name, list(labels)
        try:
            self.net = timm.create_model(name, num_classes=len(labels), drop_rate=drop_rate, **kwargs)
        except RuntimeError as e:
            raise TunelabError(f"model.pretrained_file: weights do not fit {name} ({str(e).splitlines()[0]})") from None
        if gradient_checkpointing:
            self.net.set_grad_checkpointing(True)

    @property
    def feature_size(self) -> int:
        return int(self.net.num_features)

    @property
    def classifier(self) -> nn.Module:
        return self.net.get_classifier()

    def forward(self, batch: dict[str, torch.Tensor], **_: bool) -> Output:
        features = self.net.forward_head(self.net.forward_features(batch[PIXEL_VALUES]), pre_logits=True)
        return Output(self.classifier(features), features)
