"""Every bad input fails before training with one message naming what is wrong and what was expected."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FAST, expect_error, run_cli
from PIL import Image


def text_cfg(make_cfg, train: Path, *extra: str):
    return make_cfg("data=text_files", f"data.train_file={train}", *extra)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


GOOD = [{"text": f"sample {i} is {lab}", "label": lab} for i in range(20) for lab in ("good", "bad")]


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["data=nope"], ["Could not find 'data/nope'", "Available options in 'data'", "reviews", "digits"]),
        (["task=nope"], ["Could not find 'task/nope'", "finetune"]),
        (["model=nope"], ["Could not find 'model/nope'", "bert_tiny"]),
        (["trainer=nope"], ["Could not find 'trainer/nope'", "cpu"]),
        (["optimizer.lrr=1"], ["optimizer.lrr", "not in struct"]),
    ],
)
def test_unknown_option_or_key_from_the_command_line(tmp_path: Path, args: list[str], fragments: list[str]) -> None:
    proc = run_cli(*args, cwd=tmp_path)
    assert proc.returncode != 0
    for fragment in fragments:
        assert fragment in proc.stderr + proc.stdout
    assert not (tmp_path / "logs" / "finetune" / "runs").exists()


def test_cli_error_is_one_line_exit_2_and_keeps_existing_runs(tmp_path: Path) -> None:
    good = run_cli(*FAST, "model.hidden_size=64", cwd=tmp_path)
    assert good.returncode == 0, good.stderr[-2000:]
    latest = (tmp_path / "logs" / "finetune" / "latest").resolve()
    before = sorted(p.name for p in latest.rglob("*"))
    bad = run_cli("data=text_files", f"data.train_file={tmp_path / 'missing.jsonl'}", cwd=tmp_path)
    assert bad.returncode == 2
    assert "error: data.train_file: file not found" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert (tmp_path / "logs" / "finetune" / "latest").resolve() == latest
    assert sorted(p.name for p in latest.rglob("*")) == before


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
