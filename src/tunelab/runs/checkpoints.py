"""Checkpoints that keep the resume promise: written atomically, often enough, and complete.

- `RunCheckpoint`: `last.ckpt` every `every_n_train_steps` from the first step on (Lightning's
  `ModelCheckpoint` defers step saves until the monitored metric exists, i.e. past the first
  epoch), and the best checkpoint chosen only right after a validation, with that validation's metric.
- `ResumeState`: what Lightning does not save but an exact continuation needs: every RNG (Python,
  NumPy, torch, CUDA) and the metrics logged so far, so a run resumed after its last training step
  still writes a complete `metrics.json`.
- `AtomicCheckpointIO`: writes next to the target and renames (fsspec's transaction writes to the
  system temp folder and *copies* across file systems, so a kill could leave a half-written file).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning import Callback, LightningModule, Trainer
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override


class AtomicCheckpointIO(TorchCheckpointIO):
    """`torch.save` into `.<name>.<pid>.tmp` in the checkpoint folder, then `os.replace`."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)


class RunCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` whose step saves write `last.ckpt` only, and whose validation saves always run."""

    def __init__(self, every_n_train_steps: int | None = None, enable_version_counter: bool = False,
                 **kwargs: Any) -> None:
        # no `-v1` copies: a resumed run that reaches a step again rewrites that step's file (left by the kill)
        super().__init__(every_n_train_steps=every_n_train_steps, enable_version_counter=enable_version_counter,
                         **kwargs)
        self._every_n_epochs = 1  # Lightning turns epoch saves off when step saves are on; keep both

    def _blocked(self, trainer: Trainer) -> bool:
        return bool(trainer.fast_dev_run) or trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        n = self._every_n_train_steps
        if n < 1 or trainer.global_step % n or self._blocked(trainer):
            return
        if self._last_global_step_saved == trainer.global_step:
            return
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return  # the epoch-end save follows; resumed from here, Lightning would skip the epoch's end
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._blocked(trainer) and not self._should_save_on_train_epoch_end(trainer):
            self._save_both(trainer)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._blocked(trainer) and self._should_save_on_train_epoch_end(trainer):
            self._save_both(trainer)

    def _save_both(self, trainer: Trainer) -> None:
        """Best (if the monitored metric was just computed) and last, even at a step already saved: this
        state has the validation's trackers, so a resume from it does not validate again."""
        candidates = self._monitor_candidates(trainer)
        if self.monitor is None or self.monitor in candidates:
            self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the bookkeeping of this folder's own run only: a new run started from another run's
        checkpoint tracks its own best, and never deletes (or points its test at) the other run's files."""
        if state_dict.get("dirpath", self.dirpath) == self.dirpath:
            super().load_state_dict(state_dict)


def rng_states() -> dict[str, Any]:
    """Every global RNG, in types `torch.load(weights_only=True)` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class ResumeState(Callback):
    """RNG states and logged metrics in every checkpoint; restored just before training continues.

    The RNGs are set in `on_train_start`, after the sanity check and set-up, at the point of the loop the
    checkpoint was written from: the next draw is the one the uninterrupted run made next.
    """

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        self.config = config  # the resolved run config: a checkpoint says what it is a checkpoint of
        self.metrics: dict[str, float] = {}  # logged before this process started (a resumed run's past)
        self._rng: dict[str, Any] | None = None
        self._trainer: Trainer | None = None

    @override
    def state_dict(self) -> dict[str, Any]:
        logged = dict(self.metrics)
        if self._trainer is not None:
            logged.update(scalars(self._trainer.callback_metrics))
        return {"rng": rng_states(), "metrics": logged, "config": self.config}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._rng = state_dict.get("rng")
        self.metrics = dict(state_dict.get("metrics", {}))

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._trainer = trainer

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        restore_loader_position(trainer)
        if self._rng is not None:
            set_rng_states(self._rng)
            self._rng = None


def saved_config(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The resolved run config a checkpoint was written with (None for checkpoints from elsewhere)."""
    return checkpoint.get("callbacks", {}).get(ResumeState.__qualname__, {}).get("config")


def restore_loader_position(trainer: Trainer) -> None:
    """Resume the training loader where the checkpoint left it, or at the next epoch's start.

    Lightning loads the saved position when it first builds the loader, but
    `trainer.estimated_stepping_batches` (which a schedule asks for in `configure_optimizers`, before the
    checkpoint is restored) builds it earlier, and the position would be dropped. And a checkpoint taken
    at the end of an epoch cut short by `limit_train_batches` holds a position inside that epoch's
    order, which the next epoch must not continue.
    """
    loop = trainer.fit_loop
    if not loop.restarting or loop._combined_loader is None:
        return
    epoch_done = loop.epoch_loop.batch_progress.current.ready >= trainer.num_training_batches
    pending = getattr(loop, "_combined_loader_states_to_load", None)
    if pending and not epoch_done:
        loop._load_combined_loader_states()
    elif epoch_done:
        loop._combined_loader_states_to_load = []
        for loader in loop._combined_loader.flattened:
            if hasattr(getattr(loader, "sampler", None), "restart_epoch"):
                loader.sampler.restart_epoch()
    iter(loop._data_fetcher)  # a fresh iterator, from the position just set


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if torch.is_tensor(v) and v.numel() == 1}
