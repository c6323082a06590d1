"""Fine-tuning end to end: artifacts, exports that load without tunelab, resume, pretrained weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import FAST, run_cli, trained_task
from hydra.utils import instantiate
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tunelab.runs import run_dir
from tunelab.train import run


@pytest.fixture(scope="module")
def text_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real `python train.py` run on the embedded reviews, shared by the artifact tests."""
    cwd = tmp_path_factory.mktemp("cli")
    proc = run_cli(*FAST, "model.hidden_size=64", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return (cwd / "logs" / "finetune" / "latest").resolve()


def test_run_leaves_every_artifact(text_run: Path) -> None:
    assert (text_run / ".hydra" / "config.yaml").is_file()
    assert (text_run / "checkpoints" / "last.ckpt").is_file()
    assert any(p.name != "last.ckpt" for p in (text_run / "checkpoints").glob("*.ckpt"))
    assert list((text_run / "tensorboard").glob("events.out.tfevents.*"))
    metrics = json.loads((text_run / "metrics.json").read_text())["metrics"]
    assert {"val/acc", "val/acc_best", "test/acc", "test/f1"} <= set(metrics)
    assert 0.0 <= metrics["test/acc"] <= 1.0
    assert (text_run / "model" / "config.json").is_file()
    assert (text_run / "model" / "tokenizer.json").is_file()
    assert text_run.parent.name == "runs"


def test_tensorboard_has_scalars_hparams_and_confusion_matrix(text_run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(text_run / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = set(tags["scalars"])
    assert {"train/loss", "train/acc", "train/f1", "val/acc", "val/f1", "val/acc_best", "test/acc"} <= scalars
    assert any(t.startswith("lr-") for t in scalars), scalars
    assert any("samples_per_sec" in t for t in scalars), scalars
    assert "val/confusion_matrix" in tags["images"]
    plugins = acc.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in plugins
    assert b"test/acc" in plugins["_hparams_/experiment"]  # the HPARAMS row has its metric columns ...
    for tag in ("val/acc_best", "test/acc"):  # ... without NaN placeholders at the start of the curves
        assert all(np.isfinite(e.value) for e in acc.Scalars(tag)), tag


def test_text_export_loads_in_plain_transformers_with_same_logits(text_run: Path) -> None:
    from conftest import compose_cfg

    model = AutoModelForSequenceClassification.from_pretrained(text_run / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(text_run / "model")
    assert model.config.id2label == {0: "negative", 1: "positive"}
    cfg = compose_cfg([*FAST, "model.hidden_size=64"], text_run.parent / "probe")
    task, _ = trained_task(cfg, text_run, stage="fit")
    batch = tokenizer(["the kettle is sturdy and great", "a tedious, predictable book"], padding=True,
                      return_tensors="pt", return_token_type_ids=False)
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, task(dict(batch)), atol=1e-5)


def test_image_run_exports_timm_folder_with_same_logits(make_cfg) -> None:
    cfg = make_cfg("data=digits", "model=timm", "model.name=resnet10t")
    run(cfg)
    out = Path(cfg.paths.output_dir)
    weights = out / "model" / "model.safetensors"
    assert weights.is_file() and (out / "model" / "config.json").is_file()
    net = timm.create_model(f"local-dir:{out / 'model'}", pretrained=True).eval()
    same = timm.create_model("resnet10t", pretrained=True, num_classes=10,
                             pretrained_cfg_overlay={"file": str(weights), "num_classes": 10}).eval()
    assert timm.data.resolve_data_config(model=net)["input_size"] == (3, 32, 32)
    task, dm = trained_task(cfg, out)
    x = next(iter(dm.test_dataloader()))
    with torch.no_grad():
        assert torch.allclose(net(x["pixel_values"]), task(x), atol=1e-5)
        assert torch.allclose(same(x["pixel_values"]), task(x), atol=1e-5)


def test_pretrained_directory_loads_exactly_those_weights(make_cfg, tiny_hf_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModel

    data = tmp_path / "train.jsonl"
    rows = [{"text": f"the {w} is {a}", "label": a} for w in ("book", "kettle", "phone") for a in ("good", "bad")]
    data.write_text("\n".join(json.dumps(r) for r in rows * 10))
    cfg = make_cfg("model=hf", f"model.pretrained={tiny_hf_dir}", "data=text_files", f"data.train_file={data}")
    dm = instantiate(cfg.data)
    dm.setup("fit")
    task = instantiate(cfg.task, datamodule=dm)
    reference = AutoModel.from_pretrained(tiny_hf_dir, add_pooling_layer=False)
    ours = task.model.net.base_model.state_dict()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(ours[name], tensor), name
    assert len(dm.tokenizer) == len(AutoTokenizer.from_pretrained(tiny_hf_dir))
    assert all(m.training for m in task.model.modules())  # from_pretrained's eval mode would turn dropout off
    assert run(cfg) is not None


def test_two_runs_never_share_a_folder(tmp_path: Path) -> None:
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(2, maxtasksperchild=1) as pool:  # two processes, as two users would
        dirs = pool.starmap(run_dir, [(str(tmp_path), "finetune", None)] * 2)
    assert dirs[0] != dirs[1]


@pytest.mark.parametrize(("fast_bf16", "trainer", "expected"), [
    (False, {"accelerator": "cpu", "precision": "bf16-mixed"}, "32-true"),
    (False, {"accelerator": "cpu", "precision": "bf16-true"}, "32-true"),
    (True, {"accelerator": "cpu", "precision": "bf16-mixed"}, None),
    (False, {"accelerator": "cpu", "precision": "32-true"}, None),
    (False, {"accelerator": "gpu", "precision": "bf16-mixed"}, None),
])
def test_bf16_on_a_cpu_without_fast_bfloat16_trains_in_fp32(monkeypatch, fast_bf16: bool, trainer: dict,
                                                             expected: str | None) -> None:
    from omegaconf import OmegaConf

    from tunelab.train import cpu_precision

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: fast_bf16)
    assert cpu_precision(OmegaConf.create(trainer)) == expected
