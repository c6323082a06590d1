"""Fine-tuning loop: `tunelab` (Trainer + FinetuneTask + TextDataModule) vs a bare PyTorch loop.

Same model (the default bert_tiny), same data (embedded reviews), same optimizer and schedule;
the bare loop does exactly forward, cross-entropy, backward, step, schedule.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from tunelab.bench.common import WindowTimer, median_ratio, timed_loop
from tunelab.config import compose_config
from tunelab.train import assemble, check_config, prepared_data

WARMUP, STEPS, REPEATS = 5, 60, 3


def _cycle(loader):
    while True:
        yield from loader


def tunelab_rate(cfg, datamodule) -> float:
    L.seed_everything(0)
    timer = WindowTimer(WARMUP)
    built = assemble(cfg, datamodule, [timer], max_steps=WARMUP + STEPS, limit_val_batches=0,
                     enable_progress_bar=False, enable_model_summary=False)
    built.trainer.fit(built.task, datamodule=datamodule)
    return STEPS * datamodule.batch_size / (timer.end - timer.start)


def bare_rate(cfg, datamodule) -> float:
    L.seed_everything(0)
    model = instantiate(cfg.task, datamodule=datamodule).model
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay)
    scheduler = instantiate(cfg.scheduler)(optimizer=optimizer, num_training_steps=WARMUP + STEPS)
    model.train()

    def step(batch: dict) -> None:
        loss = F.cross_entropy(model(batch).logits, batch["labels"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()

    seconds = timed_loop(_cycle(datamodule.train_dataloader()), step, WARMUP, STEPS)
    return STEPS * datamodule.batch_size / seconds


def main() -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config(["callbacks.progress_bar=null"], Path(tmp) / "run")
        check_config(cfg)
        datamodule = prepared_data(cfg)
        pairs = [(tunelab_rate(cfg, datamodule), bare_rate(cfg, datamodule)) for _ in range(REPEATS)]
    ours, bare, ratio = median_ratio(pairs)
    print(f"finetune  bert_tiny/reviews  tunelab {ours:8.1f} samples/s  bare PyTorch {bare:8.1f} samples/s  "
          f"ratio {ratio:.3f}  (overhead {100 * (1 - ratio):+.1f}%)")
    return {"tunelab": ours, "bare": bare, "ratio": ratio}


if __name__ == "__main__":
    main()
