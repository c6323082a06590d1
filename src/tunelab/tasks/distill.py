"""Knowledge distillation: a small student learns from a frozen teacher's soft labels and the hard labels.

The loss is Hinton et al.'s `alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(p_teacher^T || p_student^T)`,
optionally plus hidden-state matching (through learned projections when widths differ) and, for text,
attention-map matching (`tunelab.tasks.distill_losses`). The teacher (see `tunelab.models.teacher`) is frozen
and is never part of this module's state; with `cache_teacher` its training-set outputs are read from a
memory-mapped cache (`tunelab.data.teacher_cache`) instead of recomputed every epoch. `task.alpha=1` trains the
same student on the labels alone, the no-distillation baseline. Settings and the fit of teacher, student and
data are checked first (`tunelab.tasks.distill_checks`); layers are paired and copied by `tunelab.models.surgery`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from lightning import LightningDataModule
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from tunelab.contracts import ATTENTION_MASK, IGNORE_INDEX, INDEX, INPUT_IDS, LABELS
from tunelab.data.teacher_cache import TeacherCache, check_static, load_or_build
from tunelab.errors import TunelabError
from tunelab.latency import cpu_latency
from tunelab.models.surgery import attention_pairs, init_from, outputs_by_layer, projection, resolve_layer_map
from tunelab.models.teacher import Teacher
from tunelab.models.tuning import Tuning
from tunelab.tasks.distill_checks import check_attention, check_data_fits, check_settings, check_student_vocab
from tunelab.tasks.distill_losses import (
    attention_loss,
    hidden_loss,
    kd_loss,
    masked_kd_loss,
    soft_target_loss,
)
from tunelab.tasks.finetune import FinetuneTask
from tunelab.tasks.mlm import MLMTask


# ----------------------------------------------------------------------------------------------- the task
class DistillTask(FinetuneTask):
    """Fine-tuning a student with a teacher's soft labels: hard + soft loss, agreement, size and speed ratios."""

    learns_from_unlabelled = True  # the teacher labels a transfer set (data.unlabelled_file)

    def __init__(
        self,
        model: Callable[..., nn.Module],
        teacher: Callable[[], Teacher],
        datamodule: LightningDataModule,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        alpha: float = 0.5,
        temperature: float = 2.0,
        hidden_weight: float = 0.0,
        hidden_loss: str = "mse",
        layer_map: dict[Any, Any] | None = None,
        attention_weight: float = 0.0,
        init_from_teacher: bool = False,
        init_layers: list[int] | None = None,
        cache_teacher: bool = False,
        cache_dir: str = ".cache",
        tuning: Tuning | None = None,
        label_smoothing: float = 0.0,
        latency_repeats: int = 20,
    ) -> None:
        check_settings(alpha, temperature, hidden_weight, hidden_loss, attention_weight, cache_teacher)
        if alpha >= 1:  # the baseline: no distillation at all, so one switch compares any recipe with it
            hidden_weight = attention_weight = 0.0
        loaded = teacher()  # first: a missing teacher is the likeliest mistake, and says how to make one
        check_data_fits(loaded, datamodule)
        check_student_vocab(model, datamodule)
        super().__init__(model, datamodule, optimizer, scheduler, tuning, label_smoothing, tune_now=False)
        self.teacher = loaded  # a plain object: not a submodule, so never trained, saved, exported or put in train()
        self.alpha, self.temperature = alpha, temperature
        self.hidden_weight, self.hidden_kind, self.attention_weight = hidden_weight, hidden_loss, attention_weight
        self.latency_repeats = latency_repeats
        if init_from_teacher:
            init_from(self.model, loaded, init_layers)
        self.tune()  # after copying teacher layers: LoRA renames the layers it adapts
        wants_map = hidden_weight > 0 or attention_weight > 0
        self.layer_map = resolve_layer_map(layer_map, self.model, loaded) if wants_map else {}
        self.attention_pairs = attention_pairs(self.layer_map) if attention_weight > 0 else []
        if attention_weight > 0:
            check_attention(self.attention_pairs, self.model, loaded)
        self.projections = nn.ModuleDict({f"{s}_{t}": projection(self.model.feature_size, loaded.width())
                                          for s, t in self.layer_map.items()} if hidden_weight > 0 else {})
        self.cache_teacher = cache_teacher and self.uses_teacher_in_training
        self.cache_dir = cache_dir
        self._datamodule = datamodule
        self.cache: TeacherCache | None = None
        if self.cache_teacher:
            check_static(datamodule.datasets["train"], datamodule.collate_fn())
            if not getattr(datamodule, "with_index", False):
                raise TunelabError("task.cache_teacher=true reads the teacher's outputs by sample index, but the "
                                   "DataModule gives no index (configure it with tunelab.train.configure_data)")
        k = len(self.labels)
        self.agreement = nn.ModuleDict({s: MulticlassAccuracy(k, average="micro") for s in ("train_", "val_", "test_")})
        self.teacher_acc = nn.ModuleDict({s: MulticlassAccuracy(k, average="micro") for s in ("val_", "test_")})
        self._eval_teacher: dict[tuple[str, int], torch.Tensor] = {}  # teacher logits per eval batch: run once
        self._latency_batch: dict[str, torch.Tensor] | None = None

    # --------------------------------------------------------------------------- what the teacher gives
    @classmethod
    def data_needs(cls, options: Any) -> set[str]:
        """The teacher cache looks outputs up by sample index (unused when the teacher turns out not to be needed
        in training, e.g. alpha=1: the task decides that once it has its models)."""
        return {INDEX} if options.get("cache_teacher") else set()

    @property
    def uses_teacher_in_training(self) -> bool:
        return self.alpha < 1 or bool(self.layer_map)

    @property
    def text_layers(self) -> bool:
        """Whether per-token hidden states are matched (pooled `features` come with every forward pass)."""
        return self.hidden_weight > 0 and any(isinstance(s, int) for s in self.layer_map)

    def _place_teacher(self) -> None:
        dtype = next(self.model.parameters()).dtype
        self.teacher.net.to(device=self.device, dtype=dtype if dtype.is_floating_point else None)

    def on_fit_start(self) -> None:
        self._place_teacher()
        if self.cache_teacher:
            dm = self._datamodule
            layers = list(self.layer_map.values()) if self.hidden_weight > 0 else []
            args = (self.teacher, dm.datasets["train"], dm.collate_fn(), dm.eval_batch_size, layers, self.cache_dir)
            if self.trainer.is_global_zero:
                load_or_build(*args, build=True)
            self.trainer.strategy.barrier("teacher_cache")
            self.cache = load_or_build(*args, build=False)

    def on_validation_start(self) -> None:
        self._place_teacher()

    def on_test_start(self) -> None:
        self._place_teacher()

    def _teacher_train_outputs(self, batch: dict[str, torch.Tensor]) -> dict[Any, torch.Tensor]:
        """Logits and matched layers for a training batch: from the cache, or from the teacher."""
        if self.cache is not None:
            seq_len = batch[INPUT_IDS].shape[1] if INPUT_IDS in batch else None
            rows = self.cache.lookup(batch[INDEX], self.device, seq_len)
            out: dict[Any, torch.Tensor] = {"logits": rows["logits"]}
            for t in self.layer_map.values():
                if self.hidden_weight > 0:
                    out[t] = rows["features" if t == "features" else f"hidden_{t}"]
            return out
        return self._teacher_live(batch)

    def _teacher_live(self, batch: dict[str, torch.Tensor]) -> dict[Any, torch.Tensor]:
        res = self.teacher(batch, output_hidden_states=self.text_layers, output_attentions=bool(self.attention_pairs))
        return outputs_by_layer(res, set(self.layer_map.values()) if self.hidden_weight > 0 else set(),
                                [t for _, t in self.attention_pairs])

    # --------------------------------------------------------------------------- steps
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.model(batch, output_hidden_states=self.text_layers, output_attentions=bool(self.attention_pairs))
        teacher = self._teacher_train_outputs(batch) if self.uses_teacher_in_training else {}
        losses = kd_loss(out.logits, teacher.get("logits"), batch[LABELS], self.alpha, self.temperature,
                         self.label_smoothing)
        mask = batch.get(ATTENTION_MASK)
        if self.hidden_weight > 0:
            student = outputs_by_layer(out, set(self.layer_map), [])
            losses["hidden"] = torch.stack([
                hidden_loss(self.projections[f"{s}_{t}"](student[s]), teacher[t], mask, self.hidden_kind)
                for s, t in self.layer_map.items()]).mean()
            losses["loss"] = losses["loss"] + self.hidden_weight * losses["hidden"]
        if self.attention_pairs:
            student_maps = outputs_by_layer(out, set(), [s for s, _ in self.attention_pairs])
            losses["attention"] = torch.stack([
                attention_loss(student_maps[("attention", s)], teacher[("attention", t)], mask)
                for s, t in self.attention_pairs]).mean()
            losses["loss"] = losses["loss"] + self.attention_weight * losses["attention"]
        n = len(batch[LABELS])
        total = losses.pop("loss")
        self.log("train/loss", total, prog_bar=True, batch_size=n)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, batch_size=n)
        labelled = batch[LABELS] != IGNORE_INDEX
        self.train_metrics.update(out.logits[labelled], batch[LABELS][labelled])
        if "logits" in teacher:
            self.agreement["train_"].update(out.logits, teacher["logits"].argmax(-1))
            self.log("train/agreement", self.agreement["train_"], on_step=False, on_epoch=True, batch_size=n)
        return total

    def _eval_step(self, batch: dict[str, torch.Tensor], batch_idx: int, split: str) -> torch.Tensor:
        """Student CE and KD on an evaluation batch, teacher accuracy and agreement; the teacher runs once per batch."""
        logits = self(batch)
        key = (split, batch_idx)
        if key not in self._eval_teacher:
            self._eval_teacher[key] = self.teacher(batch).logits
        teacher_logits = self._eval_teacher[key]
        labels = batch[LABELS]
        n = len(labels)
        self.log(f"{split}/loss", F.cross_entropy(logits, labels), sync_dist=True, batch_size=n)
        self.log(f"{split}/kd", soft_target_loss(logits, teacher_logits, self.temperature), sync_dist=True, batch_size=n)
        self.agreement[f"{split}_"].update(logits, teacher_logits.argmax(-1))
        self.teacher_acc[f"{split}_"].update(teacher_logits, labels)
        return logits

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self._eval_step(batch, batch_idx, "val")
        self.val_metrics.update(logits, batch[LABELS])
        self.val_confusion.update(logits, batch[LABELS])

    def on_validation_epoch_end(self) -> None:
        self._log_teacher_metrics("val")
        super().on_validation_epoch_end()

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        if batch_idx == 0:
            self._latency_batch = {k: v[:8] for k, v in batch.items() if torch.is_tensor(v)}
        logits = self._eval_step(batch, batch_idx, "test")
        self.test_metrics(logits, batch[LABELS])
        self.log_dict(self.test_metrics, on_step=False, on_epoch=True, batch_size=len(batch[LABELS]))

    def on_test_epoch_end(self) -> None:
        teacher_acc = self._log_teacher_metrics("test")
        student_acc = self.test_metrics["acc"].compute()
        student_params = sum(p.numel() for p in self.model.parameters())
        teacher_params = self.teacher.num_parameters()
        values = {"test/acc_ratio": student_acc / teacher_acc.clamp(min=1e-8),
                  "test/student_params": float(student_params), "test/teacher_params": float(teacher_params),
                  "test/param_ratio": student_params / teacher_params}
        if self._latency_batch is not None:
            student_ms, teacher_ms = cpu_latency(self.model, self.teacher.net, self._latency_batch,
                                                 self.latency_repeats)
            values |= {"test/student_latency_ms": student_ms, "test/teacher_latency_ms": teacher_ms,
                       "test/latency_ratio": student_ms / teacher_ms}
        self.log_dict({k: torch.as_tensor(float(v)) for k, v in values.items()})

    def _log_teacher_metrics(self, split: str) -> torch.Tensor:
        teacher_acc = self.teacher_acc[f"{split}_"].compute()
        self.log_dict({f"{split}/teacher_acc": teacher_acc, f"{split}/agreement": self.agreement[f"{split}_"].compute()},
                      sync_dist=True)
        self.teacher_acc[f"{split}_"].reset()
        self.agreement[f"{split}_"].reset()
        return teacher_acc

    def lr_groups(self) -> list:
        return [*super().lr_groups(), ("projections", self.projections, 1.0, lambda _: True)]


# ----------------------------------------------------------------------------------------------- masked LM
class MaskedLMDistillTask(MLMTask):
    """Masked-LM pretraining of a small student with a masked-LM teacher's predictions as soft targets.

    Both models predict only the masked positions (the collator's `mlm_labels`), so the soft-target loss
    compares vocabulary distributions there and nowhere else; everything else is `task=mlm`.
    """

    def __init__(
        self,
        model: Callable[..., nn.Module],
        teacher: Callable[[], Teacher],
        datamodule: LightningDataModule,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        alpha: float = 0.5,
        temperature: float = 2.0,
        sparse_head: bool = True,
        num_examples: int = 3,
        tuning: Tuning | None = None,
    ) -> None:
        check_settings(alpha, temperature, 0.0, "mse", 0.0, False)
        loaded = teacher()
        if loaded.head != "masked_lm":
            raise TunelabError("task.teacher: a masked-LM student needs a masked-LM teacher (expected teacher.head="
                               "masked_lm and a model like the model/ of a `python train.py task=mlm` run)")
        check_data_fits(loaded, datamodule, labels=False)
        check_student_vocab(model, datamodule)
        super().__init__(model, datamodule, optimizer, scheduler, sparse_head, num_examples, tuning)
        loaded.net.sparse_mlm = True  # the teacher's rows follow the same masked positions as the student's
        self.teacher, self.alpha, self.temperature = loaded, alpha, temperature

    def on_fit_start(self) -> None:
        self.teacher.to(self.device)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits, targets = self(batch)
        teacher_logits = self.teacher(batch).logits if self.alpha < 1 else None  # alpha=1: the baseline
        losses = masked_kd_loss(logits, teacher_logits, targets, self.alpha, self.temperature)
        n = int((targets != IGNORE_INDEX).sum())
        self.acc["train_acc"].update(logits, targets)
        total = losses.pop("loss")
        self.log("train/loss", total, prog_bar=True, batch_size=n)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, batch_size=n)
        self.log("train/acc", self.acc["train_acc"], on_step=False, on_epoch=True)
        return total
