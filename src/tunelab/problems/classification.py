"""Single-label classification: one class per record, cross-entropy, accuracy and macro-F1.

Targets are class names (a number in a file is its name, `3` -> "3"); the label set is `data.labels` or the
sorted set found in the training split. The answer is the most probable class with the whole distribution.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score

from tunelab.contracts import IGNORE_INDEX
from tunelab.errors import TunelabError
from tunelab.problems.base import PlainOutputs


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def natural_order(names: Sequence[str]) -> list[str]:
    """Numbers in numeric order first, then names alphabetically: "2" before "10"."""
    return sorted(names, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))


def soft_target_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """`T^2 * KL(softmax(teacher/T) || softmax(student/T))`, averaged over the rows (one row per prediction)."""
    t = temperature
    return F.kl_div(F.log_softmax(student.float() / t, dim=-1), F.log_softmax(teacher.float() / t, dim=-1),
                    reduction="batchmean", log_target=True) * t * t


class Classification(PlainOutputs):
    """One of `outputs` per record."""

    name = "classification"
    hf_problem_type = "single_label_classification"
    mode = "max"

    def __init__(self, label_smoothing: float = 0.0, monitor: str = "acc", labels: list[str] | None = None) -> None:
        if not 0 <= label_smoothing < 1:
            raise TunelabError(f"problem.label_smoothing={label_smoothing} (expected a value in [0, 1))")
        if monitor not in ("acc", "f1"):
            raise TunelabError(f"problem.monitor={monitor!r} (expected acc or f1)")
        self.label_smoothing, self.monitor = label_smoothing, monitor
        self.outputs: list[str] = list(labels or [])

    # ------------------------------------------------------------------ targets
    def read_target(self, value: Any, where: str) -> str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            fits = ("problem=multi_label" if isinstance(value, list) else "a class name")
            raise TunelabError(f"{where}: target {value!r} is a {type(value).__name__}, not a class name (expected one "
                               f"label per record for problem=classification; {fits} fits this target)")
        if isinstance(value, float):
            if not value.is_integer():
                raise TunelabError(f"{where}: target {value!r} is a number with a fraction, not a class name "
                                   "(expected one label per record; problem=regression fits this target)")
            value = int(value)
        return str(value)

    def fit(self, targets: Sequence[Any], where: str, labels: list[str] | None = None,
            fields: list[str] | None = None) -> None:
        if labels is not None:
            self.outputs = [str(x) for x in labels]
            return
        self.outputs = natural_order(sorted(set(targets)))
        if len(self.outputs) < 2:
            raise TunelabError(f"{where}: found {len(self.outputs)} class {self.outputs} (expected at least two "
                               "distinct labels to classify)")
        numeric = [t for t in self.outputs if _is_number(t)]
        if len(numeric) == len(self.outputs) and any("." in t for t in numeric) and len(numeric) > 20:
            raise TunelabError(f"{where}: {len(numeric)} distinct numeric targets such as {numeric[:3]} look like "
                               "scores, not classes (expected class names; problem=regression fits this target)")

    def encode(self, target: str, where: str) -> int:
        index = getattr(self, "_index", None)
        if index is None or list(index) != self.outputs:  # built once per label set
            self._index = index = {name: i for i, name in enumerate(self.outputs)}
        if target not in index:
            raise TunelabError(f"{where}: label {target!r} is not in the label set (expected one of {self.outputs}; "
                               "set data.labels to change it)")
        return index[target]

    def missing(self) -> int:
        return IGNORE_INDEX

    def labelled(self, targets: torch.Tensor) -> torch.Tensor:
        return targets != IGNORE_INDEX

    # ------------------------------------------------------------------ training
    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        labelled = (targets != IGNORE_INDEX).sum().clamp(min=1)
        return F.cross_entropy(outputs.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum",
                               label_smoothing=self.label_smoothing) / labelled

    def soft_loss(self, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
        return soft_target_loss(student, teacher, temperature)

    def metrics(self) -> MetricCollection:
        k = len(self.outputs)
        return MetricCollection({"acc": MulticlassAccuracy(k, average="micro"),
                                 "f1": MulticlassF1Score(k, average="macro")})

    def metric_inputs(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keep = targets != IGNORE_INDEX
        return outputs[keep], targets[keep]

    def diagnostic(self) -> tuple[str, Metric]:
        return "confusion_matrix", MulticlassConfusionMatrix(len(self.outputs))

    def agreement(self, a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.argmax(-1) == b.argmax(-1)).float().mean())

    # ------------------------------------------------------------------ answers
    def answers(self, outputs: np.ndarray) -> list[dict[str, Any]]:
        """`{label, probability, probabilities}` per row: the answer, its probability, the distribution."""
        out = []
        for p in softmax(outputs):
            best = int(p.argmax())
            out.append({"label": self.outputs[best], "probability": float(p[best]),
                        "probabilities": {name: float(v) for name, v in zip(self.outputs, p, strict=True)}})
        return out

    def card(self) -> dict[str, Any]:
        return {"name": self.name, "labels": self.outputs}

    @classmethod
    def from_card(cls, fields: dict[str, Any], outputs: list[str]) -> Classification:
        return cls(labels=fields.get("labels") or outputs)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
