"""A problem type defined here alone runs through finetune -> predict -> serve, with no other module changed.

`AtLeast` asks whether a review's stars reach a threshold: one output, its own loss, metric and answer.
It implements the `tunelab.problems.Problem` protocol and registers itself; the card names this module, so the
server's worker process finds it the same way.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf, open_dict
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryAccuracy

from tests.conftest import FAST, ROOT, compose_cfg
from tests.test_predict import predict, rows
from tests.test_serve import launch
from tunelab import problems
from tunelab.errors import TunelabError


@problems.register
class AtLeast:
    """Whether a numeric target is at least `threshold`."""

    name = "at_least"
    hf_problem_type = None
    mode = "max"

    def __init__(self, threshold: float = 3.0, monitor: str = "acc") -> None:
        self.threshold, self.monitor, self.outputs = threshold, monitor, ["at_least"]

    def read_target(self, value: Any, where: str) -> float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise TunelabError(f"{where}: target {value!r} is not a number") from None

    def fit(self, targets: Any, where: str, labels: Any = None, fields: Any = None) -> None:
        """Nothing to learn: one output, a fixed threshold."""

    def encode(self, target: float, where: str) -> float:
        return float(target >= self.threshold)

    def missing(self) -> float:
        return float("nan")

    def labelled(self, targets: torch.Tensor) -> torch.Tensor:
        return ~torch.isnan(targets)

    def prepare(self, model: nn.Module, fresh_head: bool) -> None:
        """Logits need no adapting."""

    def finalize(self, model: nn.Module) -> nn.Module:
        return model

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        keep = self.labelled(targets)
        return F.binary_cross_entropy_with_logits(outputs[keep, 0].float(), targets[keep].float())

    def soft_loss(self, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(student.float(), torch.sigmoid(teacher.float()))

    def metrics(self) -> MetricCollection:
        return MetricCollection({"acc": BinaryAccuracy()})

    def metric_inputs(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keep = self.labelled(targets)
        return torch.sigmoid(outputs[keep, 0].float()), targets[keep].long()

    def diagnostic(self) -> None:
        return None

    def agreement(self, a: torch.Tensor, b: torch.Tensor) -> float:
        return float(((a > 0) == (b > 0)).float().mean())

    def answers(self, outputs: np.ndarray) -> list[dict[str, Any]]:
        return [{"at_least": bool(v > 0), "probability": float(1 / (1 + math.exp(-v)))} for v in outputs[:, 0]]

    def card(self) -> dict[str, Any]:
        return {"name": self.name, "threshold": self.threshold}

    @classmethod
    def from_card(cls, fields: dict[str, Any], outputs: list[str]) -> AtLeast:
        return cls(threshold=fields["threshold"])


def test_the_protocol_is_what_the_toy_implements() -> None:
    assert isinstance(AtLeast(), problems.Problem)
    assert problems.by_name("at_least") is AtLeast


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tunelab.train import run

    out = tmp_path_factory.mktemp("toy") / "run"
    cfg = compose_cfg([*FAST, "data.label_field=stars", "data.labels=null", "model.hidden_size=32",
                       "model.intermediate_size=64", "data.max_length=48"], out)
    with open_dict(cfg):
        cfg.problem = OmegaConf.create({"_target_": f"{__name__}.AtLeast", "threshold": 4.0, "monitor": "acc"})
    run(cfg)
    return out


def test_finetune_predict_and_serve_a_problem_defined_in_a_test(toy_run: Path, tmp_path: Path,
                                                               tmp_path_factory: pytest.TempPathFactory) -> None:
    metrics = json.loads((toy_run / "metrics.json").read_text())["metrics"]
    assert {"val/acc", "val/acc_best", "test/acc"} <= set(metrics)
    card = json.loads((toy_run / "model" / "tunelab.json").read_text())
    assert card["problem"] == {"name": "at_least", "threshold": 4.0, "module": __name__}

    texts = ["the kettle is great, i love it", "the plot drags on and the ending is dull"]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": t, "stars": s}) + "\n" for t, s in zip(texts, (5, 1), strict=True)))
    summary = predict(toy_run / "model", source, tmp_path / "out.jsonl", **{"data.label_field": "stars"})
    written = rows(tmp_path / "out.jsonl")
    assert [set(r) for r in written] == [{"line", "at_least", "probability", "target"}] * 2
    assert summary["labelled"] == 2 and 0 <= summary["acc"] <= 1

    served = launch(toy_run / "model", tmp_path_factory, "threads=1", env={"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"})
    server = next(served)
    try:
        status, body = server.post({"texts": texts})
        assert status == 200, body
        assert [p["at_least"] for p in body["predictions"]] == [r["at_least"] for r in written]
        assert [p["probability"] for p in body["predictions"]] == pytest.approx([r["probability"] for r in written],
                                                                               abs=1e-5)
        status, body = server.post({"texts": "not a list"})
        assert status == 422, body
    finally:
        next(served, None)
