"""Kill runs (SIGKILL) at chosen and at random moments, resume each with `ckpt_path=last`, and check what is left.

After every kill and every resume:

(a) no file of a run that had finished before the kill changed (content, links, files added or removed);
(b) the documented resume, the same overrides + `ckpt_path=last`, exits 0, continuing the killed run in place
    when it has a checkpoint and starting a new run when it has none; when the kill landed after the run had
    finished, it exits 2 ("has finished") and writes nothing;
(c) `logs/<task>/latest` points at the newest finished run, which has metrics.json (val and test metrics)
    and a model/ folder;
(d) no process started by the test is left (none in /proc names the test's folder);
(e) the resumed run holds no partial write (`*.tmp`) and no checkpoint beside last.ckpt and the best, and a
    process that ends by itself leaves nothing in its temp folder (but torch's compile cache).

Kills: `faults.KillAt` (a callback that SIGKILLs its own process at a hook or in the middle of a write: a
checkpoint, the export, the `latest` link), timer kills (the process group SIGKILLed a random fraction of the
task's uninterrupted duration after its start) and watch kills (SIGKILLed a random moment after a new path
appears: a new run's status.json, so during data preparation; the teacher cache's folder while it is built).

The slow harness draws its plan from a seeded generator and prints the seed. Replay a plan with
`TUNELAB_FAULTS_SEED=<seed> python -m pytest -m slow tests/test_faults.py -s`; timer kills land where the
machine's speed puts them, so a replay repeats the plan, not always the exact moment.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT, run_cli, snapshot

TESTS = Path(__file__).resolve().parent
BUDGET = ["trainer.max_epochs=2", "trainer.limit_train_batches=6", "trainer.limit_val_batches=2",
          "trainer.limit_test_batches=2", "callbacks.model_checkpoint.every_n_train_steps=2",
          "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1"]
STEPS = 12  # 2 epochs of 6 steps, every task below
TASKS = {
    "finetune": ["task=finetune", "model.hidden_size=64"],
    "mlm": ["task=mlm", "model.hidden_size=64"],
    "distill": ["task=distill", "teacher.path={teacher}", "task.cache_teacher=true",
                "task.cache_dir={root}/teacher_cache", "model.hidden_size=32", "model.num_heads=2",
                "model.intermediate_size=64", "task.latency_repeats=2"],
    "dann": ["task=dann", "data=reviews_pair", "model=bert_tiny", "model.hidden_size=64",
             "task.discriminator_hidden=[32,32]", "task.embed_samples=8"],
}


@dataclass
class Kill:
    """`at`: faults.KillAt at `hook` once `step` steps ran; `timer`: SIGKILL the process group `fraction` of
    the task's uninterrupted duration after the start; `watch`: SIGKILL it `delay` seconds after a path
    matching one of `watch` (globs under the test folder) appears that was not there at the start, looking
    from `fraction` of the duration on."""

    what: str
    hook: str = ""
    step: int = 0
    fraction: float = 0.0
    watch: tuple[str, ...] = ()
    delay: float = 0.0

    def args(self) -> list[str]:
        if self.what != "at":
            return []
        return ["+callbacks.kill._target_=faults.KillAt", f"+callbacks.kill.at={self.hook}",
                f"+callbacks.kill.step={self.step}"]

    def __str__(self) -> str:
        if self.what == "at":
            return f"KillAt {self.hook} step>={self.step}"
        if self.what == "timer":
            return f"timer {self.fraction:.3f}"
        return f"watch {'|'.join(self.watch)} from {self.fraction:.2f}, then {self.delay:.2f}s"


@dataclass
class Launch:
    rc: int
    seconds: float
    stderr: str
    log: str

    @property
    def killed(self) -> bool:
        return self.rc == -signal.SIGKILL


def status(run: Path) -> dict:
    try:
        return json.loads((run / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def finished(run: Path) -> bool:
    return status(run).get("state") == "finished"


def last_step(run: Path) -> int | None:
    import torch

    last = run / "checkpoints" / "last.ckpt"
    return torch.load(last, map_location="cpu", weights_only=True)["global_step"] if last.is_file() else None


def stray_checkpoints(run: Path) -> list[str]:
    """Files in a finished run's checkpoints/ other than last.ckpt and the best (save_top_k=1)."""
    best = json.loads((run / "metrics.json").read_text()).get("best_checkpoint") or ""
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.name not in ("last.ckpt", Path(best).name))


def describe(run: Path | None) -> str:
    if run is None:
        return "no run folder"
    step = last_step(run)
    parts = [run.name, status(run).get("state", "no status"),
             "no checkpoint" if step is None else f"last.ckpt at step {step}"]
    parts += [name for name in ("metrics.json", "model") if (run / name).exists()]
    tmp = sorted(str(p.relative_to(run)) for p in run.rglob("*.tmp"))
    return ", ".join(parts + ([f"partial writes {tmp}"] if tmp else []))


class Lab:
    """One logs folder, one temp folder and the runs of every task in them; collects what goes wrong."""

    def __init__(self, root: Path, seed: int | None = None) -> None:
        self.root, self.logs, self.tmp = root, root / "logs", root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)
        self.env = {**os.environ, "TUNELAB_LOG_DIR": str(self.logs), "HYDRA_FULL_ERROR": "0", "PYTHONPATH": path,
                    "TMPDIR": str(self.tmp)}
        self.seed, self.problems, self.kills, self.missed = seed, [], {}, {}
        self.full: dict[str, list[float]] = {}  # seconds of each uninterrupted run from scratch, by task
        self.count = 0

    def duration(self, task: str) -> float:
        """How long an uninterrupted run of `task` takes here (the mean so far: the machine is shared)."""
        seconds = self.full.get(task) or [0.0]
        return sum(seconds) / len(seconds)

    # ------------------------------------------------------------------------------------ processes
    def launch(self, task: str, args: list[str], kill: Kill | None = None) -> Launch:
        """`python train.py args` in its own session, killed as `kill` says; waits for it to end."""
        self.count += 1
        log = self.root / f"proc{self.count:03d}"
        patterns = [str(self.root / p) for p in (kill.watch if kill else ())]
        there = {m for p in patterns for m in glob.glob(p)}
        with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
            start = time.monotonic()
            proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args, *(kill.args() if kill else [])],
                                    cwd=self.root, env=self.env, stdout=out, stderr=err, start_new_session=True)
            try:
                if kill is not None and kill.what == "timer":
                    try:
                        proc.wait(timeout=kill.fraction * self.duration(task))
                    except subprocess.TimeoutExpired:
                        os.killpg(proc.pid, signal.SIGKILL)
                elif kill is not None and kill.what == "watch":
                    self._watch(proc, kill, patterns, there, start + kill.fraction * self.duration(task))
                proc.wait(timeout=900)
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            seconds = time.monotonic() - start
        return Launch(proc.returncode, seconds, Path(f"{log}.err").read_text(), f"{log}.err")

    @staticmethod
    def _watch(proc: subprocess.Popen, kill: Kill, patterns: list[str], there: set[str], after: float) -> None:
        while proc.poll() is None:
            if time.monotonic() >= after and any(set(glob.glob(p)) - there for p in patterns):
                try:
                    proc.wait(timeout=kill.delay)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                return
            time.sleep(0.001)

    def leftovers(self) -> list[str]:
        """Processes (other than this one) whose command line or environment names the test folder."""
        mine, found = str(self.root).encode(), []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                cmdline, environ = (entry / "cmdline").read_bytes(), (entry / "environ").read_bytes()
            except OSError:
                continue
            if mine in cmdline or mine in environ:
                command = cmdline.replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{entry.name}: {command[:200]}")
        return found

    def end_leftovers(self) -> None:
        for line in self.leftovers():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(line.split(":")[0]), signal.SIGKILL)

    # ------------------------------------------------------------------------------------ run folders
    def runs(self, task: str) -> list[Path]:
        folder = self.logs / task / "runs"
        return sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []

    def newest(self, task: str) -> Path | None:
        """The run `ckpt_path=last` looks at: the most recently started one."""
        return max(self.runs(task), key=lambda p: (status(p).get("started", p.stat().st_mtime), p.name), default=None)

    def finished_runs(self) -> dict[str, dict[str, str]]:
        return {str(run.relative_to(self.logs)): snapshot(run)
                for run in sorted(self.logs.glob("*/runs/*")) if finished(run)}

    # ------------------------------------------------------------------------------------ checks
    def problem(self, context: str, what: str, launch: Launch | None = None) -> None:
        detail = f"\n    stderr ({launch.log}):\n      " + "\n      ".join(launch.stderr.splitlines()[-15:]) if launch else ""
        self.problems.append(f"[seed {self.seed}] {context}: {what}{detail}")
        print(f"    PROBLEM: {what}", flush=True)

    def check_unchanged(self, before: dict[str, dict[str, str]], context: str, when: str) -> None:
        """(a) the runs that had finished before are exactly as they were."""
        after = self.finished_runs()
        for run, files in before.items():
            now = after.get(run)
            if now == files:
                continue
            if now is None:
                self.problem(context, f"finished run {run} is no longer finished (or gone) {when}")
                continue
            changed = sorted(k for k in files.keys() | now.keys() if files.get(k) != now.get(k))
            self.problem(context, f"finished run {run} changed {when}: {changed[:8]}")

    def check_no_leftovers(self, context: str, when: str) -> None:
        """(d) no process of the test is left."""
        left = self.leftovers()
        if left:
            self.problem(context, f"processes left {when}: {left}")
            self.end_leftovers()

    def check_latest(self, task: str, context: str) -> None:
        """(c) latest is the newest finished run, complete; (e) with no stray checkpoint or half-made link."""
        link = self.logs / task / "latest"
        done = [r for r in self.runs(task) if finished(r)]
        if not done:
            return
        want = max(done, key=lambda r: status(r).get("finished", 0))
        if not link.is_symlink():
            self.problem(context, f"no {link} although {want.name} finished")
            return
        got = link.resolve()
        if got != want.resolve():
            self.problem(context, f"latest points at {got.name}, not the newest finished run {want.name}")
        metrics = json.loads((got / "metrics.json").read_text())["metrics"] if (got / "metrics.json").is_file() else {}
        if not (finished(got) and any(k.startswith("val/") for k in metrics)
                and any(k.startswith("test/") for k in metrics) and any((got / "model").glob("*"))):
            self.problem(context, f"latest {got.name} is not a complete finished run ({describe(got)}, "
                                  f"metrics {sorted(metrics)})")
        if (got / "checkpoints").is_dir() and stray_checkpoints(got):
            self.problem(context, f"checkpoints beside last.ckpt and the best in {got.name}: {stray_checkpoints(got)}")
        strays = sorted(p.name for p in (self.logs / task).glob(".latest.*"))
        if strays:
            self.problem(context, f"half-made latest links left in {self.logs / task}: {strays}")

    def check_ended(self, context: str, launch: Launch, resume: bool, newest: Path | None, now: Path | None,
                    folders: set[Path], temp: set[Path]) -> None:
        """(b), (e) for a process that ended by itself, on an unfinished newest run (or none)."""
        if launch.rc != 0:
            self.problem(context, f"{'resume' if resume else 'run'} exited {launch.rc}", launch)
            return
        if resume:
            resumable = newest is not None and (newest / "checkpoints" / "last.ckpt").is_file()
            if resumable and now != newest:
                self.problem(context, f"resume did not continue {newest.name} (newest is now {describe(now)})")
            if not resumable and now in folders:
                self.problem(context, f"nothing to continue in {describe(newest)}, yet no new run started")
        if now is None or not finished(now):
            self.problem(context, f"exit 0 but the newest run is not finished: {describe(now)}")
        else:
            partial = sorted(str(p.relative_to(now)) for p in now.rglob("*.tmp"))
            if partial:
                self.problem(context, f"partial writes left in {now.name}: {partial}")
        left = sorted(p.name for p in set(self.tmp.iterdir()) - temp if not p.name.startswith("torchinductor_"))
        if left:
            self.problem(context, f"a process that ended by itself left in its temp folder: {left}")

    # ------------------------------------------------------------------------------------ an episode
    def episode(self, task: str, args: list[str], kills: list[Kill], label: str) -> None:
        """A fresh run killed by `kills[0]`; each resume killed by the next kill; then the resume that ends."""
        context = f"{task} / {label}"
        print(f"  {context}: {' then '.join(map(str, kills))}", flush=True)
        for i, kill in enumerate([*kills, None]):
            before = self.finished_runs()
            resume = i > 0
            newest = self.newest(task)
            was_done = resume and newest is not None and finished(newest)
            folders = set(self.runs(task))
            temp = set(self.tmp.iterdir())
            launch = self.launch(task, [*args, "ckpt_path=last"] if resume else args, kill)
            now = self.newest(task)
            new = now is not None and now not in folders
            print(f"    {'resume' if resume else 'fresh run'}{f' ({kill})' if kill else ''}: rc={launch.rc} "
                  f"after {launch.seconds:.1f}s; {describe(now) if new or resume else 'no run folder made'}",
                  flush=True)
            if kill is not None:
                if launch.killed:
                    self.kills[task] = self.kills.get(task, 0) + 1
                else:
                    self.missed[task] = self.missed.get(task, 0) + 1
                if kill.what == "at" and not launch.killed and not was_done:
                    self.problem(context, f"{kill} did not kill the process (rc {launch.rc})", launch)
            if was_done and not launch.killed:  # (b) the kill before this one landed after the run finished
                if launch.rc != 2 or "has finished" not in launch.stderr:
                    self.problem(context, f"resume of the finished {newest.name}: rc {launch.rc}, expected 2 "
                                          "with 'has finished'", launch)
                if set(self.runs(task)) != folders:
                    self.problem(context, f"resume of a finished run changed the run folders: "
                                          f"{sorted(p.name for p in set(self.runs(task)) ^ folders)}")
            elif not launch.killed:
                self.check_ended(context, launch, resume, newest, now, folders, temp)
            when = f"after {'the resume' if resume else 'the run'}{f' ({kill})' if kill else ''}"
            self.check_unchanged(before, context, when)  # (a), for the kill and for each resume
            self.check_no_leftovers(context, when)
            if launch.rc == 0 and new:
                self.full.setdefault(task, []).append(launch.seconds)
            if not launch.killed and (kill is None or launch.rc != 0):
                break  # ended by itself; a run a kill missed (rc 0) is resumed once more: that must say finished
        self.check_latest(task, context)


def kill_at(hook: str, step: int = 0) -> Kill:
    return Kill("at", hook, step)


def fake_finished_run(logs: Path, task: str) -> Path:
    """An older finished run, made by hand: what matters here is only that nothing touches its files."""
    run = logs / task / "runs" / "2000-01-01_00-00-00_1"
    (run / "checkpoints").mkdir(parents=True)
    (run / "model").mkdir()
    (run / ".lock").write_text("1")
    (run / "checkpoints" / "last.ckpt").write_bytes(b"a checkpoint")
    (run / "model" / "config.json").write_text("{}")
    (run / "metrics.json").write_text(json.dumps({"metrics": {"val/acc": 0.5, "test/acc": 0.5}}))
    (run / "status.json").write_text(json.dumps({"state": "finished", "started": 1.0, "finished": 2.0, "pid": 1,
                                                 "resumes": 0}))
    (logs / task / "latest").symlink_to(Path("runs") / run.name, target_is_directory=True)
    return run


# ----------------------------------------------------------------------------------------------- fast suite
FAST_BUDGET = ["task=finetune", "model.hidden_size=64", "trainer.max_epochs=1", "trainer.limit_train_batches=6",
               "trainer.limit_val_batches=2", "trainer.limit_test_batches=2",
               "callbacks.model_checkpoint.every_n_train_steps=2", "trainer.enable_progress_bar=false"]


@pytest.mark.slow  # in make test-all: the fast suite keeps one run of this kind
def test_one_run_killed_five_times_and_resumed(tmp_path: Path) -> None:
    """Kills of one run, each followed by the resume (which the next kill stops), then the resume that ends:
    mid-epoch (step 3, resumed from step 2), at the step-4 checkpoint, while last.ckpt is written right after
    the best at the validation (step 6), after test, and after the run is marked finished but before `latest`
    is repointed (the last resume is then refused, writes nothing into the run, and repoints `latest`)."""
    lab = Lab(tmp_path)
    older = fake_finished_run(lab.logs, "finetune")
    kills = [kill_at("train_batch_end", 3), kill_at("save_checkpoint", 4), kill_at("checkpoint_write", 6),
             kill_at("test_end"), kill_at("latest")]
    lab.episode("finetune", FAST_BUDGET, kills, "deterministic kills")
    assert not lab.problems, "\n".join(lab.problems)
    assert lab.kills == {"finetune": 5}
    [run] = [r for r in lab.runs("finetune") if r != older]
    assert status(run)["state"] == "finished" and status(run)["resumes"] == 4
    assert (lab.logs / "finetune" / "latest").resolve() == run
    # the best is written again under its own name when the resume reaches step 6 again (no -v1 copy)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch000-step6.ckpt", "last.ckpt"]


def test_a_kill_while_latest_is_repointed_leaves_no_half_made_link(tmp_path: Path) -> None:
    """Killed with the new link made under its temporary name, before it replaces `latest`: the resume that
    follows (refused: the run has finished) repoints `latest` and leaves nothing else in logs/<task>/."""
    lab = Lab(tmp_path)
    args = [*FAST_BUDGET, "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]
    killed = lab.launch("finetune", [*args, *kill_at("latest_rename").args()])
    assert killed.killed, killed.stderr[-2000:]
    refused = lab.launch("finetune", [*args, "ckpt_path=last"])
    assert refused.rc == 2 and "has finished" in refused.stderr, refused.stderr[-2000:]
    [run] = lab.runs("finetune")
    assert (lab.logs / "finetune" / "latest").resolve() == run
    assert sorted(p.name for p in (lab.logs / "finetune").iterdir()) == ["latest", "runs"]


# ----------------------------------------------------------------------------------------------- slow harness
def plan(rng: random.Random, task: str) -> list[tuple[str, list[Kill]]]:
    """What to kill in each episode of `task`: a fresh run, killed (and its resume killed too, where two kills are
    listed), then resumed until it ends."""
    started = Kill("watch", watch=(f"logs/{task}/runs/*/status.json",), delay=rng.uniform(0.0, 2.5))
    steps = [
        ("start-up", [Kill("timer", fraction=rng.uniform(0.03, 0.4))]),
        ("data preparation", [started]),  # the run has claimed its folder and now reads and tokenizes its data
        ("checkpoint save", [kill_at("save_checkpoint", rng.randint(0, STEPS))]),
        ("checkpoint write", [kill_at("checkpoint_write", rng.randint(0, STEPS))]),
        ("validation", [kill_at(rng.choice(["validation_batch_end", "validation_end"]), rng.randint(0, STEPS))]),
        ("test", [kill_at(rng.choice(["test_start", "test_end"]))]),
        ("export", [kill_at("export")]),
        ("finish", [kill_at("latest")]),  # marked finished, `latest` not yet repointed: the resume is refused
        ("random, resume killed too", [Kill("timer", fraction=rng.uniform(0.05, 1.0)),
                                       Kill("timer", fraction=rng.uniform(0.05, 0.8))]),
    ]
    if task == "distill":  # its first run builds the teacher cache: kill it while the cache is being written
        steps.insert(0, ("teacher cache", [Kill("watch", watch=("teacher_cache/teacher_outputs/.building-*",),
                                                delay=rng.uniform(0.0, 0.2))]))
    return steps


@pytest.mark.slow
def test_random_kills_of_every_task_are_resumed(tmp_path: Path) -> None:
    seed = int(os.environ.get("TUNELAB_FAULTS_SEED") or random.SystemRandom().randrange(2**32))
    print(f"\nfault harness seed {seed} (replay: TUNELAB_FAULTS_SEED={seed})", flush=True)
    rng = random.Random(seed)
    lab = Lab(tmp_path, seed)
    start, took = time.monotonic(), {}
    (tmp_path / "teacher").mkdir()
    teacher = run_cli("task=finetune", "model.hidden_size=64", *BUDGET, "trainer.max_epochs=1", cwd=tmp_path / "teacher")
    assert teacher.returncode == 0, teacher.stderr[-3000:]
    model = (tmp_path / "teacher" / "logs" / "finetune" / "latest").resolve() / "model"
    try:
        for task, extra in TASKS.items():
            task_start = time.monotonic()
            args = [a.format(teacher=model, root=tmp_path) for a in extra] + BUDGET
            steps = plan(rng, task)
            if task != "distill":  # an uninterrupted run first: its duration scales the timer kills
                first = lab.launch(task, args)
                assert first.rc == 0, first.stderr[-3000:]
                lab.full[task] = [first.seconds]
            for label, kills in steps:
                lab.episode(task, args, kills, label)
            print(f"  {task}: uninterrupted runs {[round(s, 1) for s in lab.full.get(task, [])]}s", flush=True)
            took[task] = time.monotonic() - task_start
    finally:
        lab.end_leftovers()
    total = sum(lab.kills.values())
    print(f"fault harness seed {seed}: {total} kills {lab.kills}, missed (process ended first) {lab.missed}, "
          f"{len(lab.problems)} problems, {time.monotonic() - start:.0f}s "
          f"({', '.join(f'{t} {s:.0f}s' for t, s in took.items())})", flush=True)
    assert not lab.problems, "\n".join(lab.problems)
    assert total >= 20, lab.kills
