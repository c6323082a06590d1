"""The one place that writes and reads `model/` folders.

A `model/` folder holds the network in its ecosystem's own format (Hugging Face `save_pretrained` with
its tokenizer, or timm's `config.json` + `model.safetensors` with the preprocessing it was trained with),
plus its card: `tunelab.json` (machine-readable: kind, labels, preprocessing, metrics, parents with
content hashes, the run and its resolved config, package versions) and a Hugging Face style
`README.md`. `load` reads such a folder, a run folder or `logs/<task>/latest`, a plain Hugging Face or
timm folder, or a hub name, and returns an `Artifact`: the network, its kind, labels, tokenizer and
preprocessing. Nothing else in the project parses or writes these folders.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from tunelab.artifacts.kinds import (
    ADAPTER_CONFIG,
    CARD,
    IMAGE_CLASSIFIER,
    LOADERS,
    LORA_ADAPTER,
    MASKED_LM,
    TEXT_CLASSIFIER,
    WORDS,
)
from tunelab.artifacts.readme import model_card
from tunelab.errors import TunelabError
from tunelab.folders import is_local, own_tokenizer

HEADS = {TEXT_CLASSIFIER: "classifier", MASKED_LM: "masked_lm", IMAGE_CLASSIFIER: "classifier"}
HF_SUFFIX = {TEXT_CLASSIFIER: "ForSequenceClassification", MASKED_LM: "ForMaskedLM"}
GENERIC_LABEL = re.compile(r"LABEL_\d+")
PACKAGES = ("tunelab", "torch", "transformers", "timm", "lightning", "tokenizers")


@dataclass
class Artifact:
    """A loaded `model/` folder (or plain HF/timm model): what every tool after training works with."""

    source: str
    kind: str
    net: Any  # TextModel or ImageModel
    labels: list[str] | None
    tokenizer: Any | None = None
    preprocessing: dict[str, Any] = field(default_factory=dict)
    card: dict[str, Any] = field(default_factory=dict)
    problem: Any = None  # what the outputs mean (`tunelab.problems`): from the card, or the config's problem_type

    @property
    def modality(self) -> str:
        own = getattr(self.net, "modality", None)  # derived kinds (pruned, ONNX) of either modality
        return own if isinstance(own, str) else "image" if self.kind == IMAGE_CLASSIFIER else "text"


# ----------------------------------------------------------------------------- finding folders
def model_dir(path: str | Path, role: str = "model") -> Path:
    """The model folder behind `path`: the folder itself, a run folder's `model/` (also `logs/<task>/latest`)."""
    folder = Path(path).expanduser()
    for candidate in (folder, folder / "model"):
        if (candidate / "config.json").is_file() or (candidate / ADAPTER_CONFIG).is_file():  # (or a peft adapter)
            return candidate.resolve()
    if not folder.exists():
        raise TunelabError(f"{role}: directory not found: {folder} (expected a model folder or a run folder)")
    raise TunelabError(
        f"{role}: {folder} holds no model (expected a run folder with model/, a Hugging Face model folder with "
        "config.json and model.safetensors, or a timm folder with config.json and model.safetensors)"
    )


def read_card(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / CARD).read_text())
    except FileNotFoundError:
        return {}
    except ValueError as e:
        raise TunelabError(f"{folder / CARD}: not valid JSON ({e}; expected the card this project writes)") from None


def read_config(folder: Path, role: str) -> dict[str, Any]:
    file = folder / ("config.json" if (folder / "config.json").is_file() or not (folder / ADAPTER_CONFIG).is_file()
                     else ADAPTER_CONFIG)
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise TunelabError(f"{role}: cannot read {file} ({e})") from None
    if not isinstance(config, dict):
        raise TunelabError(f"{role}: {file} is not a JSON object")
    return config


def kind_of(config: dict[str, Any]) -> str:
    """The kind a plain folder's config.json describes (timm configs name an `architecture`)."""
    if "architecture" in config:
        return IMAGE_CLASSIFIER
    if config.get("peft_type") == "LORA":
        return LORA_ADAPTER
    archs = config.get("architectures") or []
    return MASKED_LM if any(a.endswith("ForMaskedLM") for a in archs) else TEXT_CLASSIFIER


def weights_digest(folder: str | Path) -> str | None:
    """sha256 of a local model's weight files (the parent hash in a card); None for hub names."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) if folder.is_dir() else (
        [folder] if folder.is_file() else [])
    if not files:
        return None
    h = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def parent(role: str, source: str | None) -> dict[str, Any] | None:
    """A card's record of a model this one was made from: where it came from and what its weights were."""
    if not source:
        return None
    local = Path(str(source)).expanduser()
    if local.is_dir():
        with contextlib.suppress(TunelabError):  # a folder of weights that is no model folder: hash it as is
            local = model_dir(local)
    where = str(local.resolve()) if local.exists() else str(source)
    return {"role": role, "source": where, "sha256": weights_digest(local) if local.exists() else None}


# ----------------------------------------------------------------------------- loading
def load(path: str | Path, kind: str | None = None, role: str = "model", trust_remote_code: bool = False,
         kinds: list[str] | None = None) -> Artifact:
    """Load any folder this project wrote, a plain HF/timm folder, or (online) a hub name; `kind` (or any of
    `kinds`) is what the caller can use."""
    kinds = kinds or ([kind] if kind else None)
    source = str(path)
    if is_local(source):
        folder = model_dir(source, role)
        card, config = read_card(folder), read_config(folder, role)
        found = card.get("kind") or kind_of(config)
        source = str(folder)
    else:  # a hub name: transformers resolves it (only when online)
        card, config, found = {}, {}, (kinds or [TEXT_CLASSIFIER])[0]
    if kinds and found not in kinds:
        what = (config.get("architectures") or [config.get("architecture") or found])[0]
        wanted = " or ".join(WORDS[k] for k in kinds)
        raise TunelabError(f"{role}: {source} is a {what}, not a {wanted} (it holds a {found})")
    if found in LOADERS:
        module, function = LOADERS[found].split(":")
        artifact = getattr(importlib.import_module(module), function)(Path(source), card, config, role)
    elif found == IMAGE_CLASSIFIER:
        artifact = _load_timm(Path(source), card, config, role)
    else:
        artifact = _load_hf(source, found, card, role, trust_remote_code)
    if artifact.problem is None:
        artifact.problem = problem_of(artifact, config)
    return artifact


def problem_of(artifact: Artifact, config: dict[str, Any]) -> Any:
    """The problem a loaded model answers: its card's, or for a plain folder its config's `problem_type`; the
    outputs are named by the card's labels, else by the config (`id2label`, timm's `label_names`)."""
    from tunelab import problems

    names = config.get("id2label") or {}
    outputs = artifact.labels or [str(names[k]) for k in sorted(names, key=int)] or config.get("label_names")
    if not outputs and "num_classes" in config:
        outputs = [str(i) for i in range(int(config["num_classes"]))]
    return problems.from_card(artifact.card, outputs, config.get("problem_type"))


def _load_timm(folder: Path, card: dict, config: dict, role: str) -> Artifact:
    """timm's config.json + model.safetensors, classifier included, with the preprocessing it was trained with
    (the exported pretrained_cfg: input size, mean, std)."""
    from tunelab.models.vision import ImageModel

    if "num_classes" not in config:
        raise TunelabError(f"{role}: {folder / 'config.json'} is not a timm model config (expected 'architecture' "
                           "and 'num_classes')")
    if not (folder / "model.safetensors").is_file():
        raise TunelabError(f"{role}: {folder} has no model.safetensors (expected the weights next to config.json)")
    names = config.get("label_names") or [str(i) for i in range(int(config["num_classes"]))]
    net = ImageModel("classifier", names, name=config["architecture"],
                     pretrained_file=str(folder / "model.safetensors"), keep_classifier=True)
    net.net.pretrained_cfg = {**net.net.pretrained_cfg, **config.get("pretrained_cfg", {})}
    labels = card.get("labels") or config.get("label_names")
    preprocessing = card.get("preprocessing") or {"image": dict(config.get("pretrained_cfg", {}))}
    return Artifact(str(folder), IMAGE_CLASSIFIER, net, labels, None, preprocessing, card)


def _load_hf(source: str, kind: str, card: dict, role: str, trust_remote_code: bool) -> Artifact:
    from transformers import AutoConfig

    from tunelab.models.text import TextModel

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise TunelabError(f"{role}: could not load a model config from {source!r} ({e})") from None
    archs = getattr(config, "architectures", None) or []
    if archs and not any(a.endswith(HF_SUFFIX[kind]) for a in archs):
        raise TunelabError(f"{role}: {source} is a {archs[0]}, not a {kind} (expected a model like the model/ "
                           f"of a `python train.py task={'mlm' if kind == MASKED_LM else 'finetune'}` run)")
    names = [str(config.id2label[i]) for i in sorted(config.id2label)] if kind == TEXT_CLASSIFIER else None
    generic = names is None or all(GENERIC_LABEL.fullmatch(n) for n in names)
    labels = card.get("labels") or (None if generic else names)  # None: the checkpoint names no classes
    try:
        net = TextModel(HEADS[kind], names, pretrained=source, trust_remote_code=trust_remote_code)
    except TunelabError as e:
        raise TunelabError(f"{role}: {e}") from None
    tokenizer = own_tokenizer(source, trust_remote_code)
    preprocessing = card.get("preprocessing") or {"text": {"tokenizer": "." if tokenizer is not None else None}}
    return Artifact(source, kind, net, labels, tokenizer, preprocessing, card)


# ----------------------------------------------------------------------------- saving
def save(directory: str | Path, net: Any, *, labels: list[str] | None = None, tokenizer: Any | None = None,
         data_config: dict | None = None, max_length: int | None = None, packed: bool = False,
         card: dict[str, Any] | None = None, problem: Any = None) -> Path:
    """Write `net` (a TextModel or ImageModel) in its ecosystem's format, then its card. `packed`: the text was
    cut into full blocks of `max_length` (masked-LM pretraining), not truncated per record. `problem`: what
    the outputs mean (recorded in the card; a masked LM has none)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if net.modality == "image":
        kind = IMAGE_CLASSIFIER
        _save_timm(directory, net, data_config or {})
        preprocessing = {"image": image_preprocessing(data_config or {})}
    else:
        # a network may name its own kind and card fields (a prompt-based classifier: its templates, verbalizer)
        kind = getattr(net, "artifact_kind", None) or (MASKED_LM if net.head == "masked_lm" else TEXT_CLASSIFIER)
        card = {**(card or {}), **(net.card_fields() if hasattr(net, "card_fields") else {})}
        net.net.save_pretrained(directory, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
        preprocessing = {"text": {"tokenizer": "." if tokenizer is not None else None, "max_length": max_length,
                                  "truncation": not packed, "packed": packed}}
    if problem is not None:
        from tunelab.problems import card_of

        card = {**(card or {}), "problem": card_of(problem)}
    full = {"format": "tunelab-artifact", "version": 1, "kind": kind, "labels": labels,
            "preprocessing": preprocessing, **(card or {}), "versions": versions(),
            "sha256": weights_digest(directory)}
    (directory / CARD).write_text(json.dumps(full, indent=2, default=str))
    (directory / "README.md").write_text(model_card(full))
    return directory


def _save_timm(directory: Path, net: Any, data_config: dict) -> None:
    """timm's config.json and model.safetensors, with the preprocessing the model was trained with in its
    pretrained_cfg, so `timm.data.resolve_data_config(model=...)` reproduces it."""
    from timm.models import save_for_hf

    if data_config:
        net.net.pretrained_cfg = {**net.net.pretrained_cfg, **data_config, "num_classes": len(net.labels)}
    save_for_hf(net.net, directory, model_config={"label_names": net.labels}, safe_serialization=True)
    config = json.loads((directory / "config.json").read_text())
    config.setdefault("architecture", net.name)
    (directory / "config.json").write_text(json.dumps(config, indent=2))


def image_preprocessing(data_config: dict) -> dict[str, Any]:
    keys = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items() if k in keys}


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def write_atomic_dir(tmp: Path, target: Path) -> None:
    """Replace folder `target` by `tmp` (a finished write); an older `target` is removed first."""
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
