"""Forward-pass latency of two networks measured side by side: the ratio is the result, not the milliseconds.

Used by the distillation task (`test/latency_ratio`), by `make bench` and by the compression report
(`percentiles`: p50/p95 of one network at a stated thread count).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


def cpu_latency(student: nn.Module, teacher: nn.Module, batch: dict[str, torch.Tensor],
                repeats: int) -> tuple[float, float]:
    """Median milliseconds per forward pass on the CPU in float32, student and teacher interleaved on one batch."""
    import copy

    def on_cpu(m: nn.Module) -> nn.Module:
        p = next(m.parameters())
        return m if p.device.type == "cpu" and p.dtype == torch.float32 else copy.deepcopy(m).to("cpu", torch.float32)

    nets = [on_cpu(student), on_cpu(teacher)]
    batch = {k: v.to("cpu", torch.float32) if v.is_floating_point() else v.to("cpu") for k, v in batch.items()}
    modes = [m.training for m in nets]
    times: list[list[float]] = [[], []]
    try:
        for m in nets:
            m.eval()
        with torch.inference_mode():
            for i in range(repeats + 2):
                for j, m in enumerate(nets):
                    start = time.perf_counter()
                    m(batch)
                    if i >= 2:  # the first calls warm up allocators and kernels
                        times[j].append(time.perf_counter() - start)
    finally:
        for m, mode in zip(nets, modes, strict=True):
            m.train(mode)
    return 1000 * statistics.median(times[0]), 1000 * statistics.median(times[1])


def percentiles(call: Callable[[], object], repeats: int, warmup: int = 3) -> tuple[float, float]:
    """p50 and p95 milliseconds of `call()` after `warmup` untimed calls."""
    return interleaved([call], repeats, warmup)[0]


@contextmanager
def threads(n: int) -> Iterator[int]:
    """Run PyTorch on `n` intra-op threads (stated next to every latency figure), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield int(n)
    finally:
        torch.set_num_threads(before)


def interleaved(calls: list[Callable[[], object]], repeats: int, warmup: int = 3) -> list[tuple[float, float]]:
    """`percentiles` of several calls measured in turns, so a change in machine load hits every one alike."""
    for call in calls:
        for _ in range(warmup):
            call()
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for call, spent in zip(calls, times, strict=True):
            start = time.perf_counter()
            call()
            spent.append(1000 * (time.perf_counter() - start))
    result = []
    for spent in times:
        spent.sort()
        result.append((statistics.median(spent), spent[min(len(spent) - 1, round(0.95 * (len(spent) - 1)))]))
    return result
