"""Domain-adversarial training (Ganin et al., "Domain-Adversarial Training of Neural Networks", 2016).

One backbone feeds two heads: the label classifier, trained on the labelled source, and a domain
discriminator, trained on source and target features through a gradient reversal layer, so the
same backward pass that sharpens the discriminator pushes the features to hide the domain. The
reversal strength follows the paper's schedule `2 / (1 + exp(-gamma * p)) - 1` over the training
progress `p`. With `adapt=false` the discriminator is gone and the target is never seen in
training: the source-only baseline, one override away.

Target labels are used only to score the model (`val/target/*`, `test/target/*`); the tested
checkpoint is the last one unless `monitor.metric` picks another, so nothing about the target's
labels leaks into training.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from lightning import LightningDataModule
from torch import nn
from torchmetrics.classification import BinaryAccuracy

from tunelab.contracts import INPUT_IDS, LABELS, PIXEL_VALUES, SOURCE, TARGET
from tunelab.data.domain import DOMAINS
from tunelab.errors import TunelabError
from tunelab.models.grl import GradientReversal, dann_lambda
from tunelab.models.heads import Bottleneck, DomainDiscriminator
from tunelab.models.tuning import Tuning
from tunelab.tasks.base import Task

STAGES = ("train", "val", "test")


def dann_lr_schedule(optimizer: torch.optim.Optimizer, num_training_steps: int, alpha: float = 10.0,
                     beta: float = 0.75) -> torch.optim.lr_scheduler.LambdaLR:
    """The paper's annealing `lr0 / (1 + alpha * p) ** beta`, p the training progress in [0, 1]."""
    total = max(1, int(num_training_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (1.0 + alpha * min(step / total, 1.0)) ** -beta)


def concat_inputs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """One model batch from two domains (labels left out); text is padded to the longer sequence.

    One forward pass over both domains lets batch norm see them together, as in the paper.
    """
    out = {}
    for key in a.keys() & b.keys():
        if key == LABELS:
            continue
        x, y = a[key], b[key]
        if x.dim() >= 2 and x.shape[1:] != y.shape[1:]:
            length = max(x.shape[1], y.shape[1])
            value = pad_id if key == INPUT_IDS else 0
            x, y = (F.pad(t, (0, length - t.shape[1]), value=value) for t in (x, y))
        out[key] = torch.cat([x, y])
    return out


class DANNTask(Task):
    """Backbone, optional bottleneck, label classifier and (when adapting) a domain discriminator."""

    def __init__(
        self,
        model: Callable[..., nn.Module],
        datamodule: LightningDataModule,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        *,
        adapt: bool = True,
        domain_weight: float = 1.0,
        gamma: float = 10.0,
        lambda_max: float = 1.0,
        bottleneck_dim: int | None = None,
        discriminator_hidden: list[int] | tuple[int, ...] = (1024, 1024),
        discriminator_batch_norm: bool = False,
        discriminator_dropout: float = 0.5,
        tuning: Tuning | None = None,
        embed_samples: int = 500,
    ) -> None:
        super().__init__(optimizer, scheduler, tuning)
        if not hasattr(datamodule, "target"):
            raise TunelabError(
                f"task=dann needs a domain pair as data, got {type(datamodule).__name__} (expected e.g. "
                "data=digits_pair, data=reviews_pair, data=image_folder_pair or data=text_files_pair)"
            )
        self.problem = datamodule.problem
        self.labels = list(datamodule.labels)
        self.tokenizer = getattr(datamodule, "tokenizer", None)
        self.model = model(head="classifier", labels=self.labels, tokenizer=self.tokenizer,
                           problem_type=self.problem.hf_problem_type)
        self.problem.prepare(self.model, fresh_head=getattr(self.model, "fresh_head", True))
        if bottleneck_dim and hasattr(self.model, "target_scale"):
            raise TunelabError(f"task.bottleneck_dim: problem={self.problem.name} scales the model's own head, which "
                               "a bottleneck replaces in training (expected task.bottleneck_dim=null)")
        self.tune()
        self.adapt, self.domain_weight = adapt, domain_weight
        self.gamma, self.lambda_max = gamma, lambda_max
        self.embed_samples = embed_samples
        self.pad_id = int(getattr(self.tokenizer, "pad_token_id", None) or 0)

        width = self.model.feature_size
        self.heads = nn.ModuleDict()
        if bottleneck_dim:
            self._check_foldable(width)
            self.heads["bottleneck"] = Bottleneck(width, bottleneck_dim)
            self.heads["classifier"] = nn.Linear(bottleneck_dim, len(self.labels))
            self.model.classifier.requires_grad_(False)  # replaced in training, rewritten at export
            width = bottleneck_dim
        if adapt:
            self.heads["discriminator"] = DomainDiscriminator(width, discriminator_hidden, discriminator_batch_norm,
                                                              discriminator_dropout)
        self.grl = GradientReversal(0.0)

        self.metrics = nn.ModuleDict({
            f"{stage}_{domain}": self.problem.metrics().clone(prefix=f"{stage}/{domain}/")
            for stage in STAGES for domain in DOMAINS
        })
        self.domain_acc = nn.ModuleDict({f"{stage}_domain": BinaryAccuracy() for stage in STAGES})
        self._embedded: list[tuple[torch.Tensor, int, torch.Tensor, torch.Tensor | None]] = []

    def _check_foldable(self, width: int) -> None:
        head = self.model.classifier
        if not (isinstance(head, nn.Linear) and head.in_features == width):
            raise TunelabError(
                f"task.bottleneck_dim needs a model whose classifier is one linear layer on the features (got "
                f"{type(head).__name__}), so the bottleneck folds into it at export; set task.bottleneck_dim=null"
            )

    # ----------------------------------------------------------------- the network
    def lr_groups(self) -> list:
        return [*super().lr_groups(), ("adaptation", self.heads, 1.0, lambda _: True)]

    def features_and_logits(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The features the discriminator sees (after the bottleneck, if any) and the class logits."""
        out = self.model(batch)
        if "bottleneck" not in self.heads:
            return out.features, out.logits
        features = self.heads["bottleneck"](out.features)
        return features, self.heads["classifier"](features)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.features_and_logits(batch)[1]

    def progress(self) -> float:
        """Training progress p in [0, 1], from the steps the Trainer will take in total."""
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 0
        return min(1.0, self.global_step / total) if total and total != float("inf") else 0.0

    # ----------------------------------------------------------------- training
    def training_step(self, batch: dict[str, dict[str, torch.Tensor]], batch_idx: int) -> torch.Tensor:
        source, target = batch[SOURCE], batch[TARGET]
        n = len(source[LABELS])
        if not self.adapt:  # the source-only baseline never looks at the target
            _, logits = self.features_and_logits(source)
            loss = self._classification_loss(logits, source[LABELS], "train")
            self.log("train/loss", loss, prog_bar=True, batch_size=n)
            return loss
        features, logits = self.features_and_logits(concat_inputs(source, target, self.pad_id))
        cls_loss = self._classification_loss(logits[:n], source[LABELS], "train")
        self.grl.lambd = dann_lambda(self.progress(), self.gamma, self.lambda_max)
        domain_logits = self.heads["discriminator"](self.grl(features))
        domain = torch.cat([torch.zeros(n), torch.ones(len(features) - n)]).to(domain_logits)
        domain_loss = F.binary_cross_entropy_with_logits(domain_logits, domain)
        loss = cls_loss + self.domain_weight * domain_loss
        self.domain_acc["train_domain"](domain_logits, domain.long())
        self.log_dict({"train/loss": loss, "train/domain_loss": domain_loss, "train/lambda": self.grl.lambd},
                      prog_bar=True, batch_size=len(features))
        self.log("train/domain_acc", self.domain_acc["train_domain"], on_step=False, on_epoch=True, batch_size=len(features))
        return loss

    def _classification_loss(self, logits: torch.Tensor, labels: torch.Tensor, stage: str) -> torch.Tensor:
        loss = self.problem.loss(logits, labels)
        metrics = self.metrics[f"{stage}_source"]
        metrics(*self.problem.metric_inputs(logits.detach(), labels))
        self.log(f"{stage}/source/cls_loss", loss, batch_size=len(labels))
        self.log_dict(metrics, on_step=False, on_epoch=True, batch_size=len(labels))
        return loss

    # ----------------------------------------------------------------- evaluation, per domain
    def _eval_step(self, batch: dict[str, torch.Tensor], dataloader_idx: int, stage: str) -> torch.Tensor:
        domain = DOMAINS[dataloader_idx]
        features, logits = self.features_and_logits(batch)
        labels = batch[LABELS]
        self.metrics[f"{stage}_{domain}"].update(*self.problem.metric_inputs(logits, labels))
        self.log(f"{stage}/{domain}/loss", self.problem.loss(logits, labels), batch_size=len(labels),
                 add_dataloader_idx=False, sync_dist=True)
        if "discriminator" in self.heads:
            domain_logits = self.heads["discriminator"](features)
            self.domain_acc[f"{stage}_domain"].update(domain_logits, torch.full((len(labels),), dataloader_idx,
                                                                                device=domain_logits.device))
        return features

    def _eval_epoch_end(self, stage: str) -> None:
        results = {}
        for domain in DOMAINS:
            metrics = self.metrics[f"{stage}_{domain}"]
            if any(m.update_count for m in metrics.values()):
                results.update(metrics.compute())
            metrics.reset()
        accuracy = self.domain_acc[f"{stage}_domain"]
        if "discriminator" in self.heads and accuracy.update_count:
            results[f"{stage}/domain_acc"] = accuracy.compute()
        accuracy.reset()
        self.log_dict(results, prog_bar=stage == "val", sync_dist=True)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        features = self._eval_step(batch, dataloader_idx, "test")
        self._keep_for_projector(features, dataloader_idx, batch)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")
        self._write_projector()

    # ----------------------------------------------------------------- embedding projector
    def _keep_for_projector(self, features: torch.Tensor, domain: int, batch: dict[str, torch.Tensor]) -> None:
        kept = sum(len(f) for f, d, _, _ in self._embedded if d == domain)
        room = self.embed_samples - kept
        if room <= 0:
            return
        images = batch.get(PIXEL_VALUES)
        thumbs = None if images is None else _thumbnails(images[:room])
        self._embedded.append((features[:room].detach().float().cpu(), domain, batch[LABELS][:room].cpu(), thumbs))

    def _write_projector(self) -> None:
        """Source and target test features in TensorBoard's projector, labelled by domain and class."""
        from lightning.pytorch.loggers import TensorBoardLogger

        kept, self._embedded = self._embedded, []
        loggers = [lg for lg in self.loggers if isinstance(lg, TensorBoardLogger)]
        if not kept or not loggers or not self.trainer.is_global_zero:
            return
        features = torch.cat([f for f, _, _, _ in kept])
        metadata = [[DOMAINS[d], self.labels[int(y)] if y.dim() == 0 else str(y.tolist())]
                    for _, d, ys, _ in kept for y in ys]
        images = torch.cat([t for _, _, _, t in kept]) if all(t is not None for *_, t in kept) else None
        tag = "features/" + ("adapted" if self.adapt else "source_only")
        for logger in loggers:
            logger.experiment.add_embedding(features, metadata=metadata, metadata_header=["domain", "class"],
                                            label_img=images, tag=tag, global_step=self.global_step)

    def export_model(self) -> nn.Module:
        """The adapted classifier as a plain model of its usual architecture.

        A bottleneck is affine in eval mode, so `classifier(bottleneck(x))` is written into the
        model's own linear classifier: the export has the same logits.
        """
        if "bottleneck" in self.heads:
            self.heads.eval()
            self.heads["bottleneck"].fold_into(self.heads["classifier"], self.model.classifier)
        return self.problem.finalize(self.plain(self.model))


def _thumbnails(images: torch.Tensor, size: int = 32) -> torch.Tensor:
    """Small [0, 1] images for the projector's sprite (each image stretched to its own range)."""
    x = images.detach().float().cpu()
    if x.shape[-1] > size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-6)
