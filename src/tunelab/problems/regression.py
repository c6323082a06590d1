"""Regression: one or several real-valued targets per record (ratings, scores, prices).

The network trains on targets standardized with the training split's mean and standard deviation, so the
loss and the head's learning rate mean the same whatever the targets' units; the standardization is a fixed
affine on the head's output (`prepare`) that `finalize` folds into the head's last linear layer, so the
exported `model/` outputs values in the original units (a plain `pipeline(..., function_to_apply="none")`
returns them). MSE by default, Huber as an option; MAE, RMSE, Pearson and Spearman, Spearman monitored.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import CatMetric, Metric, MetricCollection
from torchmetrics.regression import MeanAbsoluteError, MeanSquaredError, PearsonCorrCoef, SpearmanCorrCoef

from tunelab.errors import TunelabError
from tunelab.problems.base import FloatRows, MeanOver, as_list, final_linear

LOSSES = ("mse", "huber")
METRICS = ("spearman", "pearson", "mae", "rmse")


class Scatter(Metric):
    """Predictions and targets kept for a predicted-against-true scatter plot (first output)."""

    full_state_update = False

    def __init__(self, max_points: int = 2000) -> None:
        super().__init__()
        self.max_points = max_points
        self.points = CatMetric()

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        self.points.update(torch.stack([preds[:, 0].float(), target[:, 0].float()], dim=1))

    def compute(self) -> torch.Tensor:
        return self.points.compute()

    def reset(self) -> None:
        super().reset()
        self.points.reset()

    def plot(self, labels: Any = None) -> tuple[Any, Any]:
        import matplotlib.pyplot as plt

        values = self.compute().reshape(-1, 2)[: self.max_points].cpu().numpy()
        fig, ax = plt.subplots()
        ax.scatter(values[:, 1], values[:, 0], s=6, alpha=0.5)
        low, high = float(values.min()), float(values.max())
        ax.plot([low, high], [low, high], color="grey", linewidth=1)
        ax.set_xlabel(f"true {labels[0] if labels else ''}")
        ax.set_ylabel("predicted")
        return fig, ax


class Scale(nn.Module):
    """`x * std + mean`, applied to the head's output while training (buffers: they follow the device)."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean), persistent=False)
        self.register_buffer("std", torch.tensor(std), persistent=False)

    def hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output * self.std.to(output.dtype) + self.mean.to(output.dtype)


class Regression(FloatRows):
    """`len(outputs)` real values per record, one per target field."""

    name = "regression"
    hf_problem_type = "regression"

    def __init__(self, loss: str = "mse", huber_delta: float = 1.0, monitor: str = "spearman",
                 standardize: bool = True, targets: list[str] | None = None, mean: list[float] | None = None,
                 std: list[float] | None = None) -> None:
        if loss not in LOSSES:
            raise TunelabError(f"problem.loss={loss!r} (expected one of {', '.join(LOSSES)})")
        if monitor not in METRICS:
            raise TunelabError(f"problem.monitor={monitor!r} (expected one of {', '.join(METRICS)})")
        if not huber_delta > 0:
            raise TunelabError(f"problem.huber_delta={huber_delta} (expected a positive number)")
        self.loss_name, self.huber_delta, self.monitor, self.standardize = loss, huber_delta, monitor, standardize
        self.mode = "max" if monitor in ("spearman", "pearson") else "min"
        self.outputs: list[str] = list(targets or [])
        self.mean = list(mean) if mean is not None else [0.0] * len(self.outputs)
        self.std = list(std) if std is not None else [1.0] * len(self.outputs)
        self.scale: Scale | None = None

    # ------------------------------------------------------------------ targets
    def read_target(self, value: Any, where: str) -> list[float]:
        values = as_list(value)
        out = []
        for v in values:
            if isinstance(v, str):
                try:
                    v = float(v)
                except ValueError:
                    raise TunelabError(f"{where}: target {v!r} is not a number (expected a real value for "
                                       "problem=regression; problem=classification fits names)") from None
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise TunelabError(f"{where}: target {v!r} is a {type(v).__name__}, not a number (expected a real "
                                   "value for problem=regression)")
            if not math.isfinite(v):
                raise TunelabError(f"{where}: target {v!r} is not finite (expected a real value, not NaN or inf)")
            out.append(float(v))
        return out

    def fit(self, targets: Sequence[Any], where: str, labels: list[str] | None = None,
            fields: list[str] | None = None) -> None:
        """The outputs are named after the target fields (`data.label_field`, one or several)."""
        values = np.asarray([list(t) for t in targets], dtype=np.float64)
        self.outputs = list(fields or [f"target_{i}" for i in range(values.shape[1])])
        if values.ndim != 2 or values.shape[1] != len(self.outputs):
            raise TunelabError(f"{where}: targets of {values.shape[-1]} values (expected {len(self.outputs)}, "
                               f"one per target field {self.outputs})")
        self.mean = values.mean(0).tolist() if self.standardize else [0.0] * len(self.outputs)
        std = values.std(0) if self.standardize else np.ones(len(self.outputs))
        if self.standardize and (std == 0).any():
            flat = [n for n, s in zip(self.outputs, std, strict=True) if s == 0]
            raise TunelabError(f"{where}: target {flat} has the same value on every training record (expected "
                               "targets that vary)")
        self.std = std.tolist()

    def encode(self, target: list[float], where: str) -> list[float]:
        if len(target) != len(self.outputs):
            raise TunelabError(f"{where}: {len(target)} target values (expected {len(self.outputs)}: {self.outputs})")
        return target

    # ------------------------------------------------------------------ the network
    def prepare(self, model: nn.Module, fresh_head: bool) -> None:
        """Scale the head's output to the original units. A loaded head outputs them already: its last layer is
        unfolded into standardized units first, so the outputs stay what they were."""
        layer = final_linear(model.classifier, len(self.outputs))
        self.scale = Scale(self.mean, self.std)
        if not fresh_head:
            with torch.no_grad():
                std, mean = self.scale.std.to(layer.weight), self.scale.mean.to(layer.weight)
                layer.weight.div_(std[:, None])
                if layer.bias is not None:
                    layer.bias.sub_(mean).div_(std)
        model.target_scale = self.scale  # a submodule: moves with the model; its buffers are not saved
        self._handle = layer.register_forward_hook(self.scale.hook)

    def finalize(self, model: nn.Module) -> nn.Module:
        """Fold the scaling into the head's last linear layer (outputs unchanged) and drop the hook."""
        layer = final_linear(model.classifier, len(self.outputs))
        hooks = [k for k, h in layer._forward_hooks.items() if getattr(h, "__self__", None) is not None
                 and isinstance(h.__self__, Scale)]
        if not hooks:
            return model
        with torch.no_grad():
            std = torch.tensor(self.std, dtype=layer.weight.dtype, device=layer.weight.device)
            mean = torch.tensor(self.mean, dtype=layer.weight.dtype, device=layer.weight.device)
            layer.weight.mul_(std[:, None])
            if layer.bias is not None:
                layer.bias.mul_(std).add_(mean)
        for key in hooks:
            del layer._forward_hooks[key]
        if isinstance(getattr(model, "target_scale", None), Scale):
            del model.target_scale
        return model

    # ------------------------------------------------------------------ training
    def _standardized(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, device=x.device, dtype=torch.float32)
        std = torch.tensor(self.std, device=x.device, dtype=torch.float32)
        return (x.float() - mean) / std

    def _distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.loss_name == "huber":
            return F.huber_loss(a, b, delta=self.huber_delta)
        return F.mse_loss(a, b)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        keep = self.labelled(targets)
        if not keep.any():
            return outputs.sum() * 0.0
        return self._distance(self._standardized(outputs[keep]), self._standardized(targets[keep]))

    def soft_loss(self, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
        """The teacher's outputs as targets, in standardized units (temperature has no meaning here)."""
        return self._distance(self._standardized(student), self._standardized(teacher))

    def metrics(self) -> MetricCollection:
        k = len(self.outputs)
        per_output = {"num_outputs": k} if k > 1 else {}
        with warnings.catch_warnings():  # Spearman keeps one epoch's predictions of a split, as ranking needs
            warnings.filterwarnings("ignore", "Metric `SpearmanCorrcoef` will save", UserWarning)
            spearman = MeanOver(SpearmanCorrCoef(**per_output))
        return MetricCollection({
            "mae": MeanOver(MeanAbsoluteError(**per_output)),
            "rmse": MeanOver(MeanSquaredError(squared=False, **per_output)),
            "pearson": MeanOver(PearsonCorrCoef(**per_output)),
            "spearman": spearman,
        }, compute_groups=False)

    def metric_inputs(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keep = self.labelled(targets)
        return outputs[keep].float(), targets[keep].float()

    def diagnostic(self) -> tuple[str, Metric]:
        return "predicted_vs_true", Scatter()

    def agreement(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """1 - mean |a - b| / std: the share of a standard deviation the two models agree within."""
        return float(1 - (self._standardized(a) - self._standardized(b)).abs().mean())

    # ------------------------------------------------------------------ answers
    def answers(self, outputs: np.ndarray) -> list[dict[str, Any]]:
        """`{"score": v}` for one target, `{"scores": {name: v}}` for several."""
        if len(self.outputs) == 1:
            return [{"score": float(row[0])} for row in outputs]
        return [{"scores": {n: float(v) for n, v in zip(self.outputs, row, strict=True)}} for row in outputs]

    def card(self) -> dict[str, Any]:
        return {"name": self.name, "targets": self.outputs, "mean": self.mean, "std": self.std,
                "loss": self.loss_name, "units": "original (the standardization is folded into the head)"}

    @classmethod
    def from_card(cls, fields: dict[str, Any], outputs: list[str]) -> Regression:
        return cls(targets=fields.get("targets") or outputs, mean=fields.get("mean"), std=fields.get("std"),
                   loss=fields.get("loss", "mse"))
