"""What the folders made from another artifact (pruned, int8, ONNX) share: the network's own files and a card.

A derived folder keeps the source's `config.json` (updated to the new shapes where a config can say them),
its tokenizer (text) or timm preprocessing (images), and a card naming the source as its parent with the
hash of its weights, the compression applied (`compression`), and `base_kind`, the kind it was made from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunelab.artifacts.kinds import CARD, IMAGE_CLASSIFIER, TEXT_CLASSIFIER


def base_kind(modality: str) -> str:
    return IMAGE_CLASSIFIER if modality == "image" else TEXT_CLASSIFIER


def save_network(directory: Path, net: Any, tokenizer: Any | None, preprocessing: dict) -> None:
    """The network in its ecosystem's format (HF `save_pretrained` + tokenizer, or timm config + safetensors)."""
    from tunelab.artifacts import _save_timm

    if net.modality == "image":
        _save_timm(directory, net, dict(preprocessing.get("image") or {}))
    else:
        net.net.save_pretrained(directory, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)


def write_card(directory: Path, kind: str, modality: str, source: Any, compression: dict[str, Any],
               weights: Path, how_to_load: str, metrics: dict | None = None) -> dict[str, Any]:
    """`tunelab.json` and a short `README.md` for a derived folder; `source` is the loaded source Artifact."""
    from tunelab.artifacts import parent, versions, weights_digest
    from tunelab.problems import card_of

    card = {"format": "tunelab-artifact", "version": 1, "kind": kind, "base_kind": base_kind(modality),
            "modality": modality, "labels": source.labels, "preprocessing": source.preprocessing,
            "problem": card_of(source.problem) if source.problem is not None else source.card.get("problem"),
            "task": "compress", "path": str(directory), "compression": compression, "metrics": metrics or {},
            "parents": [parent("source", source.card.get("path") or source.source)],
            "versions": versions(), "sha256": weights_digest(weights)}
    (directory / CARD).write_text(json.dumps(card, indent=2, default=str))
    labels = ", ".join(source.labels or []) or "none"
    (directory / "README.md").write_text(
        f"---\ntags: [tunelab, {kind}]\n---\n\n# {kind} ({base_kind(modality)}), made by `compress.py`\n\n"
        f"Labels: {labels}. Compression: `{json.dumps(compression)}`.\n\n## How to load it\n\n```python\n"
        f"{how_to_load.format(path=directory)}\n```\n\nPreprocessing: `{json.dumps(source.preprocessing)}`.\n\n"
        f"Made from `{card['parents'][0]['source']}` (sha256 {str(card['parents'][0]['sha256'])[:16]}).\n")
    return card


TUNELAB_LOAD = ('from tunelab import artifacts\n'
                'model = artifacts.load("{path}")   # model.net(batch).logits, model.tokenizer, model.labels')
