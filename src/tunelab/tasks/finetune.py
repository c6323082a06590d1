"""Fine-tuning: a pretrained (or from-scratch) backbone and a classification head, trained on labels.

Full fine-tuning, head-only (`freeze_backbone`) and a separate backbone learning rate
(`backbone_lr_mult`) are switches of the same task.
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
from tunelab.tasks.base import Task, classification_metrics, log_confusion_matrix


def head_and_backbone(model: nn.Module) -> tuple[set[int], Callable[[str], bool]]:
    """Ids of the head's parameters, and a predicate that is true for backbone parameter names."""
    head_ids = {id(p) for p in model.classifier.parameters()}
    names = {n for n, p in model.named_parameters() if id(p) not in head_ids}
    return head_ids, lambda name: name in names


class FinetuneTask(Task):
    """Cross-entropy on labelled data, with accuracy and macro-F1 for every split."""

    learns_from_unlabelled = False

    def __init__(
        self,
        model: Callable[..., nn.Module],
        datamodule: LightningDataModule,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        backbone_lr_mult: float = 1.0,
        freeze_backbone: bool = False,
        label_smoothing: float = 0.0,
    ) -> None:
        if getattr(datamodule, "unlabelled_file", None) and not self.learns_from_unlabelled:
            raise TunelabError(
                f"data.unlabelled_file={datamodule.unlabelled_file}: unlabelled records are a transfer set for "
                "task=distill, whose teacher labels them (expected data.unlabelled_file=null for this task)"
            )
        super().__init__(optimizer, scheduler, backbone_lr_mult, freeze_backbone)
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
        _, self._is_backbone = head_and_backbone(self.model)
        if freeze_backbone:
            for name, p in self.model.named_parameters():
                p.requires_grad_(not self._is_backbone(name))

    def lr_groups(self) -> list:
        return [("backbone", self.model, self.backbone_lr_mult, self._is_backbone),
                ("head", self.model, 1.0, lambda n: not self._is_backbone(n))]

    def on_train_epoch_start(self) -> None:
        if self.freeze_backbone:  # a frozen backbone keeps its batch-norm statistics and no dropout
            self.model.eval()
            self.model.classifier.train()

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
        """The network `model/` holds (written by `tunelab.artifacts.save`)."""
        return self.model
