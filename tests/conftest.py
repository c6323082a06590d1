"""Shared fixtures: compose the real config in-process, a shared data cache, tiny HF models on disk."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import DictConfig

from tunelab.config import compose_config

ROOT = Path(__file__).resolve().parents[1]

# one cache for the whole session: embedded data, tokenizers and tokenized datasets are built once
CACHE = Path(os.environ.setdefault("TUNELAB_CACHE_DIR", str(ROOT / ".cache")))

FAST = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "callbacks.throughput.window_size=2",
]


def compose_cfg(overrides: list[str], out: Path) -> DictConfig:
    """The config `python train.py <overrides>` would see, with its run folder at `out`."""
    return compose_config(overrides, out)


@pytest.fixture
def make_cfg(tmp_path: Path):
    def _make(*overrides: str, fast: bool = True) -> DictConfig:
        return compose_cfg([*(FAST if fast else []), *overrides], tmp_path / "run")

    return _make


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python train.py ...` as a user would, with logs under `cwd`."""
    full_env = {**os.environ, "TUNELAB_LOG_DIR": str(cwd / "logs"), "HYDRA_FULL_ERROR": "0", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT with its tokenizer, saved as a Hugging Face model directory would be."""
    from transformers import BertConfig, BertForMaskedLM

    from tunelab.data.tokenizer import train_wordpiece

    texts = [f"the {w} product is {a}" for w in ("book", "kettle", "phone", "film") for a in ("good", "bad", "fine")]
    tokenizer = train_wordpiece(texts * 20, vocab_size=200)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id)
    path = tmp_path_factory.mktemp("tiny_bert")
    BertForMaskedLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
