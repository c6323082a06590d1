"""Knowledge distillation: a small student learns from a frozen teacher's soft labels and the hard labels.

The loss is Hinton et al.'s `alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(p_teacher^T || p_student^T)`,
optionally plus hidden-state matching (through learned projections when widths differ) and, for text,
attention-map matching. The teacher (see `tunelab.models.teacher`) is frozen and is never part of this
module's state; with `cache_teacher` its training-set outputs are read from a memory-mapped cache
(`tunelab.data.teacher_cache`) instead of recomputed every epoch. `task.alpha=1` trains the same student on
the labels alone, the no-distillation baseline.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from lightning import LightningDataModule
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from tunelab.artifacts import own_tokenizer
from tunelab.contracts import IGNORE_INDEX, Layer, Output
from tunelab.data.teacher_cache import TeacherCache, check_static, load_or_build
from tunelab.errors import TunelabError
from tunelab.models.teacher import Teacher
from tunelab.tasks.finetune import FinetuneTask
from tunelab.tasks.mlm import MLMTask

LAYER_INDEX = re.compile(r"(\.layers?\.)(\d+)\.")


# ----------------------------------------------------------------------------------------------- losses
def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """`T^2 * KL(softmax(teacher/T) || softmax(student/T))`, averaged over the rows (one row per prediction)."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits.float() / t, dim=-1), F.log_softmax(teacher_logits.float() / t, dim=-1),
                    reduction="batchmean", log_target=True) * t * t


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor, alpha: float,
            temperature: float, label_smoothing: float = 0.0) -> dict[str, torch.Tensor]:
    """Hinton KD: `alpha * CE + (1 - alpha) * soft-target loss`; each part returned for logging.

    CE averages over the labelled rows only: rows labelled -100 (a transfer set, `data.unlabelled_file`)
    learn from the teacher alone. Summed then divided, so a batch without labels gives 0, not NaN.
    """
    labelled = (labels != IGNORE_INDEX).sum().clamp(min=1)
    ce = F.cross_entropy(student_logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum",
                         label_smoothing=label_smoothing) / labelled
    if teacher_logits is None or alpha >= 1:
        return {"loss": ce, "ce": ce}
    kd = soft_target_loss(student_logits, teacher_logits, temperature)
    return {"loss": alpha * ce + (1 - alpha) * kd, "ce": ce, "kd": kd}


def hidden_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None, kind: str) -> torch.Tensor:
    """MSE or (1 - cosine) between matched hidden states, over real tokens only (mask: batch x length)."""
    student, teacher = student.float(), teacher.float()
    per_row = ((student - teacher) ** 2).mean(-1) if kind == "mse" else 1 - F.cosine_similarity(student, teacher, dim=-1)
    if mask is None or per_row.dim() == 1:
        return per_row.mean()
    mask = mask.to(per_row.dtype)
    return (per_row * mask).sum() / mask.sum().clamp(min=1)


def attention_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """MSE between head-averaged attention maps (batch x heads x length x length), over real token pairs."""
    diff = (student.float().mean(1) - teacher.float().mean(1)) ** 2
    if mask is None:
        return diff.mean()
    pairs = (mask[:, :, None] * mask[:, None, :]).to(diff.dtype)
    return (diff * pairs).sum() / pairs.sum().clamp(min=1)


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
        backbone_lr_mult: float = 1.0,
        freeze_backbone: bool = False,
        label_smoothing: float = 0.0,
        latency_repeats: int = 20,
    ) -> None:
        check_settings(alpha, temperature, hidden_weight, hidden_loss, attention_weight, cache_teacher)
        if alpha >= 1:  # the baseline: no distillation at all, so one switch compares any recipe with it
            hidden_weight = attention_weight = 0.0
        loaded = teacher()  # first: a missing teacher is the likeliest mistake, and says how to make one
        check_data_fits(loaded, datamodule)
        check_student_vocab(model, datamodule)
        super().__init__(model, datamodule, optimizer, scheduler, backbone_lr_mult, freeze_backbone, label_smoothing)
        self.teacher = loaded  # a plain object: not a submodule, so never trained, saved, exported or put in train()
        self.alpha, self.temperature = alpha, temperature
        self.hidden_weight, self.hidden_kind, self.attention_weight = hidden_weight, hidden_loss, attention_weight
        self.latency_repeats = latency_repeats
        if init_from_teacher:
            init_from(self.model, loaded, init_layers)
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
            datamodule.with_index = True
        k = len(self.labels)
        self.agreement = nn.ModuleDict({s: MulticlassAccuracy(k, average="micro") for s in ("train_", "val_", "test_")})
        self.teacher_acc = nn.ModuleDict({s: MulticlassAccuracy(k, average="micro") for s in ("val_", "test_")})
        self._eval_teacher: dict[tuple[str, int], torch.Tensor] = {}  # teacher logits per eval batch: run once
        self._latency_batch: dict[str, torch.Tensor] | None = None

    # --------------------------------------------------------------------------- what the teacher gives
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
            seq_len = batch["input_ids"].shape[1] if "input_ids" in batch else None
            rows = self.cache.lookup(batch["index"], self.device, seq_len)
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
        losses = kd_loss(out.logits, teacher.get("logits"), batch["labels"], self.alpha, self.temperature,
                         self.label_smoothing)
        mask = batch.get("attention_mask")
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
        n = len(batch["labels"])
        total = losses.pop("loss")
        self.log("train/loss", total, prog_bar=True, batch_size=n)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, batch_size=n)
        labelled = batch["labels"] != IGNORE_INDEX
        self.train_metrics.update(out.logits[labelled], batch["labels"][labelled])
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
        labels = batch["labels"]
        n = len(labels)
        self.log(f"{split}/loss", F.cross_entropy(logits, labels), sync_dist=True, batch_size=n)
        self.log(f"{split}/kd", soft_target_loss(logits, teacher_logits, self.temperature), sync_dist=True, batch_size=n)
        self.agreement[f"{split}_"].update(logits, teacher_logits.argmax(-1))
        self.teacher_acc[f"{split}_"].update(teacher_logits, labels)
        return logits

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self._eval_step(batch, batch_idx, "val")
        self.val_metrics.update(logits, batch["labels"])
        self.val_confusion.update(logits, batch["labels"])

    def on_validation_epoch_end(self) -> None:
        self._log_teacher_metrics("val")
        super().on_validation_epoch_end()

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        if batch_idx == 0:
            self._latency_batch = {k: v[:8] for k, v in batch.items() if torch.is_tensor(v)}
        logits = self._eval_step(batch, batch_idx, "test")
        self.test_metrics(logits, batch["labels"])
        self.log_dict(self.test_metrics, on_step=False, on_epoch=True, batch_size=len(batch["labels"]))

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
    ) -> None:
        check_settings(alpha, temperature, 0.0, "mse", 0.0, False)
        loaded = teacher()
        if loaded.head != "masked_lm":
            raise TunelabError("task.teacher: a masked-LM student needs a masked-LM teacher (expected teacher.head="
                               "masked_lm and a model like the model/ of a `python train.py task=mlm` run)")
        check_data_fits(loaded, datamodule, labels=False)
        check_student_vocab(model, datamodule)
        super().__init__(model, datamodule, optimizer, scheduler, sparse_head, num_examples)
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


def masked_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, targets: torch.Tensor,
                   alpha: float, temperature: float) -> dict[str, torch.Tensor]:
    """`kd_loss` over the predicted (masked) positions only: rows whose target is -100 are padding."""
    keep = targets != IGNORE_INDEX
    teacher_rows = teacher_logits[keep] if teacher_logits is not None else None
    return kd_loss(student_logits[keep], teacher_rows, targets[keep], alpha, temperature)


# ----------------------------------------------------------------------------------------------- checks
def check_settings(alpha: float, temperature: float, hidden_weight: float, hidden_kind: str,
                   attention_weight: float, cache_teacher: bool) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise TunelabError(f"task.alpha={alpha}: expected a weight in [0, 1] (1: labels only, no distillation)")
    if temperature <= 0:
        raise TunelabError(f"task.temperature={temperature}: expected a positive temperature (e.g. 2 or 4)")
    if hidden_weight < 0 or attention_weight < 0:
        raise TunelabError("task.hidden_weight and task.attention_weight: expected weights >= 0 (0: off)")
    if hidden_kind not in ("mse", "cosine"):
        raise TunelabError(f"task.hidden_loss={hidden_kind!r}: expected mse or cosine")
    if cache_teacher and attention_weight > 0:
        raise TunelabError("task.cache_teacher=true keeps logits and hidden states, not attention maps: set "
                           "task.attention_weight=0, or task.cache_teacher=false")


def check_data_fits(teacher: Teacher, datamodule: LightningDataModule, labels: bool = True) -> None:
    """Same modality, same label set, same tokenizer vocabulary: otherwise the soft labels mean nothing."""
    have = getattr(datamodule, "modality", None)
    if have and have != teacher.modality:
        raise TunelabError(f"teacher.path: the teacher {teacher.source} is a {teacher.modality} model but the data is "
                           f"{have} data (expected a teacher fine-tuned on this data)")
    if labels:
        check_labels(teacher, list(datamodule.labels or []))
    check_normalisation(teacher, datamodule)
    check_vocabulary(teacher, datamodule)


def check_labels(teacher: Teacher, labels: list[str]) -> None:
    if teacher.labels is not None and list(teacher.labels) != labels:
        raise TunelabError(
            f"teacher.path: the teacher {teacher.source} predicts labels {teacher.labels} but the data has {labels} "
            "(expected the same label set in the same order; data.labels fixes the data's order)"
        )
    if teacher.num_classes != len(labels):
        raise TunelabError(f"teacher.path: the teacher {teacher.source} has {teacher.num_classes} classes but the "
                           f"data has {len(labels)} ({labels})")


def check_vocabulary(teacher: Teacher, datamodule: LightningDataModule) -> None:
    data_tok = getattr(datamodule, "tokenizer", None)
    if teacher.tokenizer is not None and data_tok is not None and teacher.tokenizer.get_vocab() != data_tok.get_vocab():
        source = getattr(datamodule, "tokenizer_source", None) or "a WordPiece vocabulary trained on the data"
        raise TunelabError(
            f"the data is tokenized with {source} ({len(data_tok)} tokens) but the teacher {teacher.source} has its "
            f"own tokenizer ({len(teacher.tokenizer)} tokens) with a different vocabulary: the student must read "
            f"the teacher's tokens (expected data.tokenizer={teacher.source}, which teacher.path=<model folder> sets)"
        )


PREPROCESSING = ("mean", "std", "interpolation", "crop_pct", "crop_mode")  # input_size: data.image_size decides


def check_normalisation(teacher: Teacher, datamodule: LightningDataModule) -> None:
    """An image teacher must see pixels prepared as in its own training (normalisation, resize and crop),
    or its soft labels are noise and its accuracy drops."""
    data_config = getattr(datamodule, "data_config", None)
    pretrained = getattr(getattr(teacher.net, "net", None), "pretrained_cfg", None)
    if teacher.modality != "image" or data_config is None or not pretrained:
        return
    import timm

    want = timm.data.resolve_data_config(pretrained_cfg=dict(pretrained))

    def norm(value: Any) -> Any:
        return tuple(round(float(x), 4) for x in value) if isinstance(value, list | tuple) else value

    differ = [f"{k} {norm(data_config.get(k))} vs {norm(want.get(k))}" for k in PREPROCESSING
              if norm(data_config.get(k)) != norm(want.get(k))]
    if differ:
        raise TunelabError(
            f"the data prepares images for data.model_name={getattr(datamodule, 'model_name', None)} but the teacher "
            f"{teacher.net.name} was trained with other preprocessing ({'; '.join(differ)}; data vs teacher): set "
            f"data.model_name={teacher.net.name} so the student sees the teacher's inputs"
        )


def check_student_vocab(model: Callable[..., nn.Module], datamodule: LightningDataModule) -> None:
    """A pretrained student must share the data's (the teacher's) vocabulary, not just fit its size."""
    pretrained = getattr(model, "keywords", {}).get("pretrained")
    data_tok = getattr(datamodule, "tokenizer", None)
    if not pretrained or data_tok is None:
        return
    own = own_tokenizer(str(pretrained), bool(model.keywords.get("trust_remote_code", False)))
    if own is not None and own.get_vocab() != data_tok.get_vocab():
        raise TunelabError(
            f"model.pretrained: the student {pretrained} has its own tokenizer ({len(own)} tokens) with a vocabulary "
            f"that differs from the teacher's ({len(data_tok)} tokens); expected a student built from the teacher's "
            "tokenizer (a from-scratch model=bert_tiny, or task.init_from_teacher=true)"
        )


# ----------------------------------------------------------------------------------------------- layers
def num_layers(model: nn.Module) -> int:
    """Hidden states 0..n exist for text models; image models expose only `features`."""
    return int(model.net.config.num_hidden_layers) if getattr(model, "modality", "") == "text" else 0


def parse_layer(value: Any) -> Layer:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return value if isinstance(value, str) else int(value)


def resolve_layer_map(layer_map: dict[Any, Any] | None, student: nn.Module, teacher: Teacher) -> dict[Layer, Layer]:
    """{student layer: teacher layer}; by default each student layer is paired with the teacher layer at the
    same relative depth (text), or the pooled features (images). Names that do not exist fail here."""
    s_n, t_n = num_layers(student), teacher.num_layers()
    if layer_map is None:
        if s_n == 0 or t_n == 0:
            return {"features": "features"}
        return {s: s * t_n // s_n for s in range(1, s_n + 1)}
    resolved = {parse_layer(s): parse_layer(t) for s, t in dict(layer_map).items()}
    for side, n, names in (("student", s_n, resolved.keys()), ("teacher", t_n, resolved.values())):
        valid = f"hidden states 0..{n} and 'features'" if n else "'features' only, the pooled vector"
        for name in names:
            if name != "features" and not (isinstance(name, int) and 0 <= name <= n):
                raise TunelabError(f"task.layer_map: the {side} has no layer {name!r} (valid: {valid})")
    if not resolved:
        raise TunelabError("task.layer_map is empty (expected {student layer: teacher layer}, e.g. {2: 4})")
    for s, t in resolved.items():
        if (s == "features") != (t == "features"):
            raise TunelabError(f"task.layer_map: {s!r}: {t!r} pairs the pooled 'features' with a per-token hidden "
                               "state (expected 'features' to map to 'features', and layer numbers to layer numbers)")
    return resolved


def attention_pairs(layer_map: dict[Layer, Layer]) -> list[tuple[int, int]]:
    """Attention maps exist for transformer layers 1..n (hidden state i comes out of layer i)."""
    return [(s, t) for s, t in layer_map.items() if isinstance(s, int) and isinstance(t, int) and s > 0 and t > 0]


def check_attention(pairs: list[tuple[int, int]], student: nn.Module, teacher: Teacher) -> None:
    if teacher.modality != "text" or getattr(student, "modality", "") != "text":
        raise TunelabError("task.attention_weight > 0 matches attention maps, which only text models have "
                           "(expected task.attention_weight=0 for image models)")
    if not pairs:
        raise TunelabError("task.attention_weight > 0 but task.layer_map pairs no transformer layers (expected "
                           "student and teacher layers >= 1, e.g. {1: 2, 2: 4})")
    for net in (student.net, teacher.net.net):  # SDPA kernels do not return attention probabilities
        net.set_attn_implementation("eager")


def outputs_by_layer(out: Output, layers: set[Layer], attention_layers: list[int]) -> dict[Any, torch.Tensor]:
    """Logits plus the requested hidden states/features and attention maps, keyed by layer name."""
    res: dict[Any, torch.Tensor] = {"logits": out.logits}
    for layer in layers:
        res[layer] = out.features if layer == "features" else out.hidden_states[layer]
    for layer in attention_layers:
        res[("attention", layer)] = out.attentions[layer - 1]
    return res


def projection(student_width: int, teacher_width: int) -> nn.Module:
    """A learned map into the teacher's width (identity when the widths already agree)."""
    return nn.Identity() if student_width == teacher_width else nn.Linear(student_width, teacher_width)


# ----------------------------------------------------------------------------------------------- init from teacher
def init_from(student: nn.Module, teacher: Teacher, layers: list[int] | None) -> list[int]:
    """Copy the teacher into the student, layer `layers[i]` into student layer i (default: every other layer,
    as DistilBERT does). Needs the same architecture and widths; fails naming what differs."""
    if teacher.modality != "text" or getattr(student, "modality", "") != "text":
        raise TunelabError("task.init_from_teacher copies transformer layers: text teachers and students only")
    s_cfg, t_cfg = student.net.config, teacher.net.net.config
    keys = ("model_type", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size",
            "max_position_embeddings")
    differ = [f"{k} {getattr(s_cfg, k, None)} vs {getattr(t_cfg, k, None)}" for k in keys
              if getattr(s_cfg, k, None) != getattr(t_cfg, k, None)]
    if differ:
        raise TunelabError(
            f"task.init_from_teacher: the student differs from the teacher in {', '.join(differ)} (student vs "
            f"teacher; copying layers needs the teacher's architecture and widths with fewer layers, e.g. "
            f"model.hidden_size={t_cfg.hidden_size} model.num_heads={t_cfg.num_attention_heads} "
            f"model.intermediate_size={t_cfg.intermediate_size} model.max_position_embeddings="
            f"{t_cfg.max_position_embeddings} model.num_layers={max(1, t_cfg.num_hidden_layers // 2)})"
        )
    s_n, t_n = s_cfg.num_hidden_layers, t_cfg.num_hidden_layers
    layers = list(layers) if layers is not None else [i * t_n // s_n for i in range(s_n)]
    if len(layers) != s_n or not all(0 <= t < t_n for t in layers):
        raise TunelabError(f"task.init_layers={layers}: expected {s_n} teacher layer indices in 0..{t_n - 1}, one per "
                           "student layer")
    source = teacher.net.net.state_dict()
    state = {}
    for key, value in student.net.state_dict().items():
        src = LAYER_INDEX.sub(lambda m: f"{m.group(1)}{layers[int(m.group(2))]}.", key, count=1)
        if src not in source or source[src].shape != value.shape:
            raise TunelabError(f"task.init_from_teacher: the teacher has no {src} shaped {tuple(value.shape)}")
        state[key] = source[src].detach().clone()
    student.net.load_state_dict(state)
    return layers


# ----------------------------------------------------------------------------------------------- speed
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
