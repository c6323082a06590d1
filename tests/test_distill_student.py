"""Distillation's default student: a teacher that grew from a pretrained checkpoint teaches a smaller copy of
itself, started from its layers and reading its tokenizer; a from-scratch teacher keeps `model=`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import FAST, compose_cfg, expect_error


def train(overrides: list[str], out: Path) -> Path:
    from tunelab.train import run

    run(compose_cfg([*FAST, *overrides], out))
    return out


@pytest.fixture(scope="module")
def pretrained_teacher(tmp_path_factory: pytest.TempPathFactory, tiny_hf_dir: Path) -> Path:
    return train(["model=hf", f"model.pretrained={tiny_hf_dir}"], tmp_path_factory.mktemp("teacher") / "run")


def student_config(run: Path) -> dict:
    return json.loads((run / "model" / "config.json").read_text())


def test_a_pretrained_teacher_teaches_a_smaller_copy_of_itself(pretrained_teacher: Path, tmp_path: Path) -> None:
    from tunelab import artifacts

    teacher = student_config(pretrained_teacher)
    out = train(["task=distill", f"teacher.path={pretrained_teacher}"], tmp_path / "run")
    student = student_config(out)
    assert student["num_hidden_layers"] == teacher["num_hidden_layers"] // 2
    assert student["hidden_size"] == teacher["hidden_size"] and student["vocab_size"] == teacher["vocab_size"]
    tokenizer = artifacts.load(out / "model").tokenizer
    assert tokenizer.get_vocab() == artifacts.load(pretrained_teacher / "model").tokenizer.get_vocab()


@pytest.mark.slow  # the pretrained-teacher default above and the problem check below stay in the fast suite
def test_student_model_keeps_the_configured_model(pretrained_teacher: Path, tmp_path: Path) -> None:
    out = train(["task=distill", f"teacher.path={pretrained_teacher}", "task.student=model"], tmp_path / "run")
    assert student_config(out)["hidden_size"] == 128  # model=bert_tiny, the distill task's default


@pytest.mark.slow
def test_a_from_scratch_teacher_keeps_the_configured_model(tmp_path: Path) -> None:
    teacher = train(["model.hidden_size=64"], tmp_path / "teacher")
    out = train(["task=distill", f"teacher.path={teacher}", "model.hidden_size=32", "model.intermediate_size=64"],
                tmp_path / "run")
    assert student_config(out)["hidden_size"] == 32


def test_a_teacher_of_another_problem_is_refused(pretrained_teacher: Path, tmp_path: Path) -> None:
    cfg = compose_cfg([*FAST, "task=distill", f"teacher.path={pretrained_teacher}", "experiment=reviews_stars"],
                      tmp_path / "run")
    expect_error(cfg, "is a classification model but this run is problem=regression")
