"""Multi-label classification: a set of labels per record (tags, aspects, topics).

Targets are a JSON list of names, or one string split at `delimiter` (CSV/TSV); an empty list is a record
with none of the labels. One sigmoid per label, binary cross-entropy with logits; micro- and macro-F1 and
mAP, micro-F1 monitored. Each label's decision threshold is chosen on the validation split (`calibrate`,
the F1-best of a grid) and stored in the card, so predict and serve decide as the tested model did.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MultilabelAveragePrecision

from tunelab.errors import TunelabError
from tunelab.problems.base import FloatRows, PlainOutputs
from tunelab.problems.classification import natural_order

METRICS = ("f1_micro", "f1_macro", "map")
GRID = np.linspace(0.05, 0.95, 19)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


class ThresholdF1(Metric):
    """F1 at per-label thresholds (the calibrated ones), micro or macro over labels."""

    full_state_update = False

    def __init__(self, problem: MultiLabel, average: str) -> None:
        super().__init__()
        self.problem, self.average = problem, average
        k = len(problem.outputs)
        for name in ("tp", "fp", "fn"):
            self.add_state(name, torch.zeros(k), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        thresholds = torch.tensor(self.problem.thresholds, device=preds.device)
        hit, true = preds >= thresholds, target > 0.5
        self.tp += (hit & true).sum(0)
        self.fp += (hit & ~true).sum(0)
        self.fn += (~hit & true).sum(0)

    def compute(self) -> torch.Tensor:
        if self.average == "micro":
            tp, fp, fn = self.tp.sum(), self.fp.sum(), self.fn.sum()
            return 2 * tp / (2 * tp + fp + fn).clamp(min=1)
        per_label = 2 * self.tp / (2 * self.tp + self.fp + self.fn).clamp(min=1)
        return per_label if self.average == "none" else per_label.mean()


class MultiLabel(FloatRows, PlainOutputs):
    """Any subset of `outputs` per record."""

    name = "multi_label"
    hf_problem_type = "multi_label_classification"

    def __init__(self, delimiter: str = "|", monitor: str = "f1_micro", calibrate_thresholds: bool = True,
                 labels: list[str] | None = None, thresholds: list[float] | None = None) -> None:
        if monitor not in METRICS:
            raise TunelabError(f"problem.monitor={monitor!r} (expected one of {', '.join(METRICS)})")
        if not delimiter:
            raise TunelabError("problem.delimiter is empty (expected the string between labels, e.g. '|')")
        self.delimiter, self.monitor, self.mode = delimiter, monitor, "max"
        self.calibrate_thresholds = calibrate_thresholds
        self.outputs: list[str] = list(labels or [])
        self.thresholds = list(thresholds) if thresholds is not None else [0.5] * len(self.outputs)

    # ------------------------------------------------------------------ targets
    def read_target(self, value: Any, where: str) -> list[str]:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(self.delimiter)] if value.strip() else []
        if not isinstance(value, list) or not all(isinstance(v, str | int) and not isinstance(v, bool)
                                                  for v in value):
            raise TunelabError(f"{where}: target {value!r} is not a list of labels (expected a JSON list of names, "
                               f"or names joined by problem.delimiter={self.delimiter!r})")
        names = [str(v) for v in value]
        if any(not n for n in names):
            raise TunelabError(f"{where}: target {value!r} holds an empty label name")
        return sorted(set(names))

    def fit(self, targets: Sequence[Any], where: str, labels: list[str] | None = None,
            fields: list[str] | None = None) -> None:
        self.outputs = [str(x) for x in labels] if labels is not None else natural_order(
            sorted({name for t in targets for name in t}))
        if not self.outputs:
            raise TunelabError(f"{where}: no record has any label (expected at least one label in the training split)")
        self.thresholds = [0.5] * len(self.outputs)

    def encode(self, target: list[str], where: str) -> list[float]:
        index = {name: i for i, name in enumerate(self.outputs)}
        unknown = [n for n in target if n not in index]
        if unknown:
            raise TunelabError(f"{where}: label {unknown[0]!r} is not in the label set (expected labels from "
                               f"{self.outputs}; set data.labels to change it)")
        row = [0.0] * len(self.outputs)
        for name in target:
            row[index[name]] = 1.0
        return row

    # ------------------------------------------------------------------ training
    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        keep = self.labelled(targets)
        if not keep.any():
            return outputs.sum() * 0.0
        return F.binary_cross_entropy_with_logits(outputs[keep].float(), targets[keep].float())

    def soft_loss(self, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
        """Per-label Bernoulli KD: BCE against the teacher's sigmoid at temperature T, scaled by T^2."""
        t = temperature
        return F.binary_cross_entropy_with_logits(student.float() / t, torch.sigmoid(teacher.float() / t)) * t * t

    def metrics(self) -> MetricCollection:
        k = len(self.outputs)
        return MetricCollection({"f1_micro": ThresholdF1(self, "micro"), "f1_macro": ThresholdF1(self, "macro"),
                                 "map": MultilabelAveragePrecision(k, average="macro")}, compute_groups=False)

    def metric_inputs(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keep = self.labelled(targets)
        return torch.sigmoid(outputs[keep].float()), targets[keep].long()

    def diagnostic(self) -> tuple[str, Metric]:
        return "per_label_f1", PerLabelF1(self)

    def agreement(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """The share of (record, label) decisions the two models make alike."""
        thresholds = torch.tensor(self.thresholds)
        return float(((torch.sigmoid(a.float()) >= thresholds) == (torch.sigmoid(b.float()) >= thresholds))
                     .float().mean())

    def calibrate(self, probabilities: torch.Tensor, targets: torch.Tensor) -> None:
        """Each label's threshold: the one of `GRID` with the best F1 on these (validation) rows."""
        if not self.calibrate_thresholds or len(probabilities) == 0:
            return
        p, t = probabilities.float().cpu().numpy(), targets.cpu().numpy() > 0.5
        chosen = []
        for j in range(len(self.outputs)):
            hit = p[:, j][None, :] >= GRID[:, None]
            tp = (hit & t[:, j]).sum(1)
            f1 = 2 * tp / np.maximum(hit.sum(1) + t[:, j].sum(), 1)
            chosen.append(float(GRID[int(f1.argmax())]))
        self.thresholds = chosen

    # ------------------------------------------------------------------ answers
    def answers(self, outputs: np.ndarray) -> list[dict[str, Any]]:
        """`{labels: [...], probabilities: {label: p}}`: the labels at or over their thresholds."""
        out = []
        for row in sigmoid(outputs):
            out.append({"labels": [n for n, p, th in zip(self.outputs, row, self.thresholds, strict=True) if p >= th],
                        "probabilities": {n: float(p) for n, p in zip(self.outputs, row, strict=True)}})
        return out

    def card(self) -> dict[str, Any]:
        return {"name": self.name, "labels": self.outputs, "thresholds": self.thresholds,
                "delimiter": self.delimiter}

    @classmethod
    def from_card(cls, fields: dict[str, Any], outputs: list[str]) -> MultiLabel:
        return cls(labels=fields.get("labels") or outputs, thresholds=fields.get("thresholds"),
                   delimiter=fields.get("delimiter", "|"))


class PerLabelF1(ThresholdF1):
    """Per-label F1 at the calibrated thresholds, drawn as a bar chart."""

    def __init__(self, problem: MultiLabel) -> None:
        super().__init__(problem, "none")

    def plot(self, labels: Any = None) -> tuple[Any, Any]:
        import matplotlib.pyplot as plt

        values = self.compute().cpu().numpy()
        fig, ax = plt.subplots()
        ax.bar(range(len(values)), values)
        ax.set_xticks(range(len(values)), labels or self.problem.outputs, rotation=45, ha="right")
        ax.set_ylim(0, 1)
        ax.set_ylabel("F1")
        fig.tight_layout()
        return fig, ax
