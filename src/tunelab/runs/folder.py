"""Run folders: which one `ckpt_path=last` continues, who may write into it, and when it is finished.

A run folder `logs/<task>/runs/<time>_<pid>/` is in one of three states:

- **running**: a process holds its `.lock` (an OS lock, released even by SIGKILL);
- **finished**: `status.json` says `finished` (written atomically, last of all its files);
- **interrupted**: neither; resumable when it has `checkpoints/last.ckpt`, otherwise it was killed
  before its first checkpoint and holds nothing to continue.

`ckpt_path=last` looks at the newest run of the task only. Interrupted with a checkpoint: it is
continued in place (and locked before Hydra writes anything into it). Interrupted before its first
checkpoint: a new run starts. Finished, or running in another process: an error that says what to do.
The choice is made while Hydra resolves `hydra.run.dir`, so no second process can take the same run.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.runs import processes

STATUS, LOCK, LAST = "status.json", ".lock", "checkpoints/last.ckpt"


@dataclass
class Decision:
    """What `ckpt_path=last` resolved to in this process (`run_dir` records it, `claim` acts on it)."""

    folder: Path
    resumed: bool
    problem: str | None = None
    finished: Path | None = None  # the newest run, finished: `latest` must point at it


_decisions: dict[str, Decision] = {}
_held: dict[Path, int] = {}  # run folder -> fd of its lock, kept open for the life of the process


def is_primary_process() -> bool:
    """The process that owns the run folder: not a rank started by Lightning's launcher, torchrun or SLURM."""
    return all(os.environ.get(k, "0") == "0" for k in ("LOCAL_RANK", "RANK", "NODE_RANK", "SLURM_PROCID"))


def write_atomic(path: Path, text: str) -> None:
    """Write-then-rename: a reader (or a process killed mid-write) never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def status(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / STATUS).read_text())
    except (OSError, ValueError):
        return {}


def is_finished(folder: Path) -> bool:
    return status(folder).get("state") == "finished"


def _try_lock(folder: Path) -> int | None:
    """The fd of `folder/.lock`, locked by this process, or None when another process holds it."""
    if folder in _held:
        return _held[folder]
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _held[folder] = fd
    return fd


def release(folder: Path) -> None:
    fd = _held.pop(folder, None)
    if fd is not None:
        os.close(fd)


def holder(folder: Path) -> str:
    try:
        return (folder / LOCK).read_text().strip() or "?"
    except OSError:
        return "?"


def newest_run(task_dir: Path) -> Path | None:
    """The most recently started run folder of a task."""
    runs = [p for p in (task_dir / "runs").glob("*") if p.is_dir()] if (task_dir / "runs").is_dir() else []
    return max(runs, key=lambda p: (status(p).get("started", p.stat().st_mtime), p.name), default=None)


def fresh_folder(task_dir: Path) -> Path:
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    return task_dir / "runs" / f"{stamp}_{os.getpid()}"


def decide(task_dir: Path, task_name: str) -> Decision:
    """Resolve `ckpt_path=last` against the newest run of `task_dir` (see the module docstring)."""
    newest = newest_run(task_dir)
    if newest is None:
        return Decision(fresh_folder(task_dir), False)
    if is_finished(newest):  # checked before any lock: nothing, not even a lock file, is written into it
        return Decision(fresh_folder(task_dir), False, (
            f"ckpt_path=last: the newest {task_name} run {newest} has finished, so there is nothing to resume "
            f"(a finished run is never written to again). To train it longer, start a new run from its "
            f"checkpoint with a larger budget: ckpt_path={newest / LAST} trainer.max_epochs=<more epochs>"),
            finished=newest)
    if _try_lock(newest) is None:
        return Decision(fresh_folder(task_dir), False, (
            f"ckpt_path=last: the newest {task_name} run {newest} is still running (process {holder(newest)}); "
            "wait for it to end or stop it, then resume"))
    if not (newest / LAST).is_file():  # killed before its first checkpoint: nothing to continue
        release(newest)
        return Decision(fresh_folder(task_dir), False)
    return Decision(newest, True)


def run_dir(log_dir: str, task_name: str, ckpt_path: Any = None) -> str:
    """Hydra's `hydra.run.dir`: a fresh folder, or the run `ckpt_path=last` continues (locked now)."""
    task_dir = Path(log_dir) / task_name
    if ckpt_path != "last":
        return str(fresh_folder(task_dir))
    key = str(task_dir.resolve())
    if key not in _decisions:
        _decisions[key] = decide(task_dir, task_name)
    return str(_decisions[key].folder)


def output_subdir(log_dir: str, task_name: str, ckpt_path: Any = None) -> str:
    """Hydra's `hydra.output_subdir`: a resumed run keeps its original `.hydra/` and gets one per resume."""
    decision = _decisions.get(str((Path(log_dir) / task_name).resolve())) if ckpt_path == "last" else None
    if decision is not None and decision.resumed:
        return f".hydra/resume_{datetime.now():%Y-%m-%d_%H-%M-%S}_{os.getpid()}"
    return ".hydra"


def decision_for(out: Path) -> Decision | None:
    return next((d for d in _decisions.values() if d.folder.resolve() == out.resolve()), None)


def claim(out: Path, ckpt_path: Any) -> bool:
    """Take `out` for this process before any work; return whether it continues an interrupted run.

    Raises when `ckpt_path=last` found nothing it may continue, or another process holds `out`.
    """
    decision = decision_for(out) if ckpt_path == "last" else None
    if decision is not None and decision.finished is not None:  # killed between finishing and the link
        point_latest(decision.finished, decision.finished.parent.parent / "latest")
    if decision is not None and decision.problem:
        raise TunelabError(decision.problem)
    out.mkdir(parents=True, exist_ok=True)
    if _try_lock(out) is None:
        raise TunelabError(f"run folder {out} is in use by process {holder(out)} (expected one process per run; "
                           "wait for it to end)")
    if ckpt_path == "last" and is_finished(out):
        raise TunelabError(f"run folder {out} holds a finished run (expected an unfinished one to continue)")
    resumed = bool(decision and decision.resumed) or (out / LAST).is_file()
    clean_partial_writes(out)
    state = status(out) if resumed else {}
    write_atomic(out / STATUS, json.dumps({
        "state": "running", "started": state.get("started", time.time()), "pid": os.getpid(),
        "resumes": state.get("resumes", -1) + 1 if resumed else 0}, indent=2))
    return resumed


def clean_partial_writes(out: Path) -> None:
    """Temporary files of writes a killed process left behind (checkpoints, artifacts, pointers)."""
    for tmp in [*out.glob(".*.tmp"), *out.glob("checkpoints/.*.tmp")]:
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()


def finish(out: Path) -> None:
    """Mark the run finished: its files are complete and no resume may write into it again."""
    state = status(out)
    write_atomic(out / STATUS, json.dumps({**state, "state": "finished", "finished": time.time()}, indent=2))


def abandon(out: Path) -> None:
    """After an error: a folder this process made and never checkpointed into holds nothing worth keeping
    (a failed start on bad input); any other folder, a resumed run's above all, is kept."""
    release(out)
    mine = out.name.endswith(f"_{os.getpid()}") and is_primary_process()
    if mine and out.is_dir() and not (out / "checkpoints").exists() and not is_finished(out):
        shutil.rmtree(out, ignore_errors=True)


def point_latest(target: Path, link: Path) -> None:
    """Atomically repoint `logs/<task>/latest` (a relative symlink) at `target`, if it points elsewhere."""
    if link.is_symlink() and link.resolve() == target.resolve():
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    for stale in link.parent.glob(".latest.*"):  # half-made links of processes killed while repointing
        if stale.is_symlink() and not processes.other_alive(stale.suffix.lstrip(".")):
            stale.unlink(missing_ok=True)
    tmp = link.with_name(f".latest.{os.getpid()}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(os.path.relpath(target.resolve(), link.parent.resolve()), target_is_directory=True)
    os.replace(tmp, link)

