"""Timing helpers shared by the benchmarks: warm-up, a timed window, repeats interleaved."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import lightning as L


class WindowTimer(L.Callback):
    """Time training batches [warmup, warmup + steps) inside a Lightning fit."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end = warmup, 0.0, 0.0

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.end = time.perf_counter()


def timed_loop(batches: Iterable[Any], step: Callable[[Any], None], warmup: int, steps: int) -> float:
    """Seconds for `steps` calls of `step` after `warmup` untimed ones."""
    it: Iterator[Any] = iter(batches)
    for _ in range(warmup):
        step(next(it))
    start = time.perf_counter()
    for _ in range(steps):
        step(next(it))
    return time.perf_counter() - start


def median_ratio(pairs: list[tuple[float, float]]) -> tuple[float, float, float]:
    """Median of each side and the ratio of medians (rates: higher is better)."""
    a = statistics.median(p[0] for p in pairs)
    b = statistics.median(p[1] for p in pairs)
    return a, b, a / b
