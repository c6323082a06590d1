"""Compression: ONNX parity, int8 and pruned artifacts that reload, head/FFN slicing equal to masking,
unstructured sparsity, bad input before any work, and a source folder that is never modified."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from tunelab import artifacts

LABELS = ["negative", "positive"]


def text_batch(tokenizer, n: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, len(tokenizer), (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, length // 2:] = 0  # one padded row
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (n,), generator=g)}


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny text classifier saved as a `model/` folder (3 layers, 4 heads, FFN 64)."""
    from tunelab.data.tokenizer import train_wordpiece
    from tunelab.models.text import TextModel

    torch.manual_seed(0)
    texts = [f"the {w} is {a}" for w in ("book", "kettle", "phone", "film") for a in ("good", "bad", "fine")]
    tokenizer = train_wordpiece(texts * 20, vocab_size=120)
    net = TextModel("classifier", LABELS, tokenizer, hidden_size=32, num_layers=3, num_heads=4,
                    intermediate_size=64, max_position_embeddings=64, dropout=0.0)
    return artifacts.save(tmp_path_factory.mktemp("text") / "model", net.eval(), labels=LABELS, tokenizer=tokenizer,
                          max_length=64, card={"task": "finetune"})


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tunelab.models.vision import ImageModel

    torch.manual_seed(0)
    net = ImageModel("classifier", [str(i) for i in range(10)], name="test_resnet")
    config = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bilinear",
              "crop_pct": 1.0}
    return artifacts.save(tmp_path_factory.mktemp("image") / "model", net.eval(), labels=net.labels,
                          data_config=config, card={"task": "finetune"})


def predictions(net, batches) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [net(b).logits for b in batches]


# ----------------------------------------------------------------------------- ONNX and int8
def test_onnx_text_matches_pytorch_at_two_shapes_and_reloads_with_int8(text_folder: Path, tmp_path: Path) -> None:
    from tunelab.artifacts import onnx as onnx_kind
    from tunelab.compress import onnx_export, quantize

    source = artifacts.load(text_folder)
    shapes = [text_batch(source.tokenizer, 1, 7), text_batch(source.tokenizer, 5, 23, seed=1)]
    graph = onnx_export.export(source.net, tmp_path / "fp32.onnx", text_batch(source.tokenizer, 2, 16))
    saved = onnx_kind.save(tmp_path / "onnx_fp32", graph, source, {"precision": "fp32"})
    loaded = artifacts.load(saved)
    assert loaded.kind == "onnx-classifier" and loaded.modality == "text" and loaded.labels == LABELS
    assert loaded.tokenizer.get_vocab() == source.tokenizer.get_vocab()
    assert onnx_export.max_difference(source.net, loaded.net, shapes) <= 1e-4
    for batch, logits in zip(shapes, predictions(loaded.net, shapes), strict=True):
        assert logits.shape == (batch["input_ids"].shape[0], 2)

    int8 = onnx_kind.save(tmp_path / "onnx_int8", quantize.onnx_dynamic(graph, tmp_path / "int8.onnx"), source,
                          {"precision": "int8"})
    before = predictions(onnx_kind.OnnxNet(tmp_path / "int8.onnx"), shapes)
    after = predictions(artifacts.load(int8).net, shapes)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert (int8 / "model.onnx").stat().st_size < (saved / "model.onnx").stat().st_size


def test_torch_int8_reloads_with_the_same_predictions(text_folder: Path, tmp_path: Path) -> None:
    from tunelab.artifacts import quantized
    from tunelab.compress import quantize

    source = artifacts.load(text_folder)
    batches = [text_batch(source.tokenizer, 4, 12)]
    model = quantize.torch_dynamic(source.net)
    loaded = artifacts.load(quantized.save(tmp_path / "int8", model, source, {"method": "torch-dynamic"}))
    assert loaded.kind == "int8-classifier"
    assert torch.equal(predictions(model, batches)[0], predictions(loaded.net, batches)[0])


def test_onnx_image_matches_pytorch_at_two_batch_sizes(image_folder: Path, tmp_path: Path) -> None:
    from tunelab.artifacts import onnx as onnx_kind
    from tunelab.compress import onnx_export

    source = artifacts.load(image_folder)
    g = torch.Generator().manual_seed(0)
    shapes = [{"pixel_values": torch.randn(n, 3, 32, 32, generator=g)} for n in (1, 6)]
    graph = onnx_export.export(source.net, tmp_path / "fp32.onnx", {"pixel_values": torch.randn(2, 3, 32, 32)})
    loaded = artifacts.load(onnx_kind.save(tmp_path / "onnx", graph, source, {"precision": "fp32"}))
    assert loaded.modality == "image" and loaded.preprocessing["image"]["input_size"] == [3, 32, 32]
    assert onnx_export.max_difference(source.net, loaded.net, shapes) <= 1e-4


# ----------------------------------------------------------------------------- structured pruning
def test_pruned_heads_and_ffn_equal_the_masked_model_and_reload(text_folder: Path, tmp_path: Path) -> None:
    from tunelab.artifacts import pruned as pruned_kind
    from tunelab.compress import heads, structured

    source = artifacts.load(text_folder)
    batch = text_batch(source.tokenizer, 6, 20)
    plan = structured.make_plan(source.net, [batch], heads=0.5, ffn=0.5, layers=0)
    assert sum(map(len, plan.heads.values())) == 6 and all(len(v) == 32 for v in plan.ffn.values())
    model = copy.deepcopy(source.net)
    structured.apply(model.net, plan)
    masks = heads.Gates.ones(source.net.net)
    for layer, removed in plan.heads.items():
        masks.heads[layer][removed] = 0
    for layer, removed in plan.ffn.items():
        masks.ffn[layer][removed] = 0
    with torch.inference_mode(), heads.gated(source.net.net, masks):
        masked = source.net(batch).logits
    sliced = predictions(model, [batch])[0]
    assert (masked - sliced).abs().max() <= 1e-5
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in source.net.parameters())

    loaded = artifacts.load(pruned_kind.save(tmp_path / "pruned", model, source, {"method": "heads_ffn"}))
    assert loaded.kind == "pruned-classifier" and not loaded.card["compression"]["standard_config"]
    assert torch.equal(predictions(loaded.net, [batch])[0], sliced)


def test_an_iterative_schedule_reaches_the_same_target_in_rounds(text_folder: Path) -> None:
    from tunelab.compress import structured
    from tunelab.models import surgery

    source = artifacts.load(text_folder)
    rounds = []
    model, plans = structured.prune(source.net, lambda: [text_batch(source.tokenizer, 4, 12)], heads=0.5, ffn=0.5,
                                    layers=0, iterations=2, recover=lambda m, k: rounds.append(k) or m)
    assert len(plans) == 2 and rounds == [1]  # recovered between the rounds, not after the last
    shapes = surgery.layout(model.net)
    assert sum(s["heads"] for s in shapes) == 6 and {s["ffn"] for s in shapes} == {32}
    assert surgery.layout(source.net.net) == [{"heads": 4, "ffn": 64}] * 3  # the source is untouched


def test_a_layer_and_uniform_ffn_pruned_folder_loads_in_plain_transformers(text_folder: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    from tunelab.artifacts import pruned as pruned_kind
    from tunelab.compress import structured

    source = artifacts.load(text_folder)
    batch = text_batch(source.tokenizer, 4, 16)
    model = copy.deepcopy(source.net)
    structured.apply(model.net, structured.make_plan(model, [batch], heads=0.0, ffn=0.25, layers=1))
    folder = pruned_kind.save(tmp_path / "pruned", model, source, {"method": "ffn_layers"})
    assert artifacts.load(folder).card["compression"]["standard_config"]
    plain = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert plain.config.num_hidden_layers == 2 and plain.config.intermediate_size == 48
    with torch.inference_mode():
        logits = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert (logits - predictions(model, [batch])[0]).abs().max() <= 1e-5


# ----------------------------------------------------------------------------- unstructured pruning
def test_unstructured_pruning_reaches_the_requested_sparsity(text_folder: Path, image_folder: Path) -> None:
    from tunelab.compress import unstructured

    for folder in (text_folder, image_folder):
        source = artifacts.load(folder)
        assert unstructured.sparsity(source.net) < 0.01
        for amount in (0.3, 0.7):
            pruned = unstructured.prune_global(source.net, amount)
            assert abs(unstructured.sparsity(pruned) - amount) < 1e-3
            assert not any("weight_orig" in k for k in pruned.state_dict())  # permanent: no masks left
        assert unstructured.sparsity(source.net) < 0.01  # the source is untouched


# ----------------------------------------------------------------------------- the run
def write_records(folder: Path, n: int) -> dict[str, Path]:
    import json

    words = {"positive": ["good", "fine"], "negative": ["bad", "awful"]}
    files = {}
    for split, seed in (("train", 0), ("val", 1), ("test", 2)):
        g = torch.Generator().manual_seed(seed)
        lines = []
        for i in range(n):
            label = LABELS[i % 2]
            word = words[label][int(torch.randint(0, 2, (1,), generator=g))]
            lines.append(json.dumps({"text": f"the {['book', 'kettle', 'phone'][i % 3]} is {word}", "label": label}))
        files[split] = folder / f"{split}.jsonl"
        files[split].write_text("\n".join(lines) + "\n")
    return files


@pytest.fixture
def compress_cfg(tmp_path: Path, text_folder: Path):
    from tunelab.compress.config import compose

    files = write_records(tmp_path, 24)
    data = ["data=text_files", *(f"data.{s}_file={f}" for s, f in files.items()), f"data.labels=[{','.join(LABELS)}]",
            "data.batch_size=8", "data.max_length=32"]
    quick = ["latency.repeats=2", "latency.warmup=1", "latency.batch_sizes=[1,4]", "importance.limit_batches=2"]

    def make(*overrides: str, source: Path = text_folder, data: list[str] = data):
        return compose([f"source={source}", *data, *quick, *overrides], tmp_path / "logs" / "compress" / "run",
                       tmp_path / "logs")

    return make


def test_a_run_writes_variants_and_a_report_and_leaves_the_source_unchanged(compress_cfg, text_folder: Path) -> None:
    import json

    from conftest import snapshot

    from tunelab.compress.run import run

    before = snapshot(text_folder)
    cfg = compress_cfg("prune=heads_ffn", "recover=finetune", "recover.epochs=1", "recover.limit_batches=2",
                       "export=none")
    result = run(cfg)
    out = Path(cfg.paths.output_dir)
    assert snapshot(text_folder) == before
    names = [row["variant"] for row in result["rows"]]
    assert names == ["fp32", "pruned", "pruned+recovered", "int8 (torch)", "pruned+int8 (torch)"]
    rows = {row["variant"]: row for row in json.loads((out / "metrics.json").read_text())["rows"]}
    assert rows["pruned"]["params"] < rows["fp32"]["params"] and rows["fp32"]["agreement"] == 1.0
    assert all(row["b1_p50_ms"] > 0 and 0 <= row["score"] <= 1 for row in rows.values())
    assert "| pruned+recovered |" in (out / "report.md").read_text()
    assert list((out / "tensorboard").glob("events.*"))
    assert (out.parent / "latest").resolve() == out.resolve()
    for folder in ("pruned", "pruned_recovered", "int8", "pruned_int8"):
        assert artifacts.load(out / folder).labels == LABELS


@pytest.mark.parametrize(("overrides", "fragment"), [
    (["prune=heads_ffn", "prune.amount=1.0"], "prune.amount=1.0: expected a fraction in [0, 1)"),
    (["prune=unstructured", "prune.amount=-0.1"], "prune.amount=-0.1: expected a fraction in [0, 1)"),
    (["prune=heads_ffn", "+prune.remove_heads={1: [0, 1, 2, 3]}"], "layer 1 has 4 heads"),
    (["prune=heads_ffn", "prune.layers=3"], "the model has 3 layers"),
    (["prune=channels"], "prune=channels prunes CNN channels"),
    (["recover=finetune"], "nothing to recover without pruning"),
])
def test_bad_values_fail_before_any_work(compress_cfg, overrides: list[str], fragment: str) -> None:
    from tunelab.compress.run import run
    from tunelab.errors import TunelabError

    cfg = compress_cfg(*overrides)
    with pytest.raises(TunelabError) as info:
        run(cfg)
    assert fragment in str(info.value)
    assert not (Path(cfg.paths.output_dir) / "status.json").exists()


def test_bad_sources_fail_before_any_work(compress_cfg, tmp_path: Path, tiny_hf_dir: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    from tunelab.compress.run import run
    from tunelab.errors import TunelabError

    plain = tmp_path / "plain"  # a plain HF classifier: its labels are LABEL_0, LABEL_1
    AutoModelForSequenceClassification.from_pretrained(tiny_hf_dir, num_labels=2).save_pretrained(plain)
    (tmp_path / "empty").mkdir()
    cases = [(tmp_path / "empty", [], "holds no model"), (tiny_hf_dir, [], "not a sequence classifier"),
             (plain, ["prune=heads_ffn", "recover=distill"], "names no labels")]
    for source, overrides, fragment in cases:
        with pytest.raises(TunelabError, match=fragment):
            run(compress_cfg(*overrides, source=source))


# ----------------------------------------------------------------------------- slow: whole runs
@pytest.mark.slow
def test_the_command_line_reports_bad_input_in_one_line_and_leaves_no_run(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from conftest import ROOT

    (tmp_path / "empty").mkdir()
    env = {**os.environ, "TUNELAB_LOG_DIR": str(tmp_path / "logs"), "HYDRA_FULL_ERROR": "0"}
    for args, fragment in ((["source=" + str(tmp_path / "empty")], "holds no model"),
                           (["prune=heads_ffn", "prune.amount=2"], "prune.amount=2"),
                           (["prune=bogus"], "available options in 'prune'")):
        proc = subprocess.run([sys.executable, str(ROOT / "compress.py"), *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], proc.stderr
    assert not list((tmp_path / "logs").glob("compress/runs/*"))


@pytest.mark.slow
def test_a_text_run_with_onnx_exports_checks_and_measures_every_variant(compress_cfg, text_folder: Path) -> None:
    from conftest import snapshot

    from tunelab.compress.run import run

    before = snapshot(text_folder)
    result = run(compress_cfg("prune=heads_ffn", "recover=distill", "recover.epochs=1", "recover.limit_batches=2"))
    assert snapshot(text_folder) == before
    rows = {row["variant"]: row for row in result["rows"]}
    assert set(rows) == {"fp32", "pruned", "pruned+recovered", "int8 (torch)", "ONNX fp32", "ONNX int8",
                         "pruned+int8 (ONNX)"}
    assert rows["ONNX fp32"]["agreement"] == 1.0 and rows["ONNX int8"]["size_mb"] < rows["ONNX fp32"]["size_mb"]
    assert any("max |logit difference|" in note for note in result["notes"])


@pytest.mark.slow
def test_an_image_run_prunes_channels_and_quantizes_statically(compress_cfg, image_folder: Path) -> None:
    from conftest import snapshot

    from tunelab.compress.run import run

    before = snapshot(image_folder)
    cfg = compress_cfg("prune=channels", "recover=finetune", "recover.epochs=1", "recover.limit_batches=2",
                       "quantize.calibration_batches=2", source=image_folder, data=["data=digits"])
    result = run(cfg)
    assert snapshot(image_folder) == before
    rows = {row["variant"]: row for row in result["rows"]}
    assert set(rows) == {"fp32", "pruned", "pruned+recovered", "ONNX fp32", "ONNX int8", "pruned+int8 (ONNX)"}
    assert rows["pruned"]["params"] < rows["fp32"]["params"]
    assert any("static QDQ" in note for note in result["notes"])
    reloaded = artifacts.load(Path(cfg.paths.output_dir) / "pruned_recovered")
    assert reloaded.kind == "pruned-classifier" and reloaded.modality == "image"


@pytest.mark.slow
def test_model_pruning_during_fine_tuning_exports_a_sparse_model(make_cfg) -> None:
    from tunelab.compress import unstructured
    from tunelab.train import run

    cfg = make_cfg("callbacks=pruning", "callbacks.pruning.amount=0.4")
    run(cfg)
    model = artifacts.load(Path(cfg.paths.output_dir) / "model").net
    assert abs(unstructured.sparsity(model) - 0.4) < 1e-3
