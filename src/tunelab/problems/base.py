"""The interface every problem type implements, and what problems share.

A problem says what a network outputs (`outputs`, the HF `problem_type`, timm's `num_classes` is
`len(outputs)`), how targets are read, checked and encoded, the loss and the soft loss for distillation,
the metrics and the one that is monitored, how raw outputs become answers, how two models' outputs are
compared, and what the card records. Tasks, compress, predict and serve ask the problem; none branches on it.

Targets travel in three forms: the *raw* value a file holds (`read_target` turns it into a canonical Python
value or names what is wrong), the *encoded* value a dataset stores and a batch carries as `labels`
(`encode`), and the network's *outputs* (logits or values), which `answers` turns into what predict writes
and serve returns. A record without a target (a distillation transfer set) is stored as `missing()`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn
from torchmetrics import Metric, MetricCollection


@runtime_checkable
class Problem(Protocol):
    """One problem type. `fit` sees the training targets once; everything after it may use what it learned."""

    name: str  # the registry name, written to the card
    hf_problem_type: str | None  # `problem_type` in a transformers config.json
    monitor: str  # the metric (without split prefix) that checkpoints monitor and sweeps optimize
    mode: str  # "max" or "min": which way `monitor` improves
    outputs: list[str]  # one name per network output: class or label names, or target names

    def read_target(self, value: Any, where: str) -> Any:
        """A raw target from a file as a canonical Python value; raises TunelabError naming `where`."""

    def fit(self, targets: Sequence[Any], where: str, labels: list[str] | None = None,
            fields: list[str] | None = None) -> None:
        """Learn what the training targets say (label set, standardization); `labels`: a fixed label set
        (`data.labels`), `fields`: the target fields' names (`data.label_field`)."""

    def encode(self, target: Any, where: str) -> Any:
        """A canonical target as the dataset stores it (class id, floats, multi-hot)."""

    def missing(self) -> Any:
        """The stored target of a record without one (left out of every loss and metric)."""

    def labelled(self, targets: torch.Tensor) -> torch.Tensor:
        """A bool row mask: which rows of a batch's `labels` carry a target."""

    def prepare(self, model: nn.Module, fresh_head: bool) -> None:
        """Adapt a network to train on this problem (e.g. output scaling); `fresh_head`: not loaded."""

    def finalize(self, model: nn.Module) -> nn.Module:
        """The network as it is exported: its outputs what `answers` expects, with no training-only parts."""

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The training loss over labelled rows."""

    def soft_loss(self, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
        """Distillation: how far the student's outputs are from the teacher's (both as exported)."""

    def metrics(self) -> MetricCollection:
        """Fresh metrics, updated with `metric_inputs(outputs, targets)`; `monitor` is one of them."""

    def metric_inputs(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the metrics take, from a batch's outputs and encoded targets."""

    def diagnostic(self) -> tuple[str, Metric] | None:
        """A figure's name and the metric (with `plot`) drawn as it each validation epoch in TensorBoard
        (a confusion matrix, a scatter of predicted against true values...)."""

    def agreement(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """How alike two models' outputs on the same inputs are (1 = the same answers)."""

    def answers(self, outputs: np.ndarray) -> list[dict[str, Any]]:
        """One JSON-ready answer per row of raw outputs: what predict writes and serve returns."""

    def card(self) -> dict[str, Any]:
        """What a model card records about the problem (with `name`), enough for `from_card`."""


# ----------------------------------------------------------------------------- shared pieces
def as_list(value: Any) -> list[Any]:
    """A JSON list, or one value as a list of one."""
    return list(value) if isinstance(value, list | tuple) else [value]


def final_linear(head: nn.Module, width: int) -> nn.Linear:
    """The last linear layer of a head with `width` outputs: where output scaling is folded."""
    found = [m for m in head.modules() if isinstance(m, nn.Linear) and m.out_features == width]
    if not found:
        from tunelab.errors import TunelabError

        raise TunelabError(f"{type(head).__name__} has no linear output layer of width {width}")
    return found[-1]


class MeanOver(Metric):
    """A per-output torchmetrics metric reported as its mean over outputs (one scalar to log and monitor with k
    targets), taking (n, k) inputs for any k, 1 included."""

    full_state_update = False

    def __init__(self, metric: Metric) -> None:
        super().__init__()
        self.inner = metric

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        self.inner.update(preds.squeeze(-1) if preds.shape[-1] == 1 else preds,
                          target.squeeze(-1) if target.shape[-1] == 1 else target)

    def compute(self) -> torch.Tensor:
        value = self.inner.compute()  # one value per output when there are several
        return value.float().mean() if value.dim() else value

    def reset(self) -> None:
        super().reset()
        self.inner.reset()


class FloatRows:
    """Targets stored as a row of floats per record (scores, multi-hot): NaN marks a record without one."""

    outputs: list[str]

    def missing(self) -> list[float]:
        return [float("nan")] * len(self.outputs)

    def labelled(self, targets: torch.Tensor) -> torch.Tensor:
        return ~torch.isnan(targets).any(-1)


class PlainOutputs:
    """A network whose raw outputs (logits) are what the problem answers from: nothing to adapt or fold."""

    def prepare(self, model: nn.Module, fresh_head: bool) -> None:
        """Logits need no adapting."""

    def finalize(self, model: nn.Module) -> nn.Module:
        return model
