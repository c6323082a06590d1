"""Domain-adversarial training: gradient reversal, the lambda schedule, the domain pair, runs, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import timm
import torch
from conftest import FAST, check_one_ddp_run, check_one_trial_search, expect_error, run_cli, trained_task
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict
from PIL import Image

from tunelab.data.augment import TokenNoise
from tunelab.data.tokenizer import train_wordpiece
from tunelab.models.grl import GradientReversal, dann_lambda, reverse_gradient
from tunelab.models.heads import Bottleneck
from tunelab.tasks.dann import concat_inputs
from tunelab.train import run

# ----------------------------------------------------------------------------- data made in the test
COLOURS = {"circle": (200, 40, 40), "square": (40, 200, 40), "cross": (40, 40, 200)}


def draw(shape: str, background: tuple[int, int, int], seed: int) -> Image.Image:
    """A 16x16 shape on a background: the shape is the class, the background the domain."""
    g = torch.Generator().manual_seed(seed)
    image = Image.new("RGB", (16, 16), background)
    offset = int(torch.randint(0, 4, (1,), generator=g))
    for x in range(4, 12):
        for y in range(4, 12):
            inside = {"circle": (x - 8) ** 2 + (y - 8) ** 2 < 12, "square": True, "cross": x == y or x + y == 15}
            if inside[shape]:
                image.putpixel((x + offset - 2, y), COLOURS[shape])
    return image


def image_tree(root: Path, background: tuple[int, int, int], classes=tuple(COLOURS), per_class: int = 12) -> Path:
    for split in ("train", "val", "test"):
        for c in classes:
            folder = root / split / c
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class if split == "train" else 2):
                draw(c, background, hash((split, c, i)) % 1000).save(folder / f"{i}.png")
    return root


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def reviews(products: tuple[str, ...], n: int, labels=("good", "bad")) -> list[dict]:
    words = (("great", "lovely", "solid"), ("awful", "flimsy", "dull"))  # by label position
    return [{"text": f"the {products[i % len(products)]} is {words[k][i % 3]} and {words[k][(i + 1) % 3]}",
             "label": lab} for i in range(n) for k, lab in enumerate(labels)]


@pytest.fixture
def text_pair(tmp_path: Path) -> tuple[Path, Path]:
    return (write_jsonl(tmp_path / "books.jsonl", reviews(("novel", "memoir"), 30)),
            write_jsonl(tmp_path / "kitchen.jsonl", reviews(("kettle", "toaster"), 20)))


@pytest.fixture
def image_pair(tmp_path: Path) -> tuple[Path, Path]:
    return image_tree(tmp_path / "light", (230, 230, 230)), image_tree(tmp_path / "dark", (20, 20, 60))


def text_args(src: Path, tgt: Path, *extra: str) -> list[str]:
    return ["task=dann", "data=text_files_pair", "model=bert_tiny", "model.hidden_size=32", "model.num_layers=1",
            "model.intermediate_size=64", f"data.source.train_file={src}", f"data.target.train_file={tgt}",
            "data.source.vocab_size=300", "task.discriminator_hidden=[32,32]", "task.embed_samples=8", *extra]


def image_args(src: Path, tgt: Path, *extra: str) -> list[str]:
    return ["task=dann", "data=image_folder_pair", "model.name=resnet10t", f"data.source.root={src}",
            f"data.target.root={tgt}", "data.source.image_size=32", "data.source.batch_size=8",
            "data.target.batch_size=8", "task.discriminator_hidden=[32,32]", "task.embed_samples=8", *extra]


def tensorboard(out: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return acc


def projector_metadata(out: Path, tag: str) -> list[list[str]]:
    config = (out / "tensorboard" / "projector_config.pbtxt").read_text()
    assert f'tensor_name: "{tag}' in config, config
    [metadata] = [p for p in (out / "tensorboard").rglob("metadata.tsv") if tag.split("/")[-1] in str(p)]
    return [line.split("\t") for line in metadata.read_text().splitlines()]


# ----------------------------------------------------------------------------- gradient reversal, schedule
@pytest.mark.parametrize("lambd", [0.0, 0.37, 1.0, 2.5])
def test_gradient_reversal_passes_input_and_returns_minus_lambda_times_gradient(lambd: float) -> None:
    x = torch.randn(4, 7, requires_grad=True)
    y = GradientReversal(lambd)(x)
    assert torch.equal(y, x)
    incoming = torch.randn(4, 7)
    y.backward(incoming)
    assert torch.equal(x.grad, -lambd * incoming)


def test_gradient_reversal_flips_what_reaches_the_layers_in_front() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(5, 3)
    x = torch.randn(8, 5)
    layer(x).pow(2).sum().backward()
    plain = layer.weight.grad.clone()
    layer.zero_grad()
    reverse_gradient(layer(x), 0.5).pow(2).sum().backward()
    assert torch.allclose(layer.weight.grad, -0.5 * plain)


def test_lambda_follows_the_schedule_at_start_middle_and_end() -> None:
    gamma = 10.0
    expected = {p: 2.0 / (1.0 + math.exp(-gamma * p)) - 1.0 for p in (0.0, 0.5, 1.0)}
    for p, value in expected.items():
        assert dann_lambda(p, gamma) == pytest.approx(value, abs=1e-12)
    assert dann_lambda(0.0) == 0.0
    assert dann_lambda(0.5) == pytest.approx(0.98661, abs=1e-5)
    assert dann_lambda(1.0) == pytest.approx(0.99991, abs=1e-5)
    assert dann_lambda(1.0, gamma, max_value=0.3) == pytest.approx(0.3 * expected[1.0])
    ramp = [dann_lambda(p / 20, gamma=3.0) for p in range(21)]
    assert ramp == sorted(ramp) and ramp[-1] < expected[1.0]


def test_bottleneck_folds_exactly_into_the_classifier() -> None:
    torch.manual_seed(0)
    bottleneck, head, folded = Bottleneck(12, 5), torch.nn.Linear(5, 3), torch.nn.Linear(12, 3)
    bottleneck.train()
    for _ in range(5):  # non-trivial running statistics
        bottleneck(torch.randn(16, 12) * 3 + 1)
    torch.nn.init.normal_(bottleneck.norm.weight)
    bottleneck.eval()
    bottleneck.fold_into(head, folded)
    x = torch.randn(10, 12)
    assert torch.allclose(folded(x), head(bottleneck(x)), atol=1e-5)


def test_concat_inputs_pads_text_to_the_longer_domain() -> None:
    a = {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3), "labels": torch.zeros(2)}
    b = {"input_ids": torch.full((3, 5), 2), "attention_mask": torch.ones(3, 5), "labels": torch.zeros(3)}
    out = concat_inputs(a, b, pad_id=9)
    assert set(out) == {"input_ids", "attention_mask"}
    assert out["input_ids"].shape == (5, 5) and out["input_ids"][:2, 3:].eq(9).all()
    assert out["attention_mask"][:2, 3:].eq(0).all() and out["attention_mask"][2:].eq(1).all()


# ----------------------------------------------------------------------------- token noise
@pytest.fixture(scope="module")
def tokenizer():
    return train_wordpiece([f"the {w} is good and cheap" for w in ("kettle", "book", "phone")] * 5, vocab_size=120)


def test_token_noise_keeps_special_tokens_and_changes_only_what_it_says(tokenizer) -> None:
    torch.manual_seed(0)
    ids = tokenizer("the kettle is good and cheap the book is good")["input_ids"]
    identity = TokenNoise(lambda f: f, tokenizer)
    assert identity([{"input_ids": ids, "attention_mask": [1] * len(ids)}])[0]["input_ids"] == ids
    special = set(tokenizer.all_special_ids)
    for kind in ("drop", "replace", "swap"):
        noise = TokenNoise(lambda f: f, tokenizer, **{kind: 0.5})
        outs = [noise([{"input_ids": ids, "attention_mask": [1] * len(ids), "labels": 1}])[0] for _ in range(20)]
        assert any(o["input_ids"] != ids for o in outs), kind
        for o in outs:
            assert o["input_ids"][0] == ids[0] and o["input_ids"][-1] == ids[-1]  # [CLS] ... [SEP]
            assert len(o["attention_mask"]) == len(o["input_ids"]) and o["labels"] == 1
            if kind == "swap":
                assert sorted(o["input_ids"]) == sorted(ids)
            if kind == "replace":
                assert len(o["input_ids"]) == len(ids)
                assert not special & set(o["input_ids"][1:-1])
            if kind == "drop":
                assert len(o["input_ids"]) <= len(ids) and len(o["input_ids"]) > 2


# ----------------------------------------------------------------------------- end-to-end runs
def test_each_step_draws_a_batch_from_each_domain_for_as_long_as_the_larger(make_cfg, text_pair) -> None:
    cfg = make_cfg(*text_args(*text_pair, "data.source.batch_size=8", "data.target.batch_size=8"))
    dm = instantiate(cfg.data)
    dm.setup("fit")
    sizes = {role: len(side.datasets["train"]) for role, side in dm.sides()}
    assert sizes["source"] > sizes["target"] >= 8
    batches = [batch for batch, _, _ in dm.train_dataloader()]
    assert len(batches) == sizes["source"] // 8  # the smaller target cycles
    for batch in batches:
        assert set(batch) == {"source", "target"}
        assert len(batch["source"]["labels"]) == len(batch["target"]["input_ids"]) == 8
    assert [len(loader.dataset) for loader in dm.val_dataloader()] == [
        len(side.datasets["val"]) for _, side in dm.sides()]


def test_dann_on_two_image_folder_trees(make_cfg, image_pair) -> None:
    cfg = make_cfg(*image_args(*image_pair, "task.bottleneck_dim=16", "trainer.log_every_n_steps=1"))
    run(cfg)
    out = Path(cfg.paths.output_dir)
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    for key in ("val/source/acc", "val/target/acc", "val/domain_acc", "test/source/acc", "test/target/acc",
                "test/target/f1", "train/domain_acc"):
        assert 0.0 <= metrics[key] <= 1.0, key
    # lambda follows the schedule over the steps the trainer takes
    total = 3  # FAST: one epoch of limit_train_batches=3 (36 training images in batches of 8)
    logged = {e.step: e.value for e in tensorboard(out).Scalars("train/lambda")}
    assert logged, "train/lambda was not logged"
    for step, value in logged.items():
        assert value == pytest.approx(dann_lambda(step / total), abs=1e-6)
    rows = projector_metadata(out, "features/adapted")
    assert rows[0] == ["domain", "class"]
    assert {r[0] for r in rows[1:]} == {"source", "target"} and {r[1] for r in rows[1:]} <= set(COLOURS)
    # the export is a plain timm classifier, bottleneck folded in, giving the task's logits
    net = timm.create_model(f"local-dir:{out / 'model'}", pretrained=True).eval()
    task, dm = trained_task(cfg, out)
    x = next(iter(dm.test_dataloader()[1]))
    with torch.no_grad():
        assert torch.allclose(net(x["pixel_values"]), task(x), atol=1e-4)


def test_dann_on_two_text_files_with_token_noise(make_cfg, text_pair) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cfg = make_cfg(*text_args(*text_pair, "data.token_noise={drop: 0.1, swap: 0.1}"))
    run(cfg)
    out = Path(cfg.paths.output_dir)
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert {"val/source/acc", "val/target/acc", "val/domain_acc", "test/target/acc"} <= set(metrics)
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    for word in ("novel", "kettle"):  # one vocabulary for both domains
        assert tokenizer.unk_token_id not in tokenizer(word)["input_ids"], word
    model = AutoModelForSequenceClassification.from_pretrained(out / "model")
    assert set(model.config.id2label.values()) == {"bad", "good"}
    rows = projector_metadata(out, "features/adapted")
    assert {r[0] for r in rows[1:]} == {"source", "target"}


def test_source_only_is_one_override_and_never_trains_on_the_target(make_cfg, text_pair) -> None:
    cfg = make_cfg(*text_args(*text_pair, "task.adapt=false"))
    dm = instantiate(cfg.data)
    dm.setup("fit")
    task = instantiate(cfg.task, datamodule=dm)
    assert "discriminator" not in task.heads
    batch, _, _ = next(iter(dm.train_dataloader()))
    batch["target"]["input_ids"] = torch.full_like(batch["target"]["input_ids"], 10**6)  # would fail if embedded
    task.training_step(batch, 0)
    run(cfg)
    out = Path(cfg.paths.output_dir)
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert "test/target/acc" in metrics and "val/domain_acc" not in metrics
    assert projector_metadata(out, "features/source_only")[0] == ["domain", "class"]


# ----------------------------------------------------------------------------- bad input
def test_different_label_sets(make_cfg, text_pair, tmp_path: Path) -> None:
    other = write_jsonl(tmp_path / "stars.jsonl", reviews(("kettle",), 10, labels=("1", "5")))
    expect_error(make_cfg(*text_args(text_pair[0], other)), "data.source labels ['bad', 'good']",
                 "data.target labels ['1', '5']", "same label set")


def test_different_number_of_classes(make_cfg, image_pair, tmp_path: Path) -> None:
    two = image_tree(tmp_path / "two", (20, 20, 60), classes=("circle", "square"), per_class=2)
    expect_error(make_cfg(*image_args(image_pair[0], two)), "data.source has 3 classes", "data.target has 2 classes")


def test_empty_target_text_file(make_cfg, text_pair, tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    expect_error(make_cfg(*text_args(text_pair[0], empty)), "data.target.train_file", "holds no records")


def test_empty_target_image_tree(make_cfg, image_pair, tmp_path: Path) -> None:
    (tmp_path / "empty" / "circle").mkdir(parents=True)
    expect_error(make_cfg(*image_args(image_pair[0], tmp_path / "empty")), "data.target", "no images")


def test_target_of_another_modality(make_cfg, text_pair, image_pair) -> None:
    cfg = make_cfg(*text_args(*text_pair))
    with open_dict(cfg):
        cfg.data.target = OmegaConf.create({"_target_": "tunelab.data.images.ImageFolderDataModule",
                                            "root": str(image_pair[1]), "image_size": 32})
    expect_error(cfg, "data.target is image data", "data.source is text data", "one modality")


def test_dann_needs_a_domain_pair(make_cfg, image_pair) -> None:
    cfg = make_cfg("task=dann", "data=image_folder", f"data.root={image_pair[0]}", "data.image_size=32")
    expect_error(cfg, "task=dann needs a domain pair", "data=digits_pair")


def test_token_noise_on_images_and_bad_probabilities(make_cfg, text_pair, image_pair) -> None:
    cfg = make_cfg(*image_args(*image_pair))
    with open_dict(cfg):
        cfg.data.token_noise = {"drop": 0.1}
    expect_error(cfg, "data.token_noise applies to text", "data.source.augment")
    expect_error(make_cfg(*text_args(*text_pair, "data.token_noise={drop: 1.5}")), "data.token_noise.drop=1.5")
    expect_error(make_cfg(*text_args(*text_pair, "data.token_noise={dorp: 0.1}")), "unknown key(s) ['dorp']")


def test_domains_of_different_image_sizes(make_cfg, image_pair) -> None:
    cfg = make_cfg(*image_args(*image_pair, "data.target.image_size=48"))
    expect_error(cfg, "data.source images are (3, 32, 32)", "data.target images are (3, 48, 48)")


@pytest.mark.slow  # in make test-all: the fast suite keeps one run of this kind
def test_dann_under_ddp_cpu(tmp_path: Path, text_pair) -> None:
    proc = run_cli("trainer=ddp_cpu", *FAST, *text_args(*text_pair), cwd=tmp_path)  # 60 source rows: 30 a rank
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = check_one_ddp_run(tmp_path / "logs", "dann")
    assert {"test/source/acc", "test/target/acc"} <= set(metrics)


@pytest.mark.slow  # in make test-all: the fast suite keeps one run of this kind
def test_dann_optuna_search(tmp_path: Path, text_pair) -> None:
    value = check_one_trial_search("dann_optuna", "dann", *FAST, *text_args(*text_pair), cwd=tmp_path)
    assert 0 <= value <= 1
