"""Knowledge distillation: a small student learns from a frozen teacher's soft labels and the hard labels.

The loss is Hinton et al.'s `alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(p_teacher^T || p_student^T)`,
optionally plus hidden-state matching (through learned projections when widths differ) and, for text,
attention-map matching (`tunelab.tasks.distill_losses`). The teacher (`tunelab.models.teacher`, loaded by
`tunelab.tasks.teacher`) is frozen and is never part of this module's state; with `cache_teacher` its
training-set outputs are read from a memory-mapped cache (`tunelab.data.teacher_cache`) instead of recomputed
every epoch. `task.alpha=1` trains the same student on the labels alone, the no-distillation baseline.
Settings and the fit of teacher, student and data are checked first (`tunelab.tasks.distill_checks`); layers
are paired and copied by `tunelab.models.surgery`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from lightning import LightningDataModule
from torch import nn
from torchmetrics import MeanMetric

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
        student: str = "auto",
        student_layers: int | None = None,
        cache_teacher: bool = False,
        cache_dir: str = ".cache",
        tuning: Tuning | None = None,
        latency_repeats: int = 20,
    ) -> None:
        check_settings(alpha, temperature, hidden_weight, hidden_loss, attention_weight, cache_teacher)
        if alpha >= 1:  # the baseline: no distillation at all, so one switch compares any recipe with it
            hidden_weight = attention_weight = 0.0
        loaded = teacher()  # first: a missing teacher is the likeliest mistake, and says how to make one
        check_data_fits(loaded, datamodule)
        if student not in ("auto", "model"):
            raise TunelabError(f"task.student={student!r} (expected auto: the teacher's own architecture with fewer "
                               "layers when the teacher grew from a pretrained checkpoint; or model: model=)")
        self.student_kind = "teacher_layers" if student == "auto" and smaller_copy_fits(loaded) else "model"
        if self.student_kind == "model":
            check_student_vocab(model, datamodule)
        else:
            model, init_from_teacher = smaller_copy(loaded, student_layers), True
        model = initialised(model, loaded, init_layers) if init_from_teacher else model
        super().__init__(model, datamodule, optimizer, scheduler, tuning, tune_now=False)
        self.teacher = loaded  # a plain object: not a submodule, so never trained, saved, exported or put in train()
        self.alpha, self.temperature = alpha, temperature
        self.hidden_weight, self.hidden_kind, self.attention_weight = hidden_weight, hidden_loss, attention_weight
        self.latency_repeats = latency_repeats
        self.tune()  # after copying teacher layers (`initialised`): LoRA renames the layers it adapts
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
        self.agreement = nn.ModuleDict({s: MeanMetric() for s in ("train_", "val_", "test_")})
        # the teacher is scored as it decides on its own (its card's problem: e.g. its own label thresholds)
        self.teacher_problem = loaded.problem or self.problem
        self.teacher_scores = nn.ModuleDict({s: self.teacher_problem.metrics() for s in ("val_", "test_")})
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
                         self.problem)
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
        self.scores.update("train", out.logits.detach(), batch[LABELS])
        if "logits" in teacher:
            self.agreement["train_"].update(self.problem.agreement(out.logits.detach(), teacher["logits"]), n)
            self.log("train/agreement", self.agreement["train_"], on_step=False, on_epoch=True, batch_size=n)
        return total

    def _eval_step(self, batch: dict[str, torch.Tensor], batch_idx: int, split: str) -> torch.Tensor:
        """Student loss and KD on an evaluation batch, the teacher's metrics and agreement; the teacher runs once
        per batch."""
        logits = self(batch)
        key = (split, batch_idx)
        if key not in self._eval_teacher:
            self._eval_teacher[key] = self.teacher(batch).logits
        teacher_logits = self._eval_teacher[key]
        labels = batch[LABELS]
        n = len(labels)
        self.log(f"{split}/loss", self.problem.loss(logits, labels), sync_dist=True, batch_size=n)
        self.log(f"{split}/kd", self.problem.soft_loss(logits, teacher_logits, self.temperature), sync_dist=True,
                 batch_size=n)
        self.agreement[f"{split}_"].update(self.problem.agreement(logits, teacher_logits), n)
        preds, target = self.teacher_problem.metric_inputs(teacher_logits, labels)
        if len(target):
            self.teacher_scores[f"{split}_"].update(preds, target)
        self.scores.update(split, logits, labels)
        return logits

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_teacher_metrics("val")
        super().on_validation_epoch_end()

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        if batch_idx == 0:
            self._latency_batch = {k: v[:8] for k, v in batch.items() if torch.is_tensor(v)}
        self._eval_step(batch, batch_idx, "test")

    def on_test_epoch_end(self) -> None:
        teacher_value = self._log_teacher_metrics("test")
        monitor = self.problem.monitor
        student = self.scores.compute("test")
        self.log_dict(student, sync_dist=True)
        student_value = student[f"test/{monitor}"]
        student_params = sum(p.numel() for p in self.model.parameters())
        teacher_params = self.teacher.num_parameters()
        values = {f"test/{monitor}_ratio": student_value / teacher_value.clamp(min=1e-8),
                  "test/student_params": float(student_params), "test/teacher_params": float(teacher_params),
                  "test/param_ratio": student_params / teacher_params}
        if self._latency_batch is not None:
            student_ms, teacher_ms = cpu_latency(self.model, self.teacher.net, self._latency_batch,
                                                 self.latency_repeats)
            values |= {"test/student_latency_ms": student_ms, "test/teacher_latency_ms": teacher_ms,
                       "test/latency_ratio": student_ms / teacher_ms}
        self.log_dict({k: torch.as_tensor(float(v)) for k, v in values.items()})

    def _log_teacher_metrics(self, split: str) -> torch.Tensor:
        """`<split>/teacher_<monitor>` and `<split>/agreement`; returns the teacher's monitored value."""
        monitor = self.problem.monitor
        teacher_value = self.teacher_scores[f"{split}_"].compute()[monitor]
        self.log_dict({f"{split}/teacher_{monitor}": teacher_value,
                       f"{split}/agreement": self.agreement[f"{split}_"].compute()}, sync_dist=True)
        self.teacher_scores[f"{split}_"].reset()
        self.agreement[f"{split}_"].reset()
        return teacher_value

    def lr_groups(self) -> list:
        return [*super().lr_groups(), ("projections", self.projections, 1.0, lambda _: True)]


# ----------------------------------------------------------------------------------------------- the student
def smaller_copy_fits(teacher: Teacher) -> bool:
    """`task.student=auto` makes the student from the teacher's own layers: for a text teacher that grew from a
    pretrained checkpoint, whose layers know the language (a from-scratch student would start from nothing)."""
    return teacher.modality == "text" and teacher.pretrained and teacher.head == "classifier"


def smaller_copy(teacher: Teacher, layers: int | None) -> Callable[..., nn.Module]:
    """A model factory for the teacher's architecture and widths with `layers` (default: half) layers: what
    DistilBERT-style students are, reading the teacher's tokenizer (`conf/teacher/data`)."""
    import copy

    from transformers import AutoModelForSequenceClassification

    from tunelab.models.text import TextModel

    config = copy.deepcopy(teacher.net.net.config)
    n = layers or max(1, config.num_hidden_layers // 2)
    if not 1 <= n <= config.num_hidden_layers:
        raise TunelabError(f"task.student_layers={layers} (expected 1 to the teacher's {config.num_hidden_layers})")
    config.num_hidden_layers = n

    def build(**kwargs: Any) -> nn.Module:
        net = AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa")
        return TextModel("classifier", kwargs.get("labels"), net=net)

    return build


def initialised(model: Callable[..., nn.Module], teacher: Teacher, layers: list[int] | None) -> Callable[..., nn.Module]:
    """The model factory, its networks started from teacher layers (`init_from`), head included: before the
    problem prepares the head, which then sees a trained one."""

    def build(**kwargs: Any) -> nn.Module:
        net = model(**kwargs)
        init_from(net, teacher, layers)
        net.fresh_head = False
        return net

    return build


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
