"""Every bad input fails before training with one message naming what is wrong and what was expected."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from conftest import FAST, expect_error, run_cli, snapshot
from PIL import Image

from tunelab.config import compose_config


def text_cfg(make_cfg, train: Path, *extra: str):
    return make_cfg("data=text_files", f"data.train_file={train}", *extra)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def write_images(root: Path, classes: tuple[str, ...], splits: tuple[str, ...] = ("train", "val")) -> Path:
    for split in splits:
        for label in classes:
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (16, 16), color=(i * 40, 0, 0)).save(folder / f"{i}.png")
    return root


GOOD = [{"text": f"sample {i} is {lab}", "label": lab} for i in range(20) for lab in ("good", "bad")]
HUGE = {"text": "y" * (2 << 20), "label": "good"}  # one 2 MiB record: twice the default data.max_record_bytes


class Case(NamedTuple):
    """One bad input: overrides ({data}, {hf}... name the `inputs`), fragments the message must hold, and how
    it runs: `cli` through `python train.py`, otherwise `run()` in-process (same checks, no start-up cost).
    `composition`: rejected while Hydra composes, so not even a run folder may appear."""

    args: tuple[str, ...]
    fragments: tuple[str, ...]
    cli: bool = False
    composition: bool = False


def via_cli(*args: str, fragments: tuple[str, ...], composition: bool = False) -> Case:
    return Case(args, fragments, cli=True, composition=composition)


def in_process(*args: str, fragments: tuple[str, ...]) -> Case:
    return Case(args, fragments)


CASES = {
    # Hydra's own errors: one line, exit 2, choices listed
    "unknown data option": via_cli(
        "data=nope", composition=True,
        fragments=("Could not find 'data/nope'", "available options in 'data'", "reviews", "digits")),
    "unknown model option, sweep": via_cli(
        "-m", "model=nope", composition=True, fragments=("Could not find 'model/nope'", "bert_tiny")),
    "unknown key": via_cli(
        "optimizer.lrr=1", composition=True,
        fragments=("optimizer.lrr", "not in struct", "did you mean 'lr'?",
                   "valid keys: ['lr', 'weight_decay']")),
    "override syntax": via_cli(
        "data.batch_size=[1,", composition=True,
        fragments=("cannot parse override 'data.batch_size=[1,'", "expected key=value")),
    # files and values the run rejects before training
    "missing required value": via_cli(
        "data=text_files", fragments=("missing required config value(s): data.train_file (",)),
    "missing data file": via_cli(
        "data=text_files", "data.train_file={data}/missing.jsonl",
        fragments=("data.train_file: file not found", "missing.jsonl")),
    "oversized record": via_cli(
        "data=text_files", "data.train_file={data}/huge.jsonl",
        fragments=("{data}/huge.jsonl:3: record of 2,097,1",
                   "bytes exceeds data.max_record_bytes=1,048,576")),
    "string for a count, CLI": via_cli(
        "data.batch_size=abc",
        fragments=("data.batch_size='abc'", "expected an integer >= 1", "got a string")),
    "string for a count": in_process(
        "data.batch_size=abc", fragments=("data.batch_size='abc'", "got a string")),
    "zero batch size": in_process(
        "data.batch_size=0", fragments=("data.batch_size=0 (expected an integer >= 1)",)),
    "negative batch size": in_process("data.batch_size=-4", fragments=("data.batch_size=-4",)),
    "zero eval batch size": in_process("+data.eval_batch_size=0", fragments=("data.eval_batch_size=0",)),
    "negative learning rate": in_process(
        "optimizer.lr=-1", fragments=("optimizer.lr=-1 (expected a number > 0)",)),
    "negative weight decay": in_process(
        "optimizer.weight_decay=-0.1", fragments=("optimizer.weight_decay=-0.1",)),
    "negative workers": in_process(
        "data.num_workers=-1", fragments=("data.num_workers=-1 (expected an integer >= 0)",)),
    "val fraction above one": in_process(
        "data=text_files", "data.train_file={data}/good.jsonl", "data.val_fraction=1.5",
        fragments=("data.val_fraction=1.5 (expected a number in [0, 1))",)),
    "negative test fraction": in_process(
        "data=text_files", "data.train_file={data}/good.jsonl", "data.test_fraction=-0.1",
        fragments=("data.test_fraction=-0.1",)),
    "zero limit_train": in_process("data.limit_train=0", fragments=("data.limit_train=0",)),
    "negative limit_train_per_class": in_process(
        "data.limit_train_per_class=-2", fragments=("data.limit_train_per_class=-2",)),
    "one label given": in_process(
        "data.labels=[x]", fragments=("data.labels=['x']", "at least two distinct labels")),
    "zero epochs": in_process(
        "trainer.max_epochs=0",
        fragments=("trainer.max_epochs=0 (expected an integer >= 1, or -1 with trainer.max_steps >= 1",)),
    "endless epochs": in_process("trainer.max_epochs=-1", fragments=("trainer.max_epochs=-1",)),
    "zero steps": in_process("trainer.max_steps=0", fragments=("trainer.max_steps=0",)),
    "zero accumulation": in_process(
        "trainer.accumulate_grad_batches=0",
        fragments=("trainer.accumulate_grad_batches=0 (expected an integer >= 1)",)),
    "zero devices": in_process("trainer.devices=0", fragments=("trainer.devices=0",)),
    "negative batch limit": in_process(
        "trainer.limit_val_batches=-1", fragments=("trainer.limit_val_batches=-1",)),
    "batch fraction above one": in_process(
        "trainer.limit_test_batches=1.5", fragments=("trainer.limit_test_batches=1.5",)),
    "label smoothing of one": in_process("problem.label_smoothing=1.0", fragments=("problem.label_smoothing=1.0",)),
    "dropout above one": in_process(
        "model.dropout=1.5", fragments=("model.dropout=1.5 (expected a number in [0, 1))",)),
    "not a boolean": in_process(
        "train=maybe", fragments=("train='maybe' (expected true or false, got a string)",)),
    "unknown precision": in_process("trainer.precision=15", fragments=("trainer.precision=15", "bf16-mixed")),
    "zero record cap": in_process("data.max_record_bytes=0", fragments=("data.max_record_bytes=0",)),
    "one side of a pair": in_process(
        "task=dann", "data=reviews_pair", "model=bert_tiny", "data.target.batch_size=0",
        fragments=("data.target.batch_size=0",)),
    # values that only fail against the model or the data
    "sequences longer than the model's positions": in_process(
        "model=hf", "model.pretrained={hf}", "data.max_length=2000",
        fragments=("data.max_length=2000 exceeds the 128 positions of model.pretrained={hf}",)),
    "sequences longer than a new model's positions": in_process(
        "data.max_length=600", fragments=("data.max_length=600 exceeds model.max_position_embeddings=512",)),
    "tokenizer of another vocabulary": in_process(
        "model=hf", "model.pretrained={hf_b}", "data.tokenizer={hf}",
        fragments=("data.tokenizer={hf} does not match model.pretrained={hf_b}", "tokens")),
    "tokenizer of another size, model without tokenizer": in_process(
        "model=hf", "model.pretrained={hf_c}", "data.tokenizer={hf}",
        fragments=("data.tokenizer={hf} does not match model.pretrained={hf_c}", "vocab_size=")),
    "one class of text": in_process(
        "data=text_files", "data.train_file={data}/one_class.jsonl",
        fragments=("data.train_file: {data}/one_class.jsonl: found 1 class ['x']", "expected at least two")),
    "one class of images": in_process(
        "data=image_folder", "data.root={data}/one_class", "model=timm", "data.image_size=16",
        fragments=("data.root: found 1 class ['a']", "expected at least two")),
    "a score under problem=classification": in_process(
        "data=text_files", "data.train_file={data}/scores.jsonl",
        fragments=("{data}/scores.jsonl:1: target 0.16 is a number with a fraction", "problem=regression fits")),
    "a label list under problem=classification": in_process(
        "data=text_files", "data.train_file={data}/tags.jsonl",
        fragments=("{data}/tags.jsonl:1: target ['a', 'b'] is a list", "problem=multi_label fits")),
    "a NaN regression target": in_process(
        "problem=regression", "data=text_files", "data.train_file={data}/nan.jsonl",
        fragments=("{data}/nan.jsonl:3: target nan is not finite",)),
    "an infinite regression target": in_process(
        "problem=regression", "data=text_files", "data.train_file={data}/inf.jsonl",
        fragments=("{data}/inf.jsonl:2: target inf is not finite",)),
    "a multi-label target outside data.labels": via_cli(
        "problem=multi_label", "data=text_files", "data.train_file={data}/tags.jsonl", "data.labels=[a,b]",
        fragments=("{data}/tags.jsonl:3: label 'z' is not in the label set", "['a', 'b']")),
    "task=prompt with a regression problem": in_process(
        "task=prompt", "problem=regression", "data=text_files", "data.train_file={data}/scores.jsonl",
        "model.pretrained={hf}", fragments=("task=prompt classifies through label words", "problem=regression")),
    "record over a lower cap": in_process(
        "data=text_files", "data.train_file={data}/good.jsonl", "data.max_record_bytes=20",
        fragments=(f"{{data}}/good.jsonl:1: record of {len(json.dumps(GOOD[0]))} bytes exceeds "
                   "data.max_record_bytes=20",)),
    "multi-line CSV record over the cap": in_process(
        "data=text_files", "data.train_file={data}/long.csv", "data.max_record_bytes=200",
        fragments=("{data}/long.csv:3: record of more than 200 bytes exceeds data.max_record_bytes=200",)),
    "image file over the cap": in_process(
        "data=image_folder", "data.root={data}/images", "model=timm", "data.image_size=16",
        "data.max_file_bytes=10", fragments=("bytes exceeds data.max_file_bytes=10",)),
}


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding one finished run (logs/finetune/latest), which no failed start may touch."""
    cwd = tmp_path_factory.mktemp("finished")
    good = run_cli(*FAST, "model.hidden_size=64", cwd=cwd)
    assert good.returncode == 0, good.stderr[-2000:]
    assert (cwd / "logs" / "finetune" / "latest" / "metrics.json").is_file()
    return cwd


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, tiny_hf_dir: Path) -> dict[str, str]:
    """The files the cases name: bad data, and two tiny models with vocabularies other than tiny_hf_dir's."""
    from transformers import BertConfig, BertForMaskedLM

    from tunelab.data.tokenizer import train_wordpiece

    data = tmp_path_factory.mktemp("inputs")
    write_jsonl(data / "good.jsonl", GOOD)
    write_jsonl(data / "one_class.jsonl", [{"text": f"sample {i}", "label": "x"} for i in range(20)])
    write_jsonl(data / "scores.jsonl", [{"text": f"sample {i}", "label": 0.16 + i} for i in range(20)])
    write_jsonl(data / "tags.jsonl", [{"text": f"sample {i}", "label": ["a", "b"] if i != 2 else ["z"]}
                                      for i in range(20)])
    write_jsonl(data / "nan.jsonl", [{"text": f"sample {i}", "label": float("nan") if i == 2 else i} for i in range(20)])
    write_jsonl(data / "inf.jsonl", [{"text": f"sample {i}", "label": float("inf") if i == 1 else i} for i in range(20)])
    write_jsonl(data / "huge.jsonl", [*GOOD[:2], HUGE, *GOOD[2:]])
    (data / "long.csv").write_text('text,label\n"fine",good\n"' + "a long line\n" * 30 + '",bad\n')
    write_images(data / "one_class", ("a",))
    write_images(data / "images", ("a", "b"))
    words = [(w, v) for w in ("river", "stone", "cloud", "lamp") for v in ("glows", "falls", "rests")]
    texts = [f"a {w} {v} here" for w, v in words]
    tokenizer = train_wordpiece(texts * 20, vocab_size=300)
    own = len(tokenizer_of(tiny_hf_dir))
    config = BertConfig(vocab_size=max(len(tokenizer), own) + 16, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                        pad_token_id=tokenizer.pad_token_id)
    hf_b, hf_c = data / "hf_b", data / "hf_c"
    BertForMaskedLM(config).save_pretrained(hf_b)
    shutil.copytree(hf_b, hf_c)  # the same model without a tokenizer: only its config to compare with
    tokenizer.save_pretrained(hf_b)
    return {"data": str(data.resolve()), "hf": str(tiny_hf_dir.resolve()), "hf_b": str(hf_b.resolve()),
            "hf_c": str(hf_c.resolve())}


def tokenizer_of(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_bad_input_stops_before_work(case: Case, finished: Path, inputs: dict[str, str], tmp_path: Path) -> None:
    args = [a.format(**inputs) for a in case.args]
    fragments = [f.format(**inputs) for f in case.fragments]
    logs = finished / "logs"
    run_folder = (logs / "finetune" / "latest").resolve()
    before, before_all = snapshot(run_folder), snapshot(logs)
    if case.cli:
        proc = run_cli(*args, cwd=finished)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, proc.stderr[-3000:]
        for fragment in fragments:
            assert fragment in errors[0]
    else:
        expect_error(compose_config([*FAST, *args], tmp_path / "run", logs), *fragments)
    assert (logs / "finetune" / "latest").resolve() == run_folder
    assert snapshot(run_folder) == before
    if case.cli:  # nothing at all was written: no run folder (a failed start removes its own), no sweep folder
        assert snapshot(logs) == before_all


def test_misspelt_key_in_a_config_file_lists_valid_keys(make_cfg) -> None:
    from omegaconf import open_dict

    cfg = make_cfg()
    with open_dict(cfg):
        cfg.data.batch_sise = 8
    expect_error(cfg, "data.batch_sise", "did you mean 'batch_size'", "valid keys")


def test_missing_required_value(make_cfg) -> None:
    expect_error(make_cfg("data=text_files"), "data.train_file")


def test_missing_data_file(make_cfg, tmp_path: Path) -> None:
    expect_error(text_cfg(make_cfg, tmp_path / "nope.jsonl"), "data.train_file: file not found", "nope.jsonl")


def test_malformed_jsonl_line(make_cfg, tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(GOOD[0]) + "\n" + '{"text": "broken", "label": \n')
    expect_error(text_cfg(make_cfg, path), f"{path}:2: malformed JSON")


def test_malformed_csv_row(make_cfg, tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text('text,label\n"fine",good\n"too",many,fields\n')
    expect_error(text_cfg(make_cfg, path), f"{path}:3: malformed CSV row with 3 fields (expected 2")


def test_missing_text_field(make_cfg, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [{"review": "x", "label": "good"}])
    expect_error(text_cfg(make_cfg, path), f"{path}:1: missing text field 'text'", "review")


def test_missing_label_field(make_cfg, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [*GOOD, {"text": "no label here"}])
    expect_error(text_cfg(make_cfg, path), f"{path}:41: missing label field 'label'")


def test_label_not_in_label_set(make_cfg, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", GOOD)
    val = write_jsonl(tmp_path / "val.jsonl", [GOOD[0], {"text": "meh", "label": "neutral"}])
    cfg = text_cfg(make_cfg, path, f"data.val_file={val}")
    expect_error(cfg, f"{val}:2: label 'neutral' is not in the label set", "['bad', 'good']")


def test_empty_split(make_cfg, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", GOOD)
    empty = tmp_path / "val.jsonl"
    empty.write_text("\n")
    expect_error(text_cfg(make_cfg, path, f"data.val_file={empty}"), "data.val_file", "holds no records")


def test_pretrained_directory_missing(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("model=hf", f"model.pretrained={tmp_path / 'no_such_model'}")
    expect_error(cfg, "no_such_model")


def test_pretrained_directory_without_model(make_cfg, tmp_path: Path) -> None:
    from omegaconf import open_dict

    empty = tmp_path / "empty_model"
    empty.mkdir()
    cfg = make_cfg("model=hf", f"model.pretrained={empty}")
    with open_dict(cfg):  # the tokenizer comes from the same folder; check the model message itself
        cfg.data.tokenizer = None
    expect_error(cfg, "model.pretrained", "holds no model", "config.json")


def test_undecodable_image(make_cfg, tmp_path: Path) -> None:
    for split in ("train", "val"):
        for label in ("a", "b"):
            folder = tmp_path / "images" / split / label
            folder.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (16, 16), color=(i * 40, 0, 0)).save(folder / f"{i}.png")
    bad = tmp_path / "images" / "train" / "b" / "broken.png"
    bad.write_bytes(b"not an image at all")
    cfg = make_cfg("data=image_folder", f"data.root={tmp_path / 'images'}", "model=timm", "data.image_size=16")
    expect_error(cfg, str(bad), "cannot decode image")


def test_text_model_on_image_data(make_cfg) -> None:
    expect_error(make_cfg("data=digits"), "model=bert_tiny is a text model", "data=digits is image data")


def test_checkpoint_that_does_not_fit(make_cfg, tmp_path: Path) -> None:
    ckpt = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"model.something": torch.zeros(3)}, "epoch": 0, "global_step": 0}, ckpt)
    expect_error(make_cfg(f"ckpt_path={ckpt}"), "does not fit", "model.something")


def test_checkpoint_missing(make_cfg, tmp_path: Path) -> None:
    expect_error(make_cfg(f"ckpt_path={tmp_path / 'x.ckpt'}"), "file not found")


def test_a_run_that_trains_no_step_says_so(make_cfg, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", GOOD * 10)
    expect_error(text_cfg(make_cfg, path, "trainer.limit_train_batches=0"), "no training step ran",
                 "trainer.limit_train_batches")
