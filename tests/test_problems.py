"""Problem types through the whole life of a model: regression and multi-label trained, exported (plain
`transformers` parity), compressed (int8 and ONNX reload with the same outputs), predicted, distilled."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import FAST, compose_cfg
from tests.test_predict import predict, rows, tiny_classifier  # noqa: F401 (a module fixture)
from tunelab import artifacts
from tunelab.errors import TunelabError
from tunelab.problems.classification import Classification
from tunelab.problems.multi_label import MultiLabel
from tunelab.problems.regression import Regression

SMALL = ["model.hidden_size=32", "model.intermediate_size=64", "data.max_length=48", "trainer.limit_train_batches=6"]


def train(overrides: list[str], out: Path) -> Path:
    from tunelab.train import run

    cfg = compose_cfg([*FAST, *SMALL, *overrides], out)
    run(cfg)
    return out


@pytest.fixture(scope="module")
def stars_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(["experiment=reviews_stars"], tmp_path_factory.mktemp("stars") / "run")


@pytest.fixture(scope="module")
def aspects_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(["experiment=reviews_aspects"], tmp_path_factory.mktemp("aspects") / "run")


def test_texts() -> list[str]:
    from tunelab.data.embedded import reviews_test

    return [json.loads(line)["text"] for line in reviews_test().read_text().splitlines()[:24]]


# ----------------------------------------------------------------------------- targets
def test_classification_refuses_a_score_and_a_list_naming_the_problem_that_fits() -> None:
    problem = Classification()
    with pytest.raises(TunelabError, match="problem=regression fits"):
        problem.read_target(0.16, "f.jsonl:3")
    with pytest.raises(TunelabError, match="problem=multi_label fits"):
        problem.read_target(["a", "b"], "f.jsonl:4")
    with pytest.raises(TunelabError, match="problem=regression fits"):
        problem.fit([f"{i / 50:.2f}" for i in range(150)], "data.train_file: f.csv")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "nan", "three", True])
def test_regression_refuses_what_is_not_a_finite_number(value: object) -> None:
    with pytest.raises(TunelabError, match="f.jsonl:7"):
        Regression().read_target(value, "f.jsonl:7")


def test_multi_label_reads_lists_and_delimited_strings_and_refuses_unknown_labels() -> None:
    problem = MultiLabel(delimiter=";")
    assert problem.read_target("b; a;b", "x") == ["a", "b"] and problem.read_target([], "x") == []
    problem.fit([["a"], ["b", "c"]], "train")
    assert problem.outputs == ["a", "b", "c"] and problem.encode(["a", "c"], "x") == [1.0, 0.0, 1.0]
    problem.fit([["a"]], "train", labels=["a", "b"])
    with pytest.raises(TunelabError, match="f.jsonl:2: label 'z' is not in the label set"):
        problem.encode(["z"], "f.jsonl:2")


def test_standardization_is_folded_into_the_head_without_changing_outputs() -> None:
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.classifier = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.classifier(torch.tanh(self.body(x)))

    problem = Regression()
    problem.fit([[10.0, -3.0], [30.0, -1.0], [20.0, -2.0]], "train", fields=["a", "b"])
    net, x = Net(), torch.randn(5, 4)
    raw = net.classifier(torch.tanh(net.body(x)))
    problem.prepare(net, fresh_head=True)
    scaled = net(x)  # trains in standardized units, answers in the original ones
    assert torch.allclose(scaled, raw * torch.tensor(problem.std) + torch.tensor(problem.mean), atol=1e-5)
    problem.finalize(net)
    assert not net.classifier._forward_hooks and torch.allclose(net(x), scaled, atol=1e-5)
    Regression.from_card(problem.card(), problem.outputs).prepare(net, fresh_head=False)  # a loaded head
    assert torch.allclose(net(x), scaled, atol=1e-5)


def test_thresholds_are_chosen_per_label_on_validation() -> None:
    problem = MultiLabel()
    problem.fit([["a"], ["b"]], "train")
    p = torch.tensor([[0.9, 0.3], [0.2, 0.35], [0.8, 0.1], [0.1, 0.32]])
    t = torch.tensor([[1, 1], [0, 1], [1, 0], [0, 1]])
    problem.calibrate(p, t)
    assert problem.thresholds[0] > 0.2 and problem.thresholds[1] <= 0.3  # b is caught below 0.5
    assert problem.answers(np.log(p.numpy() / (1 - p.numpy())))[1]["labels"] == ["b"]


# ----------------------------------------------------------------------------- regression, end to end
def test_regression_run_logs_its_metrics_and_exports_original_units(stars_run: Path) -> None:
    metrics = json.loads((stars_run / "metrics.json").read_text())["metrics"]
    assert {"val/spearman", "val/spearman_best", "test/mae", "test/rmse", "test/pearson", "test/spearman"} <= set(metrics)
    card = json.loads((stars_run / "model" / "tunelab.json").read_text())
    assert card["problem"]["name"] == "regression" and card["problem"]["targets"] == ["stars"]
    assert 2.5 < card["problem"]["mean"][0] < 3.5 and card["labels"] == ["stars"]
    config = json.loads((stars_run / "model" / "config.json").read_text())
    assert config["problem_type"] == "regression" and len(config["id2label"]) == 1


def test_tensorboard_draws_each_problems_figure(stars_run: Path, aspects_run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for run, tag in ((stars_run, "val/predicted_vs_true"), (aspects_run, "val/per_label_f1")):
        events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
        events.Reload()
        assert tag in events.Tags()["images"], events.Tags()["images"]


def test_a_target_the_models_problem_cannot_read_is_an_error_row(stars_run: Path, tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"text": "fine", "stars": 4}) + "\n" + json.dumps({"text": "ok", "stars": "many"}) + "\n")
    summary = predict(stars_run / "model", source, tmp_path / "out.jsonl", **{"data.label_field": "stars"})
    [error] = rows(tmp_path / "out.errors.jsonl")
    assert summary["predicted"] == 1 and error["line"] == 2 and "'many' is not a number" in error["error"]
    with pytest.raises(TunelabError, match=r"in.jsonl:2: target 'many' is not a number"):
        predict(stars_run / "model", source, tmp_path / "out2.jsonl", on_error="fail",
                **{"data.label_field": "stars"})
    assert not (tmp_path / "out2.jsonl").exists()


def test_a_card_written_before_problems_loads_as_a_classifier(tiny_classifier: Path, tmp_path: Path) -> None:  # noqa: F811
    import shutil

    folder = Path(shutil.copytree(tiny_classifier, tmp_path / "old"))
    card = json.loads((folder / "tunelab.json").read_text())
    card.pop("problem", None)
    (folder / "tunelab.json").write_text(json.dumps(card))
    loaded = artifacts.load(folder)
    assert loaded.problem.name == "classification" and loaded.problem.outputs == loaded.labels


def test_plain_pipeline_returns_the_values_predict_writes(stars_run: Path, tmp_path: Path) -> None:
    from transformers import pipeline

    texts = test_texts()
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": t, "stars": 3}) + "\n" for t in texts))
    summary = predict(stars_run / "model", source, tmp_path / "out.jsonl", **{"data.label_field": "stars"})
    ours = [r["score"] for r in rows(tmp_path / "out.jsonl")]
    plain = pipeline("text-classification", model=str(stars_run / "model"), function_to_apply="none", device="cpu")
    theirs = [r["score"] for r in plain(texts, truncation=True, max_length=48)]
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    assert 1 < float(np.mean(ours)) < 5  # stars, not standardized units
    assert summary["labelled"] == len(texts) and math.isfinite(summary["mae"])


def test_several_regression_targets_from_a_users_csv(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    words = ["good", "bad", "fine", "cheap", "dear", "fast", "slow"]
    lines = ["text,price,speed"]
    for _ in range(120):
        picked = rng.choice(words, 4)
        lines.append(f"{' '.join(picked)},{10 * (picked == 'dear').sum() + 2.5:.1f},{(picked == 'fast').sum() * 3 - 1}")
    data = tmp_path / "scores.csv"
    data.write_text("\n".join(lines) + "\n")
    out = train(["problem=regression", "data=text_files", f"data.train_file={data}", "data.label_field=[price,speed]",
                 "data.labels=null"], tmp_path / "run")
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert math.isfinite(metrics["test/spearman"]) and math.isfinite(metrics["test/mae"])
    card = json.loads((out / "model" / "tunelab.json").read_text())["problem"]
    assert card["targets"] == ["price", "speed"] and len(card["mean"]) == len(card["std"]) == 2
    source = tmp_path / "in.txt"
    source.write_text("good cheap fast fast\n")
    predict(out / "model", source, tmp_path / "out.jsonl")
    [row] = rows(tmp_path / "out.jsonl")
    assert set(row["scores"]) == {"price", "speed"}


def test_regression_int8_and_onnx_reload_with_the_same_outputs(stars_run: Path) -> None:
    check_variants(stars_run, "regression")


def test_regression_distils_on_the_teachers_outputs(stars_run: Path, tmp_path: Path) -> None:
    out = train(["experiment=reviews_stars", "task=distill", f"teacher.path={stars_run}"], tmp_path / "run")
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert {"test/teacher_spearman", "test/spearman_ratio", "test/agreement", "train/kd"} <= set(metrics)
    assert math.isfinite(metrics["test/spearman_ratio"])


# ----------------------------------------------------------------------------- multi-label, end to end
def test_multi_label_run_stores_thresholds_and_predicts_label_sets(aspects_run: Path, tmp_path: Path) -> None:
    from transformers import pipeline

    metrics = json.loads((aspects_run / "metrics.json").read_text())["metrics"]
    assert {"val/f1_micro_best", "test/f1_micro", "test/f1_macro", "test/map"} <= set(metrics)
    card = json.loads((aspects_run / "model" / "tunelab.json").read_text())
    problem = card["problem"]
    assert problem["name"] == "multi_label" and len(problem["thresholds"]) == len(problem["labels"]) == 6
    config = json.loads((aspects_run / "model" / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification"
    texts = test_texts()
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": t, "aspects": ["quality"]}) + "\n" for t in texts))
    summary = predict(aspects_run / "model", source, tmp_path / "out.jsonl", **{"data.label_field": "aspects"})
    out = rows(tmp_path / "out.jsonl")
    plain = pipeline("text-classification", model=str(aspects_run / "model"), top_k=None, device="cpu")
    for row, theirs in zip(out, plain(texts, truncation=True, max_length=48), strict=True):
        assert set(row["probabilities"]) == set(problem["labels"])
        for answer in theirs:  # a plain pipeline applies the sigmoid of a multi-label config
            assert abs(row["probabilities"][answer["label"]] - answer["score"]) < 1e-4
        decided = [n for n, t in zip(problem["labels"], problem["thresholds"], strict=True)
                   if row["probabilities"][n] >= t]
        assert row["labels"] == decided
    assert summary["labelled"] == len(texts) and 0 <= summary["f1_micro"] <= 1


@pytest.mark.slow  # the regression twin runs in the fast suite; this one repeats the same machinery
def test_multi_label_int8_and_onnx_reload_with_the_same_outputs(aspects_run: Path) -> None:
    check_variants(aspects_run, "multi_label")


@pytest.mark.slow
def test_multi_label_distils_with_sigmoid_soft_targets(aspects_run: Path, tmp_path: Path) -> None:
    out = train(["experiment=reviews_aspects", "task=distill", f"teacher.path={aspects_run}"], tmp_path / "run")
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert {"test/teacher_f1_micro", "test/f1_micro_ratio", "train/kd"} <= set(metrics)


# ----------------------------------------------------------------------------- shared checks
def check_variants(run: Path, name: str) -> None:
    """int8 and ONNX variants carry the problem and reload with the outputs they had before saving; the
    compression run measures every variant with the problem's metric."""
    from tunelab.artifacts import onnx as onnx_kind
    from tunelab.artifacts import quantized
    from tunelab.compress import onnx_export, quantize
    from tunelab.compress.config import compose
    from tunelab.compress.run import run as compress
    from tunelab.deploy.predictor import Predictor

    source, work, texts = artifacts.load(run / "model"), run.parent / "variants", test_texts()
    batch = {k: torch.from_numpy(v) for k, v in Predictor(source, "torch").encode(texts).items()}
    with torch.inference_mode():
        fp32 = source.net.eval()(batch).logits
        int8 = quantize.torch_dynamic(source.net)
        before = int8(batch).logits
        graph = onnx_export.export(source.net, work / "fp32.onnx", batch)
        graph_int8 = quantize.onnx_dynamic(graph, work / "int8.onnx")
        onnx_before = onnx_kind.OnnxNet(graph_int8)(batch).logits
    saved = {"int8": quantized.save(work / "int8", int8, source, {"method": "torch-dynamic"}),
             "onnx_fp32": onnx_kind.save(work / "onnx_fp32", graph, source, {"precision": "fp32"}),
             "onnx_int8": onnx_kind.save(work / "onnx_int8", graph_int8, source, {"precision": "int8"})}
    expected = {"int8": before, "onnx_fp32": fp32, "onnx_int8": onnx_before}
    for variant, folder in saved.items():
        loaded = artifacts.load(folder)
        assert loaded.problem.name == name and loaded.problem.outputs == source.problem.outputs
        assert loaded.problem.card() == source.problem.card()
        with torch.inference_mode():
            after = loaded.net(batch).logits
        torch.testing.assert_close(after, expected[variant], atol=1e-4, rtol=0)

    cfg = compose([f"source={run}", "prune=heads_ffn", "prune.heads=0.25", "prune.ffn=0.25", "latency.repeats=2",
                   "latency.warmup=1", "latency.batch_sizes=[1]", "eval.limit_batches=2", "importance.limit_batches=2"],
                  run.parent / "logs" / "compress" / "run", run.parent / "logs")
    result = compress(cfg)
    rows_by_name = {row["variant"]: row for row in result["rows"]}
    assert {"fp32", "pruned", "int8 (torch)", "ONNX fp32", "ONNX int8", "pruned+int8 (ONNX)"} <= set(rows_by_name)
    assert rows_by_name["pruned"]["params"] < rows_by_name["fp32"]["params"]
    assert artifacts.load(Path(cfg.paths.output_dir) / "pruned").problem.card() == source.problem.card()
    assert rows_by_name["fp32"]["agreement"] == pytest.approx(1.0)
    assert all(math.isfinite(row["score"]) and row["agreement"] > 0.5 for row in rows_by_name.values())
