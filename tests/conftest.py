"""Shared fixtures: compose the real config in-process, a shared data cache, tiny HF models on disk."""

from __future__ import annotations

import json
import math
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

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


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under `root`: a content hash for files, the target for links, `dir` for folders, so any
    change to a run folder (or a log tree) shows."""
    import hashlib

    entries = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            entries[key] = f"-> {os.readlink(path)}"
        elif path.is_file():
            entries[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            entries[key] = "dir"
    return entries


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python train.py ...` as a user would, with logs under `cwd`."""
    full_env = {**os.environ, "TUNELAB_LOG_DIR": str(cwd / "logs"), "HYDRA_FULL_ERROR": "0", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def expect_error(cfg: DictConfig, *fragments: str) -> str:
    """`run(cfg)` stops with a TunelabError (Hydra may wrap it) whose message holds every fragment."""
    from tunelab.errors import TunelabError
    from tunelab.train import run

    with pytest.raises(Exception) as info:  # noqa: B017 (Hydra wraps errors raised inside `instantiate`)
        run(cfg)
    error = info.value
    while error is not None and not isinstance(error, TunelabError):
        error = error.__cause__
    assert error is not None, f"not a TunelabError: {info.value!r}"
    for fragment in fragments:
        assert fragment in str(error), str(error)
    return str(error)


def trained_task(cfg: DictConfig, run: Path, stage: str = "test") -> tuple[Any, Any]:
    """The run's task rebuilt from `cfg` with its best checkpoint loaded, in eval mode, and its DataModule."""
    import torch
    from hydra.utils import instantiate

    dm = instantiate(cfg.data)
    dm.setup(stage)
    task = instantiate(cfg.task, datamodule=dm)
    best = json.loads((run / "metrics.json").read_text())["best_checkpoint"]
    task.load_state_dict(torch.load(best, map_location="cpu", weights_only=True)["state_dict"])
    return task.eval(), dm


def check_one_ddp_run(logs: Path, task: str) -> dict:
    """A finished `trainer=ddp_cpu` run: one folder both ranks wrote into, artifacts from rank 0 only."""
    runs = list((logs / task / "runs").iterdir())
    assert len(runs) == 1, runs
    run = runs[0]
    assert (run / "ddp_rank_1.log").is_file()  # the second rank joined this run's folder
    assert (run / "model").is_dir() and (logs / task / "latest").resolve() == run
    pid = run.name.rsplit("_", 1)[1]  # run folders end in the launching (rank-0) process id
    events = list((run / "tensorboard").glob("events.*"))
    assert events and all(e.name.split(".")[-2] == pid for e in events), events  # only rank 0 logged
    return json.loads((run / "metrics.json").read_text())["metrics"]


def finished_trials(db: Path) -> list[float]:
    """Values of the completed trials in an Optuna study database (none while it is being created)."""
    if not db.exists():
        return []
    with sqlite3.connect(db) as con:
        try:
            return [v for (v,) in con.execute(
                "select v.value from trial_values v join trials t using (trial_id) where t.state = 'COMPLETE'")]
        except sqlite3.OperationalError:
            return []


def check_one_trial_search(search: str, task: str, *args: str, cwd: Path) -> float:
    """`python train.py -m hparams_search=<search>` for one trial: it ran the task and stored its metric."""
    proc = run_cli("-m", f"hparams_search={search}", "hydra.sweeper.n_trials=1", *args, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [value] = finished_trials(cwd / "logs" / task / "optuna.db")
    assert (cwd / "logs" / task / "multiruns").is_dir() and math.isfinite(value)
    return value


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
