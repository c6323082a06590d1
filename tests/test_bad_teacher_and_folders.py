"""Model folders the user names: each error names the key that was set and the path, and a config.json that is
not JSON is reported as such, not as a tokenizer problem."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from tests.conftest import expect_error
from tunelab.data.tokenizer import load_tokenizer
from tunelab.errors import TunelabError
from tunelab.folders import check_pretrained


def broken_copy(tiny_hf_dir: Path, tmp_path: Path, config: bytes) -> Path:
    """A copy of the tiny Hugging Face folder whose config.json holds `config`."""
    folder = tmp_path / "broken"
    shutil.copytree(tiny_hf_dir, folder)
    (folder / "config.json").write_bytes(config)
    return folder


def test_a_config_json_that_is_not_json_is_named_before_the_tokenizer(make_cfg, tiny_hf_dir: Path,
                                                                      tmp_path: Path) -> None:
    folder = broken_copy(tiny_hf_dir, tmp_path, b"{not json")
    message = expect_error(make_cfg("model=hf", f"model.pretrained={folder}"), "model.pretrained",
                           f"{folder / 'config.json'} is not valid JSON", "expected the model's Hugging Face config")
    assert "tokenizer" not in message


@pytest.mark.parametrize(("config", "fragment"), [(b"{not json", "is not valid JSON"),
                                                  (b"{\"a\": \"\xff\"}", "is not valid JSON"),  # not UTF-8
                                                  (b"[1, 2]", "holds a JSON list, not an object")])
def test_check_pretrained_names_the_role_and_the_bad_config(tiny_hf_dir: Path, tmp_path: Path, config: bytes,
                                                            fragment: str) -> None:
    folder = broken_copy(tiny_hf_dir, tmp_path, config)
    with pytest.raises(TunelabError, match=re.escape(f"teacher.path: {folder / 'config.json'} {fragment}")):
        check_pretrained(str(folder), role="teacher.path")


def test_missing_and_empty_folders_name_the_role(tmp_path: Path) -> None:
    with pytest.raises(TunelabError, match=re.escape(f"teacher.path: directory not found: {tmp_path / 'nope'} (expected")):
        check_pretrained(str(tmp_path / "nope"), role="teacher.path")
    with pytest.raises(TunelabError, match=re.escape(f"data.tokenizer: {tmp_path} holds no model")):
        load_tokenizer(str(tmp_path), role="data.tokenizer")
    with pytest.raises(TunelabError, match="^model.pretrained: directory not found"):  # the default role
        load_tokenizer(str(tmp_path / "nope"))


def test_a_good_folder_and_a_run_folder_pass(tiny_hf_dir: Path, tmp_path: Path) -> None:
    assert check_pretrained(str(tiny_hf_dir)) == str(tiny_hf_dir.resolve())
    shutil.copytree(tiny_hf_dir, tmp_path / "run" / "model")
    assert check_pretrained(str(tmp_path / "run")) == str((tmp_path / "run" / "model").resolve())
    assert check_pretrained("prajjwal1/bert-tiny") == "prajjwal1/bert-tiny"  # a hub name: left to transformers


def test_a_missing_teacher_is_named_by_load_teacher() -> None:
    from tunelab.tasks.teacher import load_teacher

    with pytest.raises(TunelabError, match="^teacher.path: /nonexistent is not a folder"):
        load_teacher("/nonexistent")


def test_a_missing_teacher_is_named_as_teacher_path(make_cfg) -> None:
    expect_error(make_cfg("task=distill", "teacher.path=/nonexistent"), "teacher.path", "/nonexistent")
