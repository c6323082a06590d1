"""Fine-tuning: a pretrained (or from-scratch) backbone and a head, trained on the targets of a problem.

The problem (`tunelab.problems`, from the DataModule) gives the head's size, the loss and the metrics:
single-label classes, real-valued scores or label sets alike. How much of the backbone trains (full, head only,
top k blocks, BitFit, LoRA, layer-wise rates) is the `tuning` the task is given (`tunelab.models.tuning`); with
LoRA the export is the merged network.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from lightning import LightningDataModule
from torch import nn
from torch.utils.data import DataLoader

from tunelab.contracts import LABELS
from tunelab.errors import TunelabError
from tunelab.models.tuning import Tuning
from tunelab.tasks.base import Scores, Task


class FinetuneTask(Task):
    """The problem's loss on labelled data, with its metrics for every split."""

    learns_from_unlabelled = False

    def __init__(
        self,
        model: Callable[..., nn.Module],
        datamodule: LightningDataModule,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        tuning: Tuning | None = None,
        tune_now: bool = True,
    ) -> None:
        """`tune_now=False`: a subclass changes the model first and calls `self.tune()` itself."""
        if getattr(datamodule, "unlabelled_file", None) and not self.learns_from_unlabelled:
            raise TunelabError(
                f"data.unlabelled_file={datamodule.unlabelled_file}: unlabelled records are a transfer set for "
                "task=distill, whose teacher labels them (expected data.unlabelled_file=null for this task)"
            )
        super().__init__(optimizer, scheduler, tuning)
        self.problem = datamodule.problem
        self.labels = list(datamodule.labels)
        self.tokenizer = getattr(datamodule, "tokenizer", None)
        self.data_config = getattr(datamodule, "data_config", None)  # image preprocessing, for the export
        self.model = model(head="classifier", labels=self.labels, tokenizer=self.tokenizer,
                           problem_type=self.problem.hf_problem_type)
        self.problem.prepare(self.model, fresh_head=getattr(self.model, "fresh_head", True))
        self.scores = Scores(self.problem)
        if tune_now:
            self.tune()

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(batch).logits

    def _step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = self(batch)
        return self.problem.loss(outputs, batch[LABELS]), outputs

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, outputs = self._step(batch)
        self.scores.update("train", outputs.detach(), batch[LABELS])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch[LABELS]))
        return loss

    def on_train_epoch_end(self) -> None:
        """Training metrics over the epoch: computed (and synchronised) once, not at every step."""
        self.log_dict(self.scores.compute("train"), sync_dist=True)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, outputs = self._step(batch)
        self.scores.update("val", outputs, batch[LABELS])
        self.log("val/loss", loss, sync_dist=True, batch_size=len(batch[LABELS]))

    def on_validation_epoch_end(self) -> None:
        metrics = self.scores.compute("val")
        self.log_dict(metrics, prog_bar=True, sync_dist=True)
        self.scores.log_validation(self, metrics)

    def on_test_epoch_start(self) -> None:
        """A problem that decides with thresholds chooses them on the validation split, for the tested weights
        (every rank reads the whole split, so all choose the same)."""
        calibrate = getattr(self.problem, "calibrate", None)
        datamodule = self.trainer.datamodule
        if calibrate is None or datamodule is None or "val" not in getattr(datamodule, "datasets", {}):
            return
        loader = DataLoader(datamodule.datasets["val"], batch_size=datamodule.eval_batch_size,
                            collate_fn=datamodule.collate_fn())
        preds, targets = [], []
        with torch.inference_mode():
            for batch in loader:
                batch = self.transfer_batch_to_device(batch, self.device, 0)
                p, t = self.problem.metric_inputs(self(batch), batch[LABELS])
                preds.append(p)
                targets.append(t)
        calibrate(torch.cat(preds), torch.cat(targets))

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, outputs = self._step(batch)
        self.scores.update("test", outputs, batch[LABELS])
        self.log("test/loss", loss, sync_dist=True, batch_size=len(batch[LABELS]))

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.scores.compute("test"), sync_dist=True)

    def export_model(self) -> nn.Module:
        """The network `model/` holds (written by `tunelab.artifacts.save`): with LoRA, adapters merged in; its
        outputs as the problem answers from them (e.g. regression in the targets' units)."""
        return self.problem.finalize(self.plain(self.model))
