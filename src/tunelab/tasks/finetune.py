"""Fine-tuning: a pretrained (or from-scratch) backbone and a classification head, trained on labels.

How much of the backbone trains (full, head only, top k blocks, BitFit, LoRA, layer-wise rates) is the
`tuning` the task is given (`tunelab.models.tuning`); with LoRA the export is the merged network.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from lightning import LightningDataModule
from torch import nn
from torchmetrics import MaxMetric
from torchmetrics.classification import MulticlassConfusionMatrix

from tunelab.contracts import LABELS
from tunelab.errors import TunelabError
from tunelab.models.tuning import Tuning
from tunelab.tasks.base import Task, classification_metrics, log_confusion_matrix


class FinetuneTask(Task):
    """Cross-entropy on labelled data, with accuracy and macro-F1 for every split."""

    learns_from_unlabelled = False

    def __init__(
        self,
        model: Callable[..., nn.Module],
        datamodule: LightningDataModule,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        tuning: Tuning | None = None,
        label_smoothing: float = 0.0,
        tune_now: bool = True,
    ) -> None:
        """`tune_now=False`: a subclass changes the model first and calls `self.tune()` itself."""
        if getattr(datamodule, "unlabelled_file", None) and not self.learns_from_unlabelled:
            raise TunelabError(
                f"data.unlabelled_file={datamodule.unlabelled_file}: unlabelled records are a transfer set for "
                "task=distill, whose teacher labels them (expected data.unlabelled_file=null for this task)"
            )
        super().__init__(optimizer, scheduler, tuning)
        self.labels = list(datamodule.labels)
        self.tokenizer = getattr(datamodule, "tokenizer", None)
        self.data_config = getattr(datamodule, "data_config", None)  # image preprocessing, for the export
        self.model = model(head="classifier", labels=self.labels, tokenizer=self.tokenizer)
        self.label_smoothing = label_smoothing
        k = len(self.labels)
        self.train_metrics = classification_metrics(k).clone(prefix="train/")
        self.val_metrics = classification_metrics(k).clone(prefix="val/")
        self.test_metrics = classification_metrics(k).clone(prefix="test/")
        self.val_acc_best = MaxMetric()
        self.val_confusion = MulticlassConfusionMatrix(k)
        if tune_now:
            self.tune()

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(batch).logits

    def _step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(batch)
        loss = F.cross_entropy(logits, batch[LABELS], label_smoothing=self.label_smoothing)
        return loss, logits

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, logits = self._step(batch)
        n = len(batch[LABELS])
        self.train_metrics.update(logits, batch[LABELS])
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        return loss

    def on_train_epoch_end(self) -> None:
        """Training accuracy/F1 over the epoch: computed (and synchronised) once, not at every step."""
        self.log_dict(self.train_metrics.compute(), sync_dist=True)
        self.train_metrics.reset()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, logits = self._step(batch)
        n = len(batch[LABELS])
        self.val_metrics.update(logits, batch[LABELS])
        self.val_confusion.update(logits, batch[LABELS])
        self.log("val/loss", loss, sync_dist=True, batch_size=n)

    def on_validation_epoch_end(self) -> None:
        metrics = self.val_metrics.compute()
        self.val_metrics.reset()
        self.log_dict(metrics, prog_bar=True, sync_dist=True)
        self.val_acc_best(metrics["val/acc"])
        self.log("val/acc_best", self.val_acc_best.compute(), sync_dist=True)
        log_confusion_matrix(self, self.val_confusion, "val/confusion_matrix", self.labels)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, logits = self._step(batch)
        n = len(batch[LABELS])
        self.test_metrics(logits, batch[LABELS])
        self.log("test/loss", loss, sync_dist=True, batch_size=n)
        self.log_dict(self.test_metrics, on_step=False, on_epoch=True, batch_size=n)

    def export_model(self) -> nn.Module:
        """The network `model/` holds (written by `tunelab.artifacts.save`): with LoRA, adapters merged in."""
        return self.plain(self.model)
