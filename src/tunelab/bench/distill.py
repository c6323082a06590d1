"""Distillation epoch time with the teacher-output cache vs without, measured in the same run.

Same student (bert_tiny), same teacher (a bert_mini classifier, several times the student's forward
cost), same data (embedded reviews), same seed: one fit runs the teacher on every batch, the other reads
its logits from the memory-mapped cache (built once, before the timed epochs; its build time is printed
too). The runs are interleaved and the medians compared.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import open_dict

from tunelab import artifacts
from tunelab.bench.common import median_ratio
from tunelab.config import compose_config
from tunelab.models.text import TextModel
from tunelab.train import assemble, check_config, prepared_data

EPOCHS, REPEATS, BATCHES = 2, 2, 100  # the first epoch of each fit warms up; BATCHES bounds an epoch on slow CPUs
TEACHER = {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "intermediate_size": 1024}  # = model=bert_mini


class EpochTimer(L.Callback):
    """Wall time of each training epoch (validation is off in the benchmark)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.start = 0.0

    def on_train_epoch_start(self, *args: Any) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, *args: Any) -> None:
        self.times.append(time.perf_counter() - self.start)


def make_teacher(datamodule: Any, folder: Path) -> Path:
    """A bert_mini classifier on the data's tokenizer: timing needs its cost, not its accuracy."""
    net = TextModel("classifier", datamodule.labels, datamodule.tokenizer, **TEACHER)
    artifacts.save(folder, net, labels=datamodule.labels, tokenizer=datamodule.tokenizer)
    return folder


def epoch_time(cfg: Any, datamodule: Any, cache: bool) -> tuple[float, float]:
    """Median timed epoch of one fit, and the time spent before the first epoch (the cache build)."""
    L.seed_everything(0)
    with open_dict(cfg):
        cfg.task.cache_teacher = cache
    timer = EpochTimer()
    built = assemble(cfg, datamodule, [timer], max_epochs=EPOCHS, limit_train_batches=BATCHES, limit_val_batches=0,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    start = time.perf_counter()
    built.trainer.fit(built.task, datamodule=datamodule)
    setup = time.perf_counter() - start - sum(timer.times)
    return statistics.median(timer.times[1:]), setup


def forward_cost(task: Any, datamodule: Any) -> float:
    """Teacher forward time over student forward time on one training batch."""
    from tunelab.latency import cpu_latency

    batch = next(iter(datamodule.train_dataloader()))
    student_ms, teacher_ms = cpu_latency(task.model, task.teacher.net, batch, repeats=10)
    return teacher_ms / student_ms


def main() -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config(["task=distill", f"task.cache_dir={tmp}/cache", "callbacks=none", "logger=none"],
                             Path(tmp) / "run")
        check_config(cfg)
        datamodule = prepared_data(cfg)
        with open_dict(cfg):
            cfg.teacher.path = str(make_teacher(datamodule, Path(tmp) / "teacher"))
        cost = forward_cost(instantiate(cfg.task, datamodule=datamodule), datamodule)
        pairs, builds = [], []
        for _ in range(REPEATS):
            live, _ = epoch_time(cfg, datamodule, cache=False)
            cached, build = epoch_time(cfg, datamodule, cache=True)
            pairs.append((1 / cached, 1 / live))
            builds.append(build)
    cached_rate, live_rate, ratio = median_ratio(pairs)
    print(f"distill   bert_tiny<-bert_mini/reviews  teacher {cost:.1f}x the student's forward cost  "
          f"epoch ({BATCHES} batches) with cache {1 / cached_rate:6.2f} s  without {1 / live_rate:6.2f} s  "
          f"speed-up {ratio:.2f}x  (cache built once in {builds[0]:.1f} s, reused in {min(builds[1:] or builds):.1f} s)")
    return {"cached_s": 1 / cached_rate, "live_s": 1 / live_rate, "speedup": ratio, "teacher_cost": cost}


if __name__ == "__main__":
    main()
