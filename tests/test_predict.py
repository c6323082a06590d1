"""`predict.py`: the training run's test-step predictions from the folder alone, every bad row reported with
its file and line (skipped or fatal, by config), bad commands refused before any work, flat memory."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import ROOT, snapshot, trained_task
from tunelab import artifacts
from tunelab.errors import TunelabError

LABELS = ["negative", "positive"]
WORDS = ["good", "great", "fine", "bad", "awful", "poor", "the", "film", "kettle", "was", "really"]


def predict_cfg(model: Path | str, input: Path | str, output: Path | str, **overrides) -> OmegaConf:
    """The config `python predict.py model=... input=... output=... <overrides>` composes."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf" / "deploy"), version_base="1.3"):
        args = [f"model={model}", f"input={input}", f"output={output}", "progress=false",
                *(f"{k}={v}" for k, v in overrides.items())]
        return compose("predict", overrides=args)


def predict(*args, **overrides) -> dict:
    from tunelab.deploy.predict import run

    return run(predict_cfg(*args, **overrides))


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small text classifier folder, as a finished run would leave it (`run/model`, `status.json`)."""
    from tunelab.data.tokenizer import train_wordpiece
    from tunelab.models.text import TextModel

    torch.manual_seed(0)
    tokenizer = train_wordpiece([" ".join(WORDS)] * 50, vocab_size=60)
    net = TextModel("classifier", LABELS, tokenizer, hidden_size=32, num_layers=1, num_heads=2,
                    intermediate_size=64, max_position_embeddings=64)
    run = tmp_path_factory.mktemp("run")
    (run / "status.json").write_text('{"state": "finished"}')
    return artifacts.save(run / "model", net, labels=LABELS, tokenizer=tokenizer, max_length=32,
                          card={"task": "finetune", "metrics": {"test/acc": 0.5}})


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


# ----------------------------------------------------------------------------- same answers as the test step
def test_text_predictions_are_the_test_steps(make_cfg, tmp_path: Path) -> None:
    from tunelab.train import run

    cfg = make_cfg("data.domains=[books]", "trainer.limit_test_batches=5")  # the first 5 x 32 books test records
    run(cfg)
    folder = Path(cfg.paths.output_dir)
    metrics = json.loads((folder / "metrics.json").read_text())["metrics"]
    task, dm = trained_task(cfg, folder)
    with torch.inference_mode():  # the test step's logits, batch by batch, as far as the run tested
        logits = torch.cat([task.model(b).logits for b in itertools.islice(dm.test_dataloader(), 5)])
    test = tmp_path / "books_test.jsonl"  # the test split the run saw: the books records of the test file
    records = [r for r in map(json.loads, Path(cfg.data.test_file).read_text().splitlines()) if r["domain"] == "books"]
    write_jsonl(test, records[:5 * cfg.data.batch_size])
    summary = predict(folder, test, tmp_path / "out.jsonl", **{"data.batch_size": 17})
    got = rows(tmp_path / "out.jsonl")
    assert [LABELS.index(r["label"]) for r in got] == logits.argmax(-1).tolist()
    probabilities = torch.tensor([[r["probabilities"][name] for name in LABELS] for r in got], dtype=torch.float64)
    torch.testing.assert_close(probabilities, logits.softmax(-1).double(), atol=1e-5, rtol=0)  # not only the argmax
    assert summary["acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)
    assert summary["f1"] == pytest.approx(metrics["test/f1"], abs=1e-4)
    assert summary["predicted"] == summary["labelled"] == len(logits) and summary["backend"] == "torch"
    first = got[0]
    assert set(first) == {"line", "label", "probability", "probabilities", "target"}
    assert first["probability"] == max(first["probabilities"].values())
    assert sum(first["probabilities"].values()) == pytest.approx(1.0)


def test_length_groups_give_the_answers_of_one_padded_batch(tiny_classifier: Path) -> None:
    from tunelab.deploy.predictor import Predictor

    predictor = Predictor(artifacts.load(tiny_classifier))
    texts = [" ".join(WORDS[: 1 + (7 * i) % len(WORDS)] * (1 + i % 3)) for i in range(40)]
    with torch.inference_mode():
        whole = predictor.run(predictor.encode(texts))  # every text padded to the longest
    run, widths = predictor.run, []
    predictor.run = lambda batch: widths.append(batch["input_ids"].shape[1]) or run(batch)
    np.testing.assert_allclose(predictor.outputs(texts), whole, atol=1e-5, rtol=0)
    assert len(widths) > 1 and len(set(widths)) > 1  # it did run groups of different widths


@pytest.mark.parametrize("side", ["right", "left"])
def test_texts_are_padded_as_the_tokenizer_pads_them(tiny_classifier: Path, side: str) -> None:
    from tunelab.deploy.predictor import Predictor

    predictor = Predictor(artifacts.load(tiny_classifier))
    predictor.tokenizer.padding_side = side
    predictor.tokenizer.pad_token = "[UNK]"  # a pad id other than 0
    assert predictor.tokenizer.pad_token_id != 0
    texts = ["good", "the film was really awful", "fine kettle"]
    want = predictor.tokenizer(texts, padding=True, return_tensors="np")
    for key, value in predictor.encode(texts).items():
        np.testing.assert_array_equal(value, want[key])


def test_a_tokenizer_without_a_padding_token_is_named(tiny_classifier: Path) -> None:
    from tunelab.deploy.predictor import Predictor

    predictor = Predictor(artifacts.load(tiny_classifier))
    predictor.tokenizer.pad_token = None
    assert predictor.encode(["good film"])["input_ids"].shape[0] == 1  # one text needs no padding
    with pytest.raises(TunelabError, match="no padding token"):
        predictor.encode(["good", "the film was really awful"])


def test_length_groups_split_only_where_padding_costs_more_than_a_call() -> None:
    from tunelab.deploy.predictor import length_groups

    assert length_groups([]) == [] and length_groups([7] * 5) == [[0, 1, 2, 3, 4]]
    assert length_groups([5, 40, 6, 41, 5], call_cost=16) == [[0, 4, 2], [1, 3]]
    assert length_groups([5, 40, 6, 41, 5], call_cost=10_000) == [[0, 4, 2, 1, 3]]
    groups = length_groups([10] * 150, max_group=64)
    assert len(groups) == 3 and max(map(len, groups)) <= 64 and sorted(sum(groups, [])) == list(range(150))


# ----------------------------------------------------------------------------- rows it cannot take
BAD_ROWS = [
    {"text": "the film was good", "label": "positive"},
    "{not json",
    {"text": "   ", "label": "negative"},
    {"body": "no text field here"},
    {"text": "the kettle was awful", "label": "neutral"},
    [1, 2],
    {"text": "really bad"},
]


def test_bad_rows_are_skipped_into_the_errors_file_with_their_line(tiny_classifier: Path, tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", BAD_ROWS)
    summary = predict(tiny_classifier, source, tmp_path / "out.jsonl")
    assert [r["line"] for r in rows(tmp_path / "out.jsonl")] == [1, 7]
    assert "target" not in rows(tmp_path / "out.jsonl")[1]  # unlabelled row: predicted, not scored
    errors = rows(tmp_path / "out.errors.jsonl")
    assert [e["line"] for e in errors] == [2, 3, 4, 5, 6]
    assert all(e["file"] == str(source) and e["error"].startswith(f"{source}:{e['line']}: ") for e in errors)
    for fragment, error in zip(["malformed JSON", "empty 'text'", "missing text field 'text'", "label 'neutral'",
                                "expected a JSON object"], errors, strict=True):
        assert fragment in error["error"], error
    assert summary["predicted"] == 2 and summary["skipped"] == 5 and summary["labelled"] == 1


def test_a_bad_row_fails_the_run_when_asked_and_nothing_is_written(tiny_classifier: Path, tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", BAD_ROWS)
    (tmp_path / "out.jsonl").write_text("earlier predictions\n")
    before = snapshot(tmp_path)
    with pytest.raises(TunelabError, match=rf"^{source}:2: malformed JSON .*on_error=fail"):
        predict(tiny_classifier, source, tmp_path / "out.jsonl", on_error="fail")
    assert snapshot(tmp_path) == before


def test_csv_tsv_and_txt_inputs_with_field_options(tiny_classifier: Path, tmp_path: Path) -> None:
    (tmp_path / "in.csv").write_text('review,stars\n"the film, really good",positive\n"",negative\nbad,x,y\n')
    summary = predict(tiny_classifier, tmp_path / "in.csv", tmp_path / "csv.jsonl",
                      **{"data.text_field": "review", "data.label_field": "stars"})
    assert [r["line"] for r in rows(tmp_path / "csv.jsonl")] == [2] and summary["labelled"] == 1
    assert [e["line"] for e in rows(tmp_path / "csv.errors.jsonl")] == [3, 4]
    (tmp_path / "in.tsv").write_text("text\nthe film was fine\n")
    assert predict(tiny_classifier, tmp_path / "in.tsv", tmp_path / "tsv.jsonl")["predicted"] == 1
    (tmp_path / "in.txt").write_text("the film\n\nreally poor\n" + "x" * 300 + "\n")
    summary = predict(tiny_classifier, tmp_path / "in.txt", tmp_path / "txt.jsonl", **{"data.max_record_bytes": 200})
    assert [r["line"] for r in rows(tmp_path / "txt.jsonl")] == [1, 3] and "acc" not in summary
    [error] = rows(tmp_path / "txt.errors.jsonl")
    assert error["line"] == 4 and "exceeds data.max_record_bytes=200" in error["error"]


# ----------------------------------------------------------------------------- bad commands: before any work
@pytest.mark.parametrize("case", ["masked_lm", "no_text_field", "inside_model", "inside_run", "not_jsonl",
                                  "folder_for_text", "missing_input", "backend", "compress_run"])
def test_bad_commands_fail_before_any_work(case: str, tiny_classifier: Path, tiny_hf_dir: Path,
                                           tmp_path: Path) -> None:
    good = write_jsonl(tmp_path / "in.jsonl", [{"text": "the film"}])
    model, source, output, extra, expected = tiny_classifier, good, tmp_path / "out.jsonl", {}, ""
    if case == "masked_lm":
        model, expected = tiny_hf_dir, "is a BertForMaskedLM, not a sequence classifier or image classifier"
    elif case == "no_text_field":
        source = write_jsonl(tmp_path / "bad.jsonl", [{"review": "the film"}] * 3)
        expected = "input: " + f"{source}:1: missing text field 'text' (found fields ['review']; set data.text_field)"
    elif case == "inside_model":
        output, expected = tiny_classifier / "preds.jsonl", "is inside the source artifact"
    elif case == "inside_run":
        output, expected = tiny_classifier.parent / "preds.jsonl", "is inside the source artifact"
    elif case == "not_jsonl":
        output, expected = tmp_path / "out.csv", "expected a .jsonl file"
    elif case == "folder_for_text":
        source, expected = tmp_path, "is a folder, but the model is a text classifier"
    elif case == "missing_input":
        source, expected = tmp_path / "nope.jsonl", "input: not found"
    elif case == "backend":
        extra, expected = {"backend": "onnxruntime"}, "holds no ONNX graph"
    elif case == "compress_run":
        for variant in ("int8", "onnx_int8"):
            (tmp_path / "run" / variant).mkdir(parents=True)
            (tmp_path / "run" / variant / "tunelab.json").write_text("{}")
        model = tmp_path / "run"
        expected = f"is a compression run, not a model folder (expected one of its variants: model={model}/int8, "
    before, model_before = snapshot(tmp_path), snapshot(tiny_classifier.parent)
    with pytest.raises(TunelabError, match=None) as info:
        predict(model, source, output, **extra)
    assert expected in str(info.value)
    assert snapshot(tmp_path) == before and snapshot(tiny_classifier.parent) == model_before


def test_the_command_line_reports_bad_input_in_one_line(tiny_classifier: Path, tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": "the film"}])
    proc = subprocess.run([sys.executable, str(ROOT / "predict.py"), f"model={tiny_classifier}", f"input={source}",
                           f"output={tiny_classifier / 'p.jsonl'}", "batch_size=3"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "batch_size" in proc.stderr and "data" in proc.stderr  # unknown key: names it and where it belongs
    assert not (tiny_classifier / "p.jsonl").exists()


# ----------------------------------------------------------------------------- streaming
@pytest.mark.slow
def test_memory_stays_flat_on_a_file_100_times_the_test_split(tiny_classifier: Path, tmp_path: Path) -> None:
    from tunelab.data.embedded import ensure

    test = (ensure("reviews", ROOT / ".cache" / "data") / "all" / "test.jsonl").read_text()
    small, large = tmp_path / "small.jsonl", tmp_path / "large.jsonl"
    small.write_text(test)
    with open(large, "w") as f:
        for _ in range(100):
            f.write(test)
    peaks = {}
    for path in (small, large):
        proc = subprocess.run([sys.executable, str(ROOT / "predict.py"), f"model={tiny_classifier}", f"input={path}",
                               f"output={tmp_path}/out_{path.stem}.jsonl", "progress=false", "data.batch_size=256"],
                              capture_output=True, text=True, timeout=1200, cwd=tmp_path,
                              env={**os.environ, "OMP_NUM_THREADS": "2"})
        assert proc.returncode == 0, proc.stderr[-2000:]
        peaks[path.stem] = json.loads((tmp_path / f"out_{path.stem}.metrics.json").read_text())["peak_rss_mb"]
    with open(tmp_path / "out_large.jsonl") as f:
        assert sum(1 for _ in f) == 100 * len(test.splitlines())
    assert peaks["large"] <= 1.1 * peaks["small"], peaks


# ----------------------------------------------------------------------------- ONNX variants and images (slow)
def onnx_variants(folder: Path, example: dict, out: Path) -> tuple[Path, Path]:
    """The fp32 and int8 ONNX folders compression writes for `folder` (its export and quantization)."""
    from tunelab.artifacts import onnx as onnx_kind
    from tunelab.compress import onnx_export, quantize

    source = artifacts.load(folder)
    graph = onnx_export.export(source.net, out / "fp32.onnx", example)
    quantize.onnx_dynamic(graph, out / "int8.onnx")
    return (onnx_kind.save(out / "onnx_fp32", graph, source, {"precision": "fp32"}),
            onnx_kind.save(out / "onnx_int8", out / "int8.onnx", source, {"precision": "int8"}))


def probabilities(path: Path, labels: list[str]) -> torch.Tensor:
    return torch.tensor([[r["probabilities"][name] for name in labels] for r in rows(path)], dtype=torch.float64)


@pytest.mark.slow
def test_text_onnx_predictions_are_the_test_steps(make_cfg, tmp_path: Path) -> None:
    from tunelab.train import run

    cfg = make_cfg("data.domains=[books]", "trainer.limit_train_batches=30", "trainer.limit_test_batches=null")
    run(cfg)
    folder = Path(cfg.paths.output_dir)
    task, dm = trained_task(cfg, folder)
    with torch.inference_mode():
        logits = torch.cat([task.model(b).logits for b in dm.test_dataloader()])
    test = write_jsonl(tmp_path / "test.jsonl", [r for r in map(json.loads, Path(cfg.data.test_file).read_text()
                                                                .splitlines()) if r["domain"] == "books"])
    fp32, int8 = onnx_variants(folder / "model", next(iter(dm.test_dataloader())), tmp_path)
    for name, model in (("fp32", fp32), ("int8", int8)):
        summary = predict(model, test, tmp_path / f"{name}.jsonl")
        assert summary["backend"] == "onnxruntime"  # auto: the artifact is an ONNX graph
        got = probabilities(tmp_path / f"{name}.jsonl", LABELS)
        agree = (got.argmax(-1) == logits.argmax(-1)).double().mean().item()
        if name == "fp32":
            torch.testing.assert_close(got, logits.softmax(-1).double(), atol=1e-4, rtol=0)
        else:  # dynamic int8: the same answers but for a few borderline rows
            assert agree >= 0.97, agree


@pytest.mark.slow
def test_image_predictions_are_the_test_steps(make_cfg, tmp_path: Path) -> None:
    from tunelab.train import run

    cfg = make_cfg("data=digits", "model=timm", "model.name=resnet10t", "trainer.limit_train_batches=10",
                   "trainer.limit_test_batches=null")
    run(cfg)
    folder = Path(cfg.paths.output_dir)
    metrics = json.loads((folder / "metrics.json").read_text())["metrics"]
    task, dm = trained_task(cfg, folder)
    with torch.inference_mode():
        logits = torch.cat([task.model(b).logits for b in dm.test_dataloader()])
    root = Path(cfg.data.root) / "test"
    labels = dm.labels
    summary = predict(folder, root, tmp_path / "torch.jsonl")
    assert [r["path"] for r in rows(tmp_path / "torch.jsonl")] == [p for p, _ in dm.datasets["test"].base.samples]
    torch.testing.assert_close(probabilities(tmp_path / "torch.jsonl", labels), logits.softmax(-1).double(),
                               atol=1e-5, rtol=0)
    assert summary["acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)
    fp32, _ = onnx_variants(folder / "model", next(iter(dm.test_dataloader())), tmp_path)
    assert predict(fp32, root, tmp_path / "onnx.jsonl")["backend"] == "onnxruntime"
    torch.testing.assert_close(probabilities(tmp_path / "onnx.jsonl", labels), logits.softmax(-1).double(),
                               atol=1e-4, rtol=0)
    listed = tmp_path / "list.txt"
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    listed.write_text(f"{dm.datasets['test'].base.samples[0][0]}\nbroken.png\nmissing.png\n")
    summary = predict(folder, listed, tmp_path / "list.jsonl")
    assert summary["predicted"] == 1 and summary["skipped"] == 2
    assert [e["line"] for e in rows(tmp_path / "list.errors.jsonl")] == [2, 3]
