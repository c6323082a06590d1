"""Kill a run, resume it with `ckpt_path=last`, and get exactly what an uninterrupted run gets.

Kills come from `faults.KillAt` (SIGKILL at a chosen hook), added on the command line. Every run of a
module shares one data cache, built before the reference run.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_cli, snapshot
from safetensors.torch import load_file

BUDGET = ["trainer.max_epochs=2", "trainer.limit_train_batches=6", "trainer.limit_val_batches=2",
          "trainer.limit_test_batches=2", "callbacks.model_checkpoint.every_n_train_steps=2",
          "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1"]
TASKS = {"finetune": ["model.hidden_size=64"], "mlm": ["task=mlm", "model.hidden_size=64"],
         # problems whose metrics keep more state (Spearman's predictions, per-label counts), in their own folders
         "regression": ["experiment=reviews_stars", "model.hidden_size=64", "task_name=regression"],
         "multi_label": ["experiment=reviews_aspects", "model.hidden_size=64", "task_name=multi_label"]}
TESTS = str(Path(__file__).parent)


def kill_at(hook: str, step: int) -> list[str]:
    return ["+callbacks.kill._target_=faults.KillAt", f"+callbacks.kill.at={hook}", f"+callbacks.kill.step={step}"]


CACHE: list[Path] = []  # the module's one data cache, made by the `reference` fixture


def train(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """One thread: a multi-threaded BLAS may split its sums differently when the machine is busy, which moves
    results by ~1e-7 from run to run, resumed or not."""
    env = {"PYTHONPATH": TESTS, "TUNELAB_CACHE_DIR": str(CACHE[0]), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return run_cli(*args, cwd=cwd, env=env)


def runs_of(cwd: Path, task: str) -> list[Path]:
    folder = cwd / "logs" / task / "runs"
    return sorted(folder.iterdir()) if folder.is_dir() else []


def outcome(run: Path) -> tuple[dict, dict, dict]:
    """Final metrics, exported weights and the weights of the last checkpoint."""
    metrics = json.loads((run / "metrics.json").read_text())["metrics"]
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    return metrics, load_file(run / "model" / "model.safetensors"), last


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory):
    """`reference(task)`: one uninterrupted run of a task, made on first use (after a warm-up run that
    builds the shared data cache, whose first build can differ from later loads)."""
    root = tmp_path_factory.mktemp("resume")
    CACHE[:] = [root / "cache"]
    done: dict[str, Path] = {}

    def get(task: str) -> Path:
        if task not in done:
            warm, cwd = root / f"warm_{task}", root / f"ref_{task}"
            warm.mkdir()
            cwd.mkdir()
            args = TASKS[task]
            assert train(warm, *args, "trainer.max_steps=1", "test=false", "optimized_metric=null").returncode == 0
            proc = train(cwd, *args, *BUDGET)
            assert proc.returncode == 0, proc.stderr[-3000:]
            [done[task]] = runs_of(cwd, task)
        return done[task]

    get("finetune")  # builds the cache the other tests use
    return get


def killed_and_resumed(cwd: Path, task: str, hook: str, step: int) -> Path:
    first = train(cwd, *TASKS[task], *BUDGET, *kill_at(hook, step))
    assert first.returncode == -9, first.stderr[-3000:]
    [killed] = runs_of(cwd, task)
    assert json.loads((killed / "status.json").read_text())["state"] == "running"
    resumed = train(cwd, *TASKS[task], *BUDGET, "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert runs_of(cwd, task) == [killed]  # continued in its own folder
    assert (cwd / "logs" / task / "latest").resolve() == killed
    assert json.loads((killed / "status.json").read_text())["state"] == "finished"
    return killed


@pytest.mark.parametrize(("task", "hook", "step"), [
    ("finetune", "train_batch_end", 3),  # mid-epoch: resumes from the step-2 checkpoint
    pytest.param("finetune", "validation_end", 6, marks=pytest.mark.slow),  # at the epoch boundary
    pytest.param("finetune", "test_start", 12, marks=pytest.mark.slow),  # only test and export are left
    pytest.param("mlm", "train_batch_end", 3, marks=pytest.mark.slow),
    pytest.param("mlm", "validation_end", 6, marks=pytest.mark.slow),
    pytest.param("regression", "train_batch_end", 3, marks=pytest.mark.slow),
    pytest.param("multi_label", "validation_end", 6, marks=pytest.mark.slow),
])
def test_killed_run_resumes_bit_exactly(reference, tmp_path: Path, task: str, hook: str, step: int) -> None:
    run = killed_and_resumed(tmp_path, task, hook, step)
    metrics, exported, last = outcome(run)
    ref_metrics, ref_exported, ref_last = outcome(reference(task))
    assert metrics == ref_metrics  # val, test and train metrics, to the last bit
    assert last.keys() == ref_last.keys() and all(torch.equal(last[k], ref_last[k]) for k in last)
    assert all(torch.equal(exported[k], ref_exported[k]) for k in exported)
    assert not list(run.rglob("*.tmp"))


@pytest.mark.slow  # the fast suite has short versions in test_faults.py and test_bad_input.py
def test_resuming_a_finished_run_is_an_error_that_writes_nothing(reference, tmp_path: Path) -> None:
    first = train(tmp_path, *TASKS["finetune"], *BUDGET, "trainer.max_epochs=1")
    assert first.returncode == 0, first.stderr[-3000:]
    [run] = runs_of(tmp_path, "finetune")
    before = snapshot(run)
    again = train(tmp_path, *TASKS["finetune"], *BUDGET, "trainer.max_epochs=1", "ckpt_path=last")
    assert again.returncode == 2
    assert "has finished" in again.stderr and f"ckpt_path={run}/checkpoints/last.ckpt" in again.stderr
    assert "Traceback" not in again.stderr
    assert snapshot(run) == before and runs_of(tmp_path, "finetune") == [run]
    # the advice works: a new run from the finished run's checkpoint, with a larger budget
    more = train(tmp_path, *TASKS["finetune"], *BUDGET, f"ckpt_path={run}/checkpoints/last.ckpt")
    assert more.returncode == 0, more.stderr[-3000:]
    assert snapshot(run) == before and len(runs_of(tmp_path, "finetune")) == 2
    same = train(tmp_path, *TASKS["finetune"], *BUDGET, "trainer.max_epochs=1",
                 f"ckpt_path={run}/checkpoints/last.ckpt")
    assert same.returncode == 2 and "nothing is left to train" in same.stderr


@pytest.mark.slow  # the fast suite has short versions in test_faults.py and test_bad_input.py
def test_a_run_killed_before_its_first_checkpoint_is_not_resumed(reference, tmp_path: Path) -> None:
    first = train(tmp_path, *TASKS["finetune"], *BUDGET, *kill_at("train_batch_end", 0))
    assert first.returncode == -9
    [killed] = runs_of(tmp_path, "finetune")
    assert not (killed / "checkpoints" / "last.ckpt").exists()
    resumed = train(tmp_path, *TASKS["finetune"], *BUDGET, "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    killed_again, new = runs_of(tmp_path, "finetune")
    assert killed_again == killed and (tmp_path / "logs" / "finetune" / "latest").resolve() == new
    assert json.loads((killed / "status.json").read_text())["state"] == "running"  # says it never finished


def test_a_second_process_is_kept_out_of_a_run_in_use(reference, tmp_path: Path) -> None:
    first = train(tmp_path, *TASKS["finetune"], *BUDGET, *kill_at("train_batch_end", 3))
    assert first.returncode == -9
    [run] = runs_of(tmp_path, "finetune")
    before = snapshot(run)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_EX);"
        " print('locked', flush=True); time.sleep(120)"), str(run / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = train(tmp_path, *TASKS["finetune"], *BUDGET, "ckpt_path=last")
    finally:
        holder.kill()
        holder.wait()
    assert second.returncode == 2 and "is still running" in second.stderr, second.stderr[-2000:]
    assert snapshot(run) == before and runs_of(tmp_path, "finetune") == [run]


def test_lock_is_released_when_its_process_dies(tmp_path: Path) -> None:
    from tunelab import runs

    folder = tmp_path / "run"
    folder.mkdir()
    child = subprocess.run([sys.executable, "-c", (
        "import sys; from pathlib import Path; from tunelab import runs;"
        " runs.claim(Path(sys.argv[1]), None); import os, signal; os.kill(os.getpid(), signal.SIGKILL)"),
        str(folder)], cwd=ROOT)
    assert child.returncode == -9
    fd = os.open(folder / runs.LOCK, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # would raise if the dead process still held it
    os.close(fd)


@pytest.mark.slow  # the fast suite has short versions in test_faults.py and test_bad_input.py
def test_a_failed_start_leaves_no_run_folder(reference, tmp_path: Path) -> None:
    proc = train(tmp_path, "data=text_files", f"data.train_file={tmp_path / 'missing.jsonl'}")
    assert proc.returncode == 2 and "file not found" in proc.stderr
    assert runs_of(tmp_path, "finetune") == []


def test_epoch_order_takes_any_64_bit_seed() -> None:
    """An unseeded process's initial seed is any 64-bit number; the order still depends on (seed, epoch)."""
    from tunelab.data.base import EpochShuffle

    seed = 2**64 - 5
    first, again = EpochShuffle(100, seed), EpochShuffle(100, seed)
    assert list(first) == list(again) and sorted(first) == list(range(100))
    again.set_epoch(1)
    assert list(again) != list(first)
