"""Callbacks the configs name that Lightning does not ship as-is."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.callbacks import ThroughputMonitor


def batch_size(batch: Any) -> int:
    """Samples in any project batch: a dict of tensors, or `{"source": ..., "target": ...}` pairs."""
    if torch.is_tensor(batch):
        return int(batch.shape[0])
    if isinstance(batch, Mapping):
        return sum(batch_size(v) for v in batch.values() if isinstance(v, Mapping)) or batch_size(
            next(v for v in batch.values() if torch.is_tensor(v)))
    raise TypeError(f"cannot count samples in a {type(batch).__name__}")


class Throughput(ThroughputMonitor):
    """Lightning's ThroughputMonitor (samples/s, batches/s) for the project's dict batches."""

    def __init__(self, window_size: int = 20, **kwargs: Any) -> None:
        super().__init__(batch_size_fn=batch_size, window_size=window_size, **kwargs)
