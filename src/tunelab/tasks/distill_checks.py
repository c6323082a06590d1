"""What distillation checks before any work: its settings, and that teacher, student and data fit together.

Same modality, label set, tokenizer vocabulary and image preprocessing: otherwise the soft labels mean
nothing. Each error names the key to change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lightning import LightningDataModule
from torch import nn

from tunelab.errors import TunelabError
from tunelab.folders import own_tokenizer

if TYPE_CHECKING:
    from tunelab.models.teacher import Teacher


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
        check_problem(teacher, datamodule)
        check_labels(teacher, list(datamodule.labels or []))
    check_normalisation(teacher, datamodule)
    check_vocabulary(teacher, datamodule)


def check_problem(teacher: Teacher, datamodule: LightningDataModule) -> None:
    """The teacher answers the problem the student learns (a regressor cannot teach a classifier)."""
    mine, theirs = getattr(datamodule, "problem", None), teacher.problem
    if mine is not None and theirs is not None and mine.name != theirs.name:
        raise TunelabError(f"teacher.path: the teacher {teacher.source} is a {theirs.name} model but this run is "
                           f"problem={mine.name} (expected a teacher trained on the same problem, or "
                           f"problem={theirs.name})")


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


def check_attention(pairs: list[tuple[int, int]], student: nn.Module, teacher: Teacher) -> None:
    if teacher.modality != "text" or getattr(student, "modality", "") != "text":
        raise TunelabError("task.attention_weight > 0 matches attention maps, which only text models have "
                           "(expected task.attention_weight=0 for image models)")
    if not pairs:
        raise TunelabError("task.attention_weight > 0 but task.layer_map pairs no transformer layers (expected "
                           "student and teacher layers >= 1, e.g. {1: 2, 2: 4})")
    for net in (student.net, teacher.net.net):  # SDPA kernels do not return attention probabilities
        net.set_attn_implementation("eager")
