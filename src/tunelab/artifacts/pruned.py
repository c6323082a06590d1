"""Pruned classifiers (kind `pruned-classifier`): weights whose shapes the model's own config cannot say.

Text: a BERT-like encoder with heads, feed-forward neurons or layers sliced out. The folder is a
`save_pretrained` folder (config.json with the new layer count and, when every layer has the same one,
the new FFN width) plus the per-layer shapes in the card (`compression.shapes`: heads and FFN width of
every layer). `load` builds the model from its config, gives every layer its recorded shape, then loads
the weights strictly: never `ignore_mismatched_sizes`. When `compression.standard_config` is true (no
head removed, one FFN width) the folder also loads in plain `transformers`.

Images: a channel-pruned timm CNN, as timm's config.json + model.safetensors; `load` resizes the
convolutions, batch norms and classifier to the tensors in the file before loading them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunelab.artifacts.derived import TUNELAB_LOAD, save_network, write_card
from tunelab.artifacts.kinds import PRUNED
from tunelab.errors import TunelabError

PLAIN_LOAD = ('from transformers import AutoModelForSequenceClassification\n'
              'model = AutoModelForSequenceClassification.from_pretrained("{path}")  # compression.standard_config')


def save(directory: str | Path, net: Any, source: Any, compression: dict[str, Any],
         metrics: dict | None = None) -> Path:
    """Write a pruned TextModel/ImageModel made from the Artifact `source`."""
    from tunelab.models import surgery

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_network(directory, net, source.tokenizer, source.preprocessing)
    compression = dict(compression)
    if net.modality == "text":
        compression.update(shapes=surgery.layout(net.net), standard_config=surgery.standard_config(net.net))
        net.net.config.save_pretrained(directory)
    plain = compression.get("standard_config")
    write_card(directory, PRUNED, net.modality, source, compression, directory / "model.safetensors",
               PLAIN_LOAD if plain else TUNELAB_LOAD, metrics)
    return directory


def load(folder: Path, card: dict, config: dict, role: str) -> Any:
    from tunelab.artifacts import Artifact

    modality = card.get("modality", "text")
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise TunelabError(f"{role}: {folder} has no model.safetensors (expected the pruned weights)")
    net = _load_image(folder, config, weights) if modality == "image" else _load_text(folder, card, weights)
    tokenizer = None
    if modality == "text":
        from tunelab.folders import own_tokenizer

        tokenizer = own_tokenizer(str(folder))
    return Artifact(str(folder), PRUNED, net.eval(), card.get("labels"), tokenizer, card.get("preprocessing") or {},
                    card)


def _load_text(folder: Path, card: dict, weights: Path) -> Any:
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from tunelab.models import surgery
    from tunelab.models.text import TextModel

    config = AutoConfig.from_pretrained(folder)
    shapes = (card.get("compression") or {}).get("shapes")
    if not shapes:
        raise TunelabError(f"{folder}: the card has no compression.shapes (expected per-layer heads and FFN width)")
    net = AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa")
    surgery.apply_layout(net, shapes)
    state = load_file(weights)
    missing, unexpected = net.load_state_dict(state, strict=False)
    tied = set(getattr(net, "_tied_weights_keys", None) or [])
    if unexpected or set(missing) - tied:
        raise TunelabError(f"{folder}: the weights do not fit the recorded shapes (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
    labels = [str(config.id2label[i]) for i in sorted(config.id2label)]
    return TextModel("classifier", labels, net=net)


def _load_image(folder: Path, config: dict, weights: Path) -> Any:
    from safetensors.torch import load_file

    from tunelab.models import surgery
    from tunelab.models.vision import ImageModel

    names = config.get("label_names") or [str(i) for i in range(int(config["num_classes"]))]
    model = ImageModel("classifier", names, name=config["architecture"])
    state = load_file(weights)
    surgery.fit_shapes(model.net, state)
    model.net.load_state_dict(state)
    model.net.pretrained_cfg = {**model.net.pretrained_cfg, **config.get("pretrained_cfg", {})}
    return model


def describe(folder: Path) -> dict[str, Any]:
    """The card's compression record (shapes, standard_config)."""
    return json.loads((folder / "tunelab.json").read_text()).get("compression", {})
