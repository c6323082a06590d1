"""Callbacks the configs name that Lightning does not ship as-is."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import ThroughputMonitor

from tunelab.contracts import ATTENTION_MASK


def batch_size(batch: Any) -> int:
    """Samples in any project batch: a dict of tensors, or `{"source": ..., "target": ...}` pairs."""
    if torch.is_tensor(batch):
        return int(batch.shape[0])
    if isinstance(batch, Mapping):
        return sum(batch_size(v) for v in batch.values() if isinstance(v, Mapping)) or batch_size(
            next(v for v in batch.values() if torch.is_tensor(v)))
    raise TypeError(f"cannot count samples in a {type(batch).__name__}")


def token_count(batch: Any) -> int:
    """Tokens (ones of `attention_mask`) in a text batch, or in both halves of a domain pair."""
    if ATTENTION_MASK in batch:
        return int(batch[ATTENTION_MASK].sum())
    return sum(token_count(v) for v in batch.values() if isinstance(v, Mapping))


class Throughput(ThroughputMonitor):
    """Lightning's ThroughputMonitor (samples/s, batches/s) for the project's dict batches; on text data its
    items are tokens, so `train/device/items_per_sec` is tokens/s, the figure `make bench` compares."""

    def __init__(self, window_size: int = 20, **kwargs: Any) -> None:
        super().__init__(batch_size_fn=batch_size, window_size=window_size, **kwargs)

    def _update(self, *args: Any, **kwargs: Any) -> None:
        # The tasks report no FLOPs (their cost depends on masking and sequence lengths); the monitor warns about
        # the missing `flops_per_batch` on its first update. Silenced here only, not for the whole process.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="When using the `ThroughputMonitor`, you need to define")
            super()._update(*args, **kwargs)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if getattr(trainer.datamodule, "modality", None) == "text":
            self.length_fn = token_count
        super().setup(trainer, pl_module, stage)
