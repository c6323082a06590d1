"""Distillation: the KD loss, a frozen teacher, end-to-end runs from HF and timm teachers, the cache, bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import FAST, check_one_ddp_run, check_one_trial_search, expect_error, run_cli
from hydra.utils import instantiate
from PIL import Image
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
)

from tunelab import artifacts
from tunelab.data.teacher_cache import load_or_build
from tunelab.errors import TunelabError
from tunelab.models.vision import ImageModel
from tunelab.tasks.distill_losses import hidden_loss, kd_loss
from tunelab.tasks.teacher import load_teacher
from tunelab.train import configure_data, run

WORDS = ("book", "kettle", "phone", "film", "lamp", "chair")
GOOD, BAD = ("good", "great", "lovely"), ("bad", "awful", "broken")
STUDENT = ("model.hidden_size=32", "model.num_heads=2", "model.intermediate_size=64", "task.latency_repeats=2")


def rows(seed: int, n: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        label = "good" if rng.random() < 0.5 else "bad"
        adjective = rng.choice(GOOD if label == "good" else BAD)
        out.append({"text": f"the {rng.choice(WORDS)} is {adjective} and {rng.choice(WORDS)}", "label": label})
    return out


@pytest.fixture(scope="module")
def text_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("text")
    for split, (seed, n) in {"train": (0, 96), "val": (1, 24), "test": (2, 24)}.items():
        (root / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows(seed, n)))
    return root


@pytest.fixture(scope="module")
def hf_teacher(tmp_path_factory: pytest.TempPathFactory, text_data: Path) -> Path:
    """A 4-layer BERT sequence classifier with its own tokenizer, saved as a Hugging Face folder."""
    from tunelab.data.tokenizer import train_wordpiece

    texts = [r["text"] for r in rows(0, 96)]
    tokenizer = train_wordpiece(texts * 5, vocab_size=100)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=4, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                        id2label={0: "bad", 1: "good"}, label2id={"bad": 0, "good": 1})
    path = tmp_path_factory.mktemp("hf_teacher")
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def text_args(data: Path, teacher: Path | str, *extra: str, student: tuple[str, ...] = STUDENT) -> list[str]:
    return ["task=distill", "data=text_files", f"data.train_file={data / 'train.jsonl'}",
            f"data.val_file={data / 'val.jsonl'}", f"data.test_file={data / 'test.jsonl'}",
            f"teacher.path={teacher}", *student, *extra]


def build_task(cfg):
    dm = instantiate(cfg.data)
    configure_data(cfg, dm)  # as train.py does: what the task declares it needs from data
    dm.setup("fit")
    return instantiate(cfg.task, datamodule=dm), dm


def fit_steps(task, dm, steps: int) -> None:
    trainer = L.Trainer(max_steps=steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(task, datamodule=dm)


# ----------------------------------------------------------------------------------------------- the loss
@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_kd_loss_equals_the_formula(temperature: float, alpha: float) -> None:
    g = torch.Generator().manual_seed(int(temperature * 10 + alpha * 100))
    student, teacher = torch.randn(16, 5, generator=g) * 3, torch.randn(16, 5, generator=g) * 3
    labels = torch.randint(0, 5, (16,), generator=g)
    p_t = torch.softmax(teacher / temperature, -1)
    p_s = torch.softmax(student / temperature, -1)
    kl = (p_t * (p_t.log() - p_s.log())).sum(-1).mean()
    ce = -torch.log_softmax(student, -1)[torch.arange(16), labels].mean()
    expected = alpha * ce + (1 - alpha) * temperature**2 * kl
    got = kd_loss(student, teacher, labels, alpha, temperature)
    assert torch.allclose(got["loss"], expected, atol=1e-5)
    assert torch.allclose(got["ce"], ce, atol=1e-6)
    if alpha < 1:
        assert torch.allclose(got["kd"], temperature**2 * kl, atol=1e-5)
        assert not torch.allclose(got["kd"], torch.zeros(())), "random logits must disagree"


def test_kd_loss_on_a_transfer_set_uses_labels_where_there_are_some() -> None:
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g)
    labels = torch.tensor([0, 2, 1, -100, -100, 1, -100, 0])
    labelled = labels != -100
    got = kd_loss(student, teacher, labels, alpha=0.4, temperature=2.0)
    assert torch.allclose(got["ce"], F.cross_entropy(student[labelled], labels[labelled]))
    assert torch.allclose(got["kd"], kd_loss(student, teacher, labels.clamp(min=0), 0.4, 2.0)["kd"])  # every row
    none = kd_loss(student, teacher, torch.full((8,), -100), alpha=0.4, temperature=2.0)
    assert none["ce"] == 0 and torch.isfinite(none["loss"])


def test_distil_with_an_unlabelled_transfer_set(make_cfg, text_data: Path, hf_teacher: Path, tmp_path: Path) -> None:
    extra = tmp_path / "unlabelled.txt"
    extra.write_text("\n".join(r["text"] for r in rows(7, 80)) + "\n")
    cfg = make_cfg(*text_args(text_data, hf_teacher, f"data.unlabelled_file={extra}", "data.limit_unlabelled=50",
                              "task.cache_teacher=true", f"task.cache_dir={tmp_path / 'cache'}"))
    task, dm = build_task(cfg)
    labels = torch.tensor(dm.datasets["train"]["labels"])
    assert len(labels) == 96 + 50 and (labels == -100).sum() == 50
    run(cfg)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())["metrics"]
    assert metrics["train/kd"] > 0 and np.isfinite(metrics["train/loss"])
    finetune = make_cfg("data=text_files", f"data.train_file={text_data / 'train.jsonl'}",
                        f"data.unlabelled_file={extra}")
    expect_error(finetune, "data.unlabelled_file", "task=distill")


def test_hidden_loss_ignores_padding() -> None:
    student, teacher = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    changed = student.clone()
    changed[0, 4:] += 100.0
    for kind in ("mse", "cosine"):
        assert torch.allclose(hidden_loss(student, teacher, mask, kind), hidden_loss(changed, teacher, mask, kind))
    expected = F.mse_loss(student[mask.bool()], teacher[mask.bool()])
    assert torch.allclose(hidden_loss(student, teacher, mask, "mse"), expected, atol=1e-6)


# ----------------------------------------------------------------------------------------------- the teacher
def test_teacher_is_frozen_unchanged_and_outside_the_checkpoint(make_cfg, text_data: Path, hf_teacher: Path) -> None:
    task, dm = build_task(make_cfg(*text_args(text_data, hf_teacher, "task.hidden_weight=1.0")))
    teacher = task.teacher.net
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in task.model.state_dict().items()}
    fit_steps(task, dm, steps=3)
    assert not teacher.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert any(not torch.equal(v, student_before[k]) for k, v in task.model.state_dict().items()), "student trained"
    teacher_ids = {id(p) for p in teacher.parameters()}
    optimizer = task.trainer.optimizers[0]
    assert not teacher_ids & {id(p) for g in optimizer.param_groups for p in g["params"]}
    projections = sum(p.numel() for p in task.projections.parameters())
    assert projections == 2 * (32 * 64 + 64)  # two matched layers, widths 32 -> 64
    state = task.state_dict()
    assert all(k.startswith(("model.", "projections.")) for k in state), sorted(state)[:5]
    assert sum(v.numel() for v in state.values()) == sum(p.numel() for p in task.model.state_dict().values()) + projections


def test_distil_from_a_hugging_face_directory_end_to_end(make_cfg, text_data: Path, hf_teacher: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = make_cfg(*text_args(text_data, hf_teacher))
    run(cfg)
    out = Path(cfg.paths.output_dir)
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    teacher = AutoModelForSequenceClassification.from_pretrained(hf_teacher).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_teacher)
    test = [json.loads(line) for line in (text_data / "test.jsonl").read_text().splitlines()]
    enc = tokenizer([r["text"] for r in test], padding=True, return_tensors="pt", return_token_type_ids=False)
    with torch.no_grad():
        predicted = teacher(**enc).logits.argmax(-1)
    truth = torch.tensor([["bad", "good"].index(r["label"]) for r in test])
    assert metrics["test/teacher_acc"] == pytest.approx((predicted == truth).float().mean().item(), abs=1e-6)
    student = AutoModelForSequenceClassification.from_pretrained(out / "model")
    ratio = sum(p.numel() for p in student.parameters()) / sum(p.numel() for p in teacher.parameters())
    assert metrics["test/param_ratio"] == pytest.approx(ratio, rel=1e-6) and ratio < 0.5
    assert metrics["test/latency_ratio"] > 0 and 0 <= metrics["test/agreement"] <= 1
    assert AutoTokenizer.from_pretrained(out / "model").get_vocab() == tokenizer.get_vocab()
    best = json.loads((out / "metrics.json").read_text())["best_checkpoint"]
    state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    assert not any(k.startswith("teacher") for k in state)
    assert sum(v.numel() for k, v in state.items() if k.startswith("model.")) == sum(
        p.numel() for p in student.state_dict().values())
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"train/ce", "train/kd", "train/loss", "val/agreement", "val/teacher_acc", "test/latency_ratio",
            "test/param_ratio"} <= scalars


def test_alpha_one_is_the_student_alone(make_cfg, text_data: Path, hf_teacher: Path) -> None:
    cfg = make_cfg(*text_args(text_data, hf_teacher, "task.alpha=1", "task.hidden_weight=1", "task.cache_teacher=true"))
    task, dm = build_task(cfg)
    assert not task.uses_teacher_in_training and not task.cache_teacher
    assert not list(task.projections.parameters())


def test_student_initialised_from_every_other_teacher_layer(make_cfg, text_data: Path, hf_teacher: Path) -> None:
    cfg = make_cfg(*text_args(text_data, hf_teacher, "task.init_from_teacher=true", "model.hidden_size=64",
                              "model.intermediate_size=128", "model.num_layers=2", "model.max_position_embeddings=64"))
    task, _ = build_task(cfg)
    teacher = task.teacher.net.net.bert.encoder.layer
    student = task.model.net.bert.encoder.layer
    for s, t in ((0, 0), (1, 2)):
        assert torch.equal(student[s].output.dense.weight, teacher[t].output.dense.weight)
    assert not torch.equal(student[1].output.dense.weight, teacher[1].output.dense.weight)
    assert torch.equal(task.model.net.classifier.weight, task.teacher.net.net.classifier.weight)


def test_hidden_and_attention_matching_are_logged(make_cfg, text_data: Path, hf_teacher: Path) -> None:
    cfg = make_cfg(*text_args(text_data, hf_teacher, "task.hidden_weight=0.5", "task.attention_weight=1.0",
                              "task.hidden_loss=cosine", "task.layer_map={1:2,2:4,features:features}"))
    run(cfg)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())["metrics"]
    assert metrics["train/hidden"] > 0 and metrics["train/attention"] > 0 and metrics["train/kd"] > 0


# ----------------------------------------------------------------------------------------------- the cache
def test_cache_holds_the_teachers_outputs_and_is_reused(make_cfg, text_data: Path, hf_teacher: Path,
                                                        tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    cfg = make_cfg(*text_args(text_data, hf_teacher, "task.cache_teacher=true", f"task.cache_dir={cache_dir}",
                              "task.hidden_weight=1.0", "task.layer_map={2:4}"))
    task, dm = build_task(cfg)
    fit_steps(task, dm, steps=4)
    folders = list((cache_dir / "teacher_outputs").iterdir())
    assert len(folders) == 1 and task.cache is not None
    stamp = (folders[0] / "logits.npy").stat().st_mtime_ns
    task2, dm2 = build_task(cfg)
    fit_steps(task2, dm2, steps=4)  # a second run reads what the first one wrote
    assert list((cache_dir / "teacher_outputs").iterdir()) == folders
    assert (folders[0] / "logits.npy").stat().st_mtime_ns == stamp
    batch = next(iter(dm2.train_dataloader()))
    assert "index" in batch
    live = task2.teacher(batch, output_hidden_states=True)
    cached = task2.cache.lookup(batch["index"], torch.device("cpu"), batch["input_ids"].shape[1])
    assert torch.allclose(cached["logits"], live.logits, atol=1e-5)
    real = batch["attention_mask"].bool()
    assert torch.allclose(cached["hidden_4"][real], live.hidden_states[4][real], atol=2e-2, rtol=1e-2)
    other = load_teacher(str(hf_teacher))
    with torch.no_grad():
        other.net.net.classifier.weight.add_(1.0)  # a different teacher gets its own entry
    load_or_build(other, dm2.datasets["train"], dm2.collate_fn(), 16, [4], cache_dir)
    assert len(list((cache_dir / "teacher_outputs").iterdir())) == 2


# ----------------------------------------------------------------------------------------------- images
@pytest.fixture(scope="module")
def image_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("val", 4), ("test", 4)):
        for c, colour in enumerate(((200, 30, 30), (30, 200, 30), (30, 30, 200))):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(np.array(colour) + rng.normal(0, 40, (16, 16, 3)), 0, 255).astype("uint8")
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def timm_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("timm_teacher")
    labels = ["class0", "class1", "class2"]
    artifacts.save(path, ImageModel("classifier", labels, name="resnet10t"), labels=labels)
    return path


def image_args(data: Path, teacher: Path | str, *extra: str) -> list[str]:
    return ["task=distill", "data=image_folder", f"data.root={data}", "data.image_size=16", "model=timm",
            "model.name=test_efficientnet", "data.model_name=resnet10t", f"teacher.path={teacher}",
            "task.latency_repeats=2", *extra]


def test_image_distillation_from_an_exported_timm_folder(make_cfg, image_data: Path, timm_teacher: Path) -> None:
    import timm

    cfg = make_cfg(*image_args(image_data, timm_teacher, "task.hidden_weight=1.0"))
    run(cfg)
    out = Path(cfg.paths.output_dir)
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert metrics["test/param_ratio"] < 0.1 and metrics["train/hidden"] > 0
    net = timm.create_model("test_efficientnet", num_classes=3, pretrained=True,
                            pretrained_cfg_overlay={"file": str(out / "model" / "model.safetensors"), "num_classes": 3})
    assert sum(p.numel() for p in net.parameters()) == metrics["test/student_params"]


def test_timm_name_with_weights_file_is_the_same_teacher(timm_teacher: Path) -> None:
    folder = load_teacher(str(timm_teacher))
    named = load_teacher("resnet10t", weights=str(timm_teacher / "model.safetensors"))
    x = {"pixel_values": torch.randn(2, 3, 16, 16)}
    assert torch.equal(folder(x).logits, named(x).logits)
    assert folder.labels == ["class0", "class1", "class2"]


def test_cache_refused_when_augmentation_changes_inputs(make_cfg, image_data: Path, timm_teacher: Path) -> None:
    cfg = make_cfg(*image_args(image_data, timm_teacher, "task.cache_teacher=true"))  # timm's random crops and flips
    expect_error(cfg, "task.cache_teacher=true", "different 'pixel_values'", "task.cache_teacher=false")
    fixed = make_cfg(*image_args(image_data, timm_teacher, "task.cache_teacher=true", "+data.augment.scale=[1.0,1.0]",
                                 "+data.augment.ratio=[1.0,1.0]", "+data.augment.hflip=0.0",
                                 "+data.augment.color_jitter=null"))
    task, dm = build_task(fixed)
    assert task.cache_teacher and dm.with_index


def test_cache_refused_when_masking_changes_inputs(hf_teacher: Path) -> None:
    from tunelab.data.collators import MaskingCollator
    from tunelab.data.teacher_cache import check_static

    tokenizer = AutoTokenizer.from_pretrained(hf_teacher)
    samples = [dict(tokenizer(r["text"], return_token_type_ids=False)) for r in rows(5, 8)]
    check_static(samples, lambda batch: tokenizer.pad(batch, return_tensors="pt"))  # plain padding is fine
    with pytest.raises(TunelabError, match="different 'input_ids'"):
        check_static(samples, MaskingCollator(tokenizer, mask_prob=0.5))


# ----------------------------------------------------------------------------------------------- bad input
def test_no_teacher_says_which_command_makes_one(make_cfg, text_data: Path) -> None:
    cfg = make_cfg(*text_args(text_data, "null"))
    expect_error(cfg, "python train.py task=finetune", "teacher.path")


def test_teacher_path_without_a_model(make_cfg, image_data: Path, text_data: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty_run"
    empty.mkdir()
    expect_error(make_cfg(*image_args(image_data, empty)), f"teacher.path: {empty} holds no model",
                 "python train.py task=finetune")
    expect_error(make_cfg(*text_args(text_data, empty)), str(empty), "holds no model")  # met first by data.tokenizer


def test_teacher_with_another_label_set(make_cfg, tmp_path: Path, hf_teacher: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"text": r["text"], "label": "pos" if r["label"] == "good" else "neg"})
                              for r in rows(0, 40)))
    cfg = make_cfg("task=distill", "data=text_files", f"data.train_file={data}", f"teacher.path={hf_teacher}", *STUDENT)
    expect_error(cfg, "predicts labels ['bad', 'good']", "['neg', 'pos']")


def test_tokenizer_with_another_vocabulary(make_cfg, text_data: Path, hf_teacher: Path) -> None:
    cfg = make_cfg(*text_args(text_data, hf_teacher, "data.tokenizer=null"))
    expect_error(cfg, "different vocabulary", f"data.tokenizer={hf_teacher}")


def test_pretrained_student_with_another_vocabulary(make_cfg, text_data: Path, hf_teacher: Path,
                                                    tiny_hf_dir: Path) -> None:
    cfg = make_cfg(*text_args(text_data, hf_teacher, "model=hf", f"model.pretrained={tiny_hf_dir}", student=()))
    expect_error(cfg, "model.pretrained", "differs from the teacher's")


@pytest.mark.parametrize(("layer_map", "fragment"), [
    ("{9:2}", "the student has no layer 9"),
    ("{1:7}", "the teacher has no layer 7"),
    ("{pooler:features}", "the student has no layer 'pooler'"),
    ("{features:2}", "pairs the pooled 'features'"),
])
def test_layer_map_naming_missing_layers(make_cfg, text_data: Path, hf_teacher: Path, layer_map: str,
                                         fragment: str) -> None:
    cfg = make_cfg(*text_args(text_data, hf_teacher, "task.hidden_weight=1", f"task.layer_map={layer_map}"))
    expect_error(cfg, "task.layer_map", fragment)


def test_teacher_that_is_not_a_classifier(make_cfg, text_data: Path, tiny_hf_dir: Path) -> None:
    cfg = make_cfg(*text_args(text_data, tiny_hf_dir))
    expect_error(cfg, "BertForMaskedLM, not a sequence classifier")


def test_timm_name_without_weights(make_cfg, image_data: Path) -> None:
    expect_error(make_cfg(*image_args(image_data, "resnet10t")), "teacher.weights=")


def test_image_teacher_normalised_differently(make_cfg, image_data: Path, timm_teacher: Path) -> None:
    cfg = make_cfg(*image_args(image_data, timm_teacher), "data.model_name=test_vit")
    expect_error(cfg, "data.model_name=resnet10t")


# ----------------------------------------------------------------------------------------------- masked LM
def test_masked_kd_uses_the_masked_positions_only() -> None:
    from tunelab.tasks.distill_losses import masked_kd_loss

    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 11, generator=g), torch.randn(6, 11, generator=g)
    targets = torch.tensor([3, -100, 7, -100, 1, 0])
    keep = targets != -100
    expected = kd_loss(student[keep], teacher[keep], targets[keep], 0.5, 2.0)
    changed = student.clone()
    changed[~keep] += torch.randn(2, 11, generator=g) * 10
    for got in (masked_kd_loss(student, teacher, targets, 0.5, 2.0), masked_kd_loss(changed, teacher, targets, 0.5, 2.0)):
        assert torch.allclose(got["loss"], expected["loss"]) and torch.allclose(got["kd"], expected["kd"])


def test_masked_lm_distillation_end_to_end(make_cfg, tmp_path: Path, tiny_hf_dir: Path) -> None:
    from transformers import AutoModelForMaskedLM

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(r["text"] for r in rows(3, 300)))
    cfg = make_cfg("experiment=reviews_distill_mlm", "data=text_files", f"data.train_file={corpus}",
                   "data.max_length=32", f"teacher.path={tiny_hf_dir}", "model.hidden_size=32", "model.num_heads=2",
                   "model.intermediate_size=64", "model.max_position_embeddings=128", "optimized_metric=val/perplexity")
    teacher_before = AutoModelForMaskedLM.from_pretrained(tiny_hf_dir).state_dict()
    run(cfg)
    out = Path(cfg.paths.output_dir)
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert metrics["train/kd"] > 0 and metrics["train/ce"] > 0 and metrics["val/perplexity"] > 1
    student = AutoModelForMaskedLM.from_pretrained(out / "model")
    assert student.config.hidden_size == 32
    assert AutoTokenizer.from_pretrained(out / "model").get_vocab() == AutoTokenizer.from_pretrained(tiny_hf_dir).get_vocab()
    after = AutoModelForMaskedLM.from_pretrained(tiny_hf_dir).state_dict()
    assert all(torch.equal(v, after[k]) for k, v in teacher_before.items())


def test_masked_lm_student_needs_a_masked_lm_teacher(make_cfg, tmp_path: Path, hf_teacher: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(r["text"] for r in rows(3, 300)))
    cfg = make_cfg("experiment=reviews_distill_mlm", "data=text_files", f"data.train_file={corpus}",
                   "data.max_length=32", f"teacher.path={hf_teacher}", "optimized_metric=val/perplexity")
    expect_error(cfg, "BertForSequenceClassification, not a masked language model", "python train.py task=mlm")


@pytest.mark.slow  # in make test-all: the fast suite keeps one run of this kind
def test_distill_under_ddp_cpu_with_the_cache(tmp_path: Path, text_data: Path, hf_teacher: Path) -> None:
    proc = run_cli("trainer=ddp_cpu", *FAST, *text_args(text_data, hf_teacher, "task.cache_teacher=true",
                                                         "task.hidden_weight=1"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = check_one_ddp_run(tmp_path / "logs", "distill")
    assert 0 <= metrics["test/agreement"] <= 1 and metrics["test/teacher_acc"] > 0


@pytest.mark.slow  # in make test-all: the fast suite keeps one run of this kind
def test_distill_optuna_search(tmp_path: Path, text_data: Path, hf_teacher: Path) -> None:
    value = check_one_trial_search("distill_optuna", "distill", *FAST, *text_args(text_data, hf_teacher),
                                   cwd=tmp_path)
    assert 0 <= value <= 1


def test_half_built_caches_of_killed_processes_are_swept_and_live_ones_kept(tmp_path: Path) -> None:
    import socket
    import subprocess

    from tunelab.data.teacher_cache import sweep_abandoned

    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    killed = tmp_path / f".building-{host}-{dead.pid}-abc"
    live = tmp_path / f".building-{host}-{os.getppid()}-def"  # a live process: another run building now
    other_host = tmp_path / f".building-elsewhere-{dead.pid}-ghi"  # a process of another machine
    for folder in (killed, live, other_host):
        folder.mkdir()
    sweep_abandoned(tmp_path)
    assert not killed.exists() and live.is_dir() and other_host.is_dir()
