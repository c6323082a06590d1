"""int8 PyTorch text classifiers (kind `int8-classifier`): dynamically quantized linear layers.

The folder holds the source's config.json and tokenizer, and `model.int8.pt`, the quantized network's
state dict (int8 weights with their scales; loaded with `weights_only=True`, no code runs). `load` builds
the network from its config (with the per-layer shapes of a pruned source, `compression.shapes`),
quantizes it the same way, then loads the int8 weights strictly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tunelab.artifacts.derived import TUNELAB_LOAD, write_card
from tunelab.artifacts.kinds import INT8
from tunelab.errors import TunelabError

FILE = "model.int8.pt"


def save(directory: str | Path, model: Any, source: Any, compression: dict[str, Any],
         metrics: dict | None = None) -> Path:
    """Write a quantized TextModel (`compress.quantize.torch_dynamic`) made from the Artifact `source`."""
    from tunelab.models import surgery

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.net.config.save_pretrained(directory)
    if source.tokenizer is not None:
        source.tokenizer.save_pretrained(directory)
    torch.save(model.net.state_dict(), directory / FILE)
    shapes = surgery.layout(model.net)
    write_card(directory, INT8, "text", source, {**compression, "shapes": shapes}, directory / FILE, TUNELAB_LOAD,
               metrics)
    return directory


def load(folder: Path, card: dict, config: dict, role: str) -> Any:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from tunelab.artifacts import Artifact
    from tunelab.folders import own_tokenizer
    from tunelab.models import surgery
    from tunelab.models.int8 import quantize_linear
    from tunelab.models.text import TextModel

    if not (folder / FILE).is_file():
        raise TunelabError(f"{role}: {folder} has no {FILE} (expected the int8 weights next to config.json)")
    hf_config = AutoConfig.from_pretrained(folder)
    net = AutoModelForSequenceClassification.from_config(hf_config, attn_implementation="sdpa")
    surgery.apply_layout(net, (card.get("compression") or {}).get("shapes") or surgery.layout(net))
    net = quantize_linear(net.eval())
    net.load_state_dict(torch.load(folder / FILE, map_location="cpu", weights_only=True))
    labels = [str(hf_config.id2label[i]) for i in sorted(hf_config.id2label)]
    model = TextModel("classifier", labels, net=net).eval()
    return Artifact(str(folder), INT8, model, card.get("labels"), own_tokenizer(str(folder)),
                    card.get("preprocessing") or {}, card)
