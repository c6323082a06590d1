"""Image networks from `timm`: any model name, weights from a local file when given.

The network keeps timm's own classifier so the exported folder (timm config + model.safetensors)
loads with plain `timm.create_model` and gives the same logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import timm
import torch
from torch import nn

from tunelab.contracts import Output
from tunelab.errors import TunelabError


def read_exported_config(directory: str | Path, role: str = "model") -> dict:
    """The config.json of an exported timm folder, checked for what loading it needs."""
    directory = Path(directory)
    path = directory / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TunelabError(f"{role}: cannot read {path} ({e}; expected a timm config.json)") from None
    if not isinstance(config, dict) or "architecture" not in config or "num_classes" not in config:
        raise TunelabError(f"{role}: {path} is not a timm model config (expected 'architecture' and 'num_classes')")
    if not (directory / "model.safetensors").is_file():
        raise TunelabError(f"{role}: {directory} has no model.safetensors (expected the weights next to config.json)")
    return config


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
    ) -> None:
        super().__init__()
        del tokenizer
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

    @classmethod
    def from_exported(cls, directory: str | Path, role: str = "model") -> ImageModel:
        """Load a folder written by `export` (timm config.json + model.safetensors), classifier included,
        with the preprocessing it was trained with (its exported pretrained_cfg: input size, mean, std)."""
        config = read_exported_config(directory, role)
        labels = config.get("label_names") or [str(i) for i in range(int(config["num_classes"]))]
        model = cls("classifier", labels, name=config["architecture"],
                    pretrained_file=str(Path(directory) / "model.safetensors"), keep_classifier=True)
        model.net.pretrained_cfg = {**model.net.pretrained_cfg, **config.get("pretrained_cfg", {})}
        return model

    @property
    def feature_size(self) -> int:
        return int(self.net.num_features)

    @property
    def classifier(self) -> nn.Module:
        return self.net.get_classifier()

    def forward(self, batch: dict[str, torch.Tensor], **_: bool) -> Output:
        features = self.net.forward_head(self.net.forward_features(batch["pixel_values"]), pre_logits=True)
        return Output(self.classifier(features), features)

    def export(self, directory: str | Path, tokenizer: object | None = None, data_config: dict | None = None) -> None:
        """Write timm's config.json and model.safetensors: `timm.create_model("local-dir:<dir>")` loads them.

        `data_config` (input size, mean, std, ...) is what the model was trained with; it goes into the
        exported pretrained_cfg so `timm.data.resolve_data_config(model=...)` reproduces the preprocessing.
        """
        from timm.models import save_for_hf

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if data_config:
            self.net.pretrained_cfg = {**self.net.pretrained_cfg, **data_config, "num_classes": len(self.labels)}
        save_for_hf(self.net, directory, model_config={"label_names": self.labels}, safe_serialization=True)
        config = json.loads((directory / "config.json").read_text())
        config.setdefault("architecture", self.name)
        (directory / "config.json").write_text(json.dumps(config, indent=2))
