"""Model folders given by the user (`model.pretrained`, `data.tokenizer`), checked before anything loads them.

Both the text model and the tokenizer loader check the same path, so the check lives below both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError


def is_local(source: str) -> bool:
    """Whether a model source names a local folder (a path) rather than a hub name."""
    return Path(source).expanduser().exists() or source.startswith((".", "/", "~")) or source.count("/") > 1


def check_pretrained(source: str, role: str = "model.pretrained") -> str:
    """Fail early, naming the key the user set (`role`) and the path, when a local model directory is missing,
    holds no model, or holds a config.json that is not JSON (which transformers would blame on the tokenizer)."""
    path = Path(source).expanduser()
    if not is_local(source):
        return source  # a hub name: resolved by transformers when online
    if not path.is_dir():
        raise TunelabError(f"{role}: directory not found: {path} (expected a Hugging Face model folder)")
    if not (path / "config.json").is_file() and (path / "model" / "config.json").is_file():
        path = path / "model"  # a run folder (or logs/<task>/latest): its model/
    if not (path / "config.json").is_file():
        raise TunelabError(
            f"{role}: {path} holds no model (expected config.json and model.safetensors, as written "
            "by save_pretrained)"
        )
    check_config_json(path / "config.json", role)
    return str(path.resolve())


def check_config_json(path: Path, role: str) -> None:
    """A model's config.json must be a JSON object before anything (a tokenizer first) reads it."""
    try:
        config = json.loads(path.read_bytes())
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
        raise TunelabError(f"{role}: {path} is not valid JSON ({e}; expected the model's Hugging Face config)") from None
    except OSError as e:
        raise TunelabError(f"{role}: cannot read {path} ({e.strerror}; expected the model's Hugging Face config)") from None
    if not isinstance(config, dict):
        raise TunelabError(f"{role}: {path} holds a JSON {type(config).__name__}, not an object (expected the "
                           "model's Hugging Face config)")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")


def own_tokenizer(source: str, trust_remote_code: bool = False) -> Any | None:
    """The tokenizer saved with a model, or None when it has none."""
    from transformers import AutoTokenizer

    local = Path(source)
    if local.is_dir() and not any((local / f).is_file() for f in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None
