"""LoRA adapters (kind `lora-adapter`): the adapter alone, in peft's own format, over a named base model.

A LoRA run's `model/` is the merged network (plain transformers/timm); `model/adapter/` holds what LoRA
trained: peft's `adapter_config.json` + `adapter_model.safetensors` (the low-rank matrices and the head, a few
percent of the model), loadable with `PeftModel.from_pretrained(base, folder)`, plus the card naming the base
model and the sha256 of its weights. `load` rebuilds base + adapter, refusing a base whose weights changed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunelab.artifacts.kinds import CARD, LORA_ADAPTER
from tunelab.errors import TunelabError

SNIPPET = {
    "text": ('from peft import PeftModel\nfrom transformers import AutoModelForSequenceClassification\n'
             'base = AutoModelForSequenceClassification.from_pretrained("{base}", num_labels={k})\n'
             'model = PeftModel.from_pretrained(base, "{path}")   # .merge_and_unload(): a plain model'),
    "image": ('import timm\nfrom peft import PeftModel\n'
              'base = timm.create_model("{arch}", num_classes={k}, pretrained=True,\n'
              '                         pretrained_cfg_overlay={{"file": "{base}"}})\n'
              'model = PeftModel.from_pretrained(base, "{path}")'),
}


def save_for(task: Any, directory: Path, card: dict[str, Any]) -> Path | None:
    """A LoRA run's adapter next to its merged model (`card` is the run's); nothing for other methods."""
    base = next((p for p in card.get("parents") or [] if p["role"] == "pretrained"), None)
    export = getattr(task, "export_adapter", None)
    adapter = export(base["source"] if base else None) if export else None
    if adapter is None:
        return None
    net = task.tuned
    return save(directory, adapter, base=base, labels=getattr(task, "labels", None), modality=net.modality,
                architecture=getattr(net, "name", None), card=card)


def save(directory: Path, adapter: Any, *, base: dict | None, labels: list[str] | None, modality: str,
         architecture: str | None = None, card: dict[str, Any] | None = None) -> Path:
    """Write the `PeftModel` `adapter` in peft's format, then its card and README."""
    from tunelab.artifacts import versions, weights_digest

    directory = Path(directory)
    adapter.save_pretrained(directory)
    (directory / "README.md").unlink(missing_ok=True)  # peft's template; the card below says more
    full = {"format": "tunelab-artifact", "version": 1, **(card or {}), "kind": LORA_ADAPTER, "labels": labels,
            "modality": modality, "architecture": architecture, "base_model": base, "path": str(directory),
            "versions": versions(), "sha256": weights_digest(directory)}
    (directory / CARD).write_text(json.dumps(full, indent=2, default=str))
    (directory / "README.md").write_text(readme(full))
    return directory


def readme(card: dict[str, Any]) -> str:
    base = card.get("base_model") or {}
    snippet = SNIPPET[card["modality"]].format(base=base.get("source"), path=card["path"],
                                               k=len(card.get("labels") or []), arch=card.get("architecture"))
    return (f"---\nlibrary_name: peft\ntags: [tunelab, {LORA_ADAPTER}]\n---\n\n# LoRA adapter made by "
            f"`task={card.get('task')}`\n\nBase model: `{base.get('source')}` (sha256 {base.get('sha256')}). "
            f"Labels: {', '.join(card.get('labels') or [])}.\n\n```python\n{snippet}\n```\n\nThe merged model "
            "(no peft needed) is the folder above this one.\n")


def load(folder: Path, card: dict, config: dict, role: str) -> Any:
    """Base model + adapter, merged: an Artifact like the merged `model/` folder's."""
    from tunelab.artifacts import Artifact, weights_digest

    base = (card.get("base_model") or {}).get("source") or config.get("base_model_name_or_path")
    labels = card.get("labels")
    if not base or not labels:
        raise TunelabError(f"{role}: {folder} names no base model or labels (expected the card this project writes "
                           "next to a LoRA adapter)")
    expected = (card.get("base_model") or {}).get("sha256")
    if expected and Path(base).exists() and weights_digest(base) != expected:
        raise TunelabError(f"{role}: the base model {base} has other weights than the adapter was trained on "
                           f"(sha256 {expected[:16]}...); the adapter only fits its own base")
    net, tokenizer = _merged(base, folder, card, labels, role)
    return Artifact(str(folder), LORA_ADAPTER, net.eval(), labels, tokenizer, card.get("preprocessing") or {}, card)


def _merged(base: str, folder: Path, card: dict, labels: list[str], role: str) -> tuple[Any, Any]:
    """The base network with a classifier for `labels` (drawn anew: the adapter carries the trained one), the
    adapter merged in; and the base's tokenizer."""
    from peft import PeftModel

    if card.get("modality") == "image":
        from tunelab.models.vision import ImageModel

        net = ImageModel("classifier", labels, name=card["architecture"], pretrained_file=base)
        net.net = PeftModel.from_pretrained(net.net, str(folder)).merge_and_unload()
        return net, None
    from transformers import AutoModelForSequenceClassification

    from tunelab.folders import own_tokenizer
    from tunelab.models.text import TextModel

    try:
        net = AutoModelForSequenceClassification.from_pretrained(
            base, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={n: i for i, n in enumerate(labels)})
    except (OSError, ValueError) as e:
        raise TunelabError(f"{role}: cannot load the adapter's base model {base!r} ({e})") from None
    merged = PeftModel.from_pretrained(net, str(folder)).merge_and_unload()  # before TextModel hooks its classifier
    return TextModel("classifier", labels, net=merged), own_tokenizer(base)
