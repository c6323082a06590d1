"""ddp_cpu (two gloo processes): runs, sweeps, resume, Optuna resume, exactly-once sampling, ranks that die with
their parent; FSDP wrapping."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import timm
import torch
from conftest import FAST, ROOT, check_one_ddp_run, finished_trials, run_cli
from omegaconf import OmegaConf
from transformers import BertConfig, BertModel

from tunelab.runs.distributed import PARENT_PID_ENV, block_classes, launched_parent_pid

TINY = ["data=text_files", "model.hidden_size=32", "model.intermediate_size=64", "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false"]


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    rows = [{"text": f"item {i} is {word} {i % 7}", "label": word} for i in range(60) for word in ("good", "bad")]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_ddp_cpu_run_writes_artifacts_once(tmp_path: Path, data_file: Path) -> None:
    proc = run_cli("trainer=ddp_cpu", *TINY, f"data.train_file={data_file}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = check_one_ddp_run(tmp_path / "logs", "finetune")
    run = (tmp_path / "logs" / "finetune" / "latest").resolve()
    assert (run / "model" / "model.safetensors").is_file()

    # the same checkpoint tested by one process: test metrics were gathered from both ranks, not rank 0's half
    best = next((run / "checkpoints").glob("epoch*.ckpt"))
    alone = run_cli(*TINY, f"data.train_file={data_file}", "train=false", f"ckpt_path={best}", cwd=tmp_path)
    assert alone.returncode == 0, alone.stderr[-3000:]
    single = json.loads(((tmp_path / "logs" / "finetune" / "latest").resolve() / "metrics.json").read_text())
    for name in ("test/acc", "test/f1"):
        assert single["metrics"][name] == pytest.approx(metrics[name], abs=1e-6), name


def test_multirun_with_ddp_cpu_makes_exactly_two_runs(tmp_path: Path, data_file: Path) -> None:
    proc = run_cli("-m", "trainer=ddp_cpu", *TINY, f"data.train_file={data_file}", "optimizer.lr=1e-3,3e-3",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("Launching 2 jobs locally") == 1  # no rank ran its own sweep
    task_dir = tmp_path / "logs" / "finetune"
    sweeps = list((task_dir / "multiruns").iterdir())
    assert len(sweeps) == 1
    jobs = sorted(p.name for p in sweeps[0].iterdir() if p.is_dir())
    assert jobs == ["0", "1"]
    for job in jobs:
        assert (sweeps[0] / job / "metrics.json").is_file()
        assert (sweeps[0] / job / "ddp_rank_1.log").is_file()
    assert not (task_dir / "runs").exists()
    lrs = {}
    for job in jobs:
        lr = OmegaConf.load(sweeps[0] / job / ".hydra" / "config.yaml").optimizer.lr
        # rank 1 logs the overrides it was started with: this job's learning rate, not the sweep's list
        [line] = [x for x in (sweeps[0] / job / "ddp_rank_1.log").read_text().splitlines() if "overrides:" in x]
        [rank1_lr] = [float(o.split("=", 1)[1]) for o in line.split() if o.startswith("optimizer.lr=")]
        assert rank1_lr == lr, (job, line)
        lrs[job] = lr
    assert sorted(lrs.values()) == [1e-3, 3e-3]


@pytest.mark.slow  # in make test-all: the fast suite keeps one run of this kind
def test_killed_ddp_cpu_run_resumes_from_last(tmp_path: Path, data_file: Path) -> None:
    """Rank 0 is SIGKILLed in its second epoch (rank 1 dies with it); `ckpt_path=last` finishes the run."""
    args = ["trainer=ddp_cpu", *TINY, f"data.train_file={data_file}", "trainer.max_epochs=2", "data.batch_size=8",
            "trainer.limit_train_batches=3", "callbacks.model_checkpoint.every_n_train_steps=1"]
    env = {"PYTHONPATH": str(Path(__file__).parent)}
    kill = ["+callbacks.kill._target_=faults.KillAt", "+callbacks.kill.at=train_batch_end", "+callbacks.kill.step=4"]
    first = run_cli(*args, *kill, cwd=tmp_path, env=env)
    assert first.returncode == -9, first.stderr[-3000:]
    run = next((tmp_path / "logs" / "finetune" / "runs").iterdir())
    # Lightning runs checkpoint callbacks last: the kill at step 4 came before its save
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    second = run_cli(*args, "ckpt_path=last", cwd=tmp_path, env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert [p.name for p in (tmp_path / "logs" / "finetune" / "runs").iterdir()] == [run.name]
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 6
    assert (tmp_path / "logs" / "finetune" / "latest").resolve() == run


def test_optuna_search_resumes_after_being_killed(tmp_path: Path, data_file: Path) -> None:
    args = ["-m", "hparams_search=finetune_optuna", "hydra.sweeper.n_trials=3", *TINY,
            f"data.train_file={data_file}", "trainer.limit_train_batches=2"]
    db = tmp_path / "logs" / "finetune" / "optuna.db"
    env = {"TUNELAB_LOG_DIR": str(tmp_path / "logs")}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path,
                            env={**__import__("os").environ, **env}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while len(finished_trials(db)) < 1 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    __import__("os").killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(finished_trials(db))
    assert 1 <= done < 3
    again = run_cli(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{done} of 3 trials finished, {3 - done} to run" in again.stdout + again.stderr
    assert len(finished_trials(db)) == 3


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie nobody has reaped yet counts as gone). `ps`: Linux and macOS."""
    stat = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    return bool(stat) and not stat.startswith("Z")


def pids_with(*fragments: str) -> list[int]:
    """Processes whose command line holds every fragment."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [int(line.split(None, 1)[0]) for line in out.splitlines() if all(f in line for f in fragments)]


def gone_within(pid: int, seconds: float) -> float | None:
    """Seconds until `pid` stopped running, or None when it still runs after `seconds`."""
    start = time.time()
    while time.time() - start < seconds:
        if not alive(pid):
            return time.time() - start
        time.sleep(0.1)
    return None


@pytest.mark.parametrize("when", ["started", pytest.param("starting", marks=pytest.mark.slow)])
def test_ddp_rank_dies_when_its_parent_is_killed(tmp_path: Path, data_file: Path, when: str) -> None:
    """SIGKILL to the launching process (nothing of it can clean up) takes rank 1 with it.

    `started`: rank 1 has begun its job (its log exists), so it already watches its parent. `starting`: rank 1
    exists but is still importing; it ends as soon as its job begins and finds its parent gone.
    """
    long_run = [a for a in FAST if not a.startswith(("trainer.max_epochs", "trainer.limit_train_batches"))]
    args = ["trainer=ddp_cpu", *TINY[:3], f"data.train_file={data_file}", *long_run, "trainer.max_epochs=1000"]
    with open(tmp_path / "out.txt", "w") as out:
        parent = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path,
                                  env={**os.environ, "TUNELAB_LOG_DIR": str(tmp_path / "logs")},
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, child = time.time() + 240, []
        while not child and time.time() < deadline and parent.poll() is None:
            time.sleep(0.1)
            if when == "starting" or list((tmp_path / "logs" / "finetune" / "runs").glob("*/ddp_rank_1.log")):
                child = pids_with("hydra.job.name=ddp_rank_1", str(tmp_path))
        assert child, (tmp_path / "out.txt").read_text()[-3000:]
        [pid] = child
        assert alive(pid) and parent.poll() is None  # a long run: neither would end by itself soon
        parent.kill()
        parent.wait()
        # a starting rank first finishes its imports (seconds); without the guard it would live for minutes
        assert gone_within(pid, 10 if when == "started" else 60) is not None, "rank 1 outlived its parent"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(parent.pid, signal.SIGKILL)  # the session's group: whatever is left of the run


GUARDED = textwrap.dedent('''
    import sys, time
    from tunelab.runs.distributed import guard_parent
    guard_parent(int(sys.argv[1]), pdeathsig=sys.argv[2] == "1", interval=0.2)
    print("guarded", flush=True)
    time.sleep(600)
''')

MIDDLE = textwrap.dedent('''
    import os, subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", sys.argv[1], str(os.getpid()), sys.argv[2]])
    print(child.pid, flush=True)
    time.sleep(600)
''')


@pytest.mark.parametrize("pdeathsig", [True, False], ids=["pdeathsig", "watcher-thread"])
def test_guarded_process_dies_with_its_parent(pdeathsig: bool) -> None:
    """Both mechanisms alone: the kernel's parent-death signal (Linux) and the portable watcher thread."""
    middle = subprocess.Popen([sys.executable, "-c", MIDDLE, GUARDED, str(int(pdeathsig))],
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        pid = int(middle.stdout.readline())
        assert middle.stdout.readline().strip() == "guarded"
        assert alive(pid)
        middle.kill()
        middle.wait()
        assert gone_within(pid, 5) is not None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(middle.pid, signal.SIGKILL)
        middle.stdout.close()


def test_guard_exits_at_once_when_the_parent_is_already_gone() -> None:
    """The parent died while the rank was still starting: the guard ends it instead of watching a stranger."""
    gone = 2**22 + 1  # above any pid Linux or macOS hands out
    proc = subprocess.run([sys.executable, "-c", GUARDED, str(gone), "1"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and "guarded" not in proc.stdout
    assert f"parent process {gone} is gone" in proc.stderr


def test_only_launched_ranks_watch_a_parent(monkeypatch: pytest.MonkeyPatch) -> None:
    """The launching process, sweep jobs and single-process runs never start the guard."""
    monkeypatch.delenv(PARENT_PID_ENV, raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert launched_parent_pid() is None  # a plain run
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert launched_parent_pid() is None  # rank 0 of a DDP run: the launching process
    monkeypatch.setenv(PARENT_PID_ENV, "4242")
    assert launched_parent_pid() is None
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert launched_parent_pid() == 4242
    monkeypatch.setenv(PARENT_PID_ENV, str(os.getpid()))
    assert launched_parent_pid() is None


SAMPLER_SCRIPT = textwrap.dedent('''
    import json, sys
    import lightning as L, torch
    from tunelab.data.text import TextDataModule

    class Record(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen = []
        def training_step(self, batch, i):
            for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
                self.seen.append(ids[mask.bool()].tolist())
            return (self.w * 0).sum()
        def on_train_epoch_end(self):
            with open(f"{sys.argv[2]}/rank{self.global_rank}.json", "w") as f:
                json.dump(self.seen, f)
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    L.seed_everything(0)  # as train.py does: every rank draws the epoch's order from the run's seed
    dm = TextDataModule(sys.argv[1], val_fraction=0, test_fraction=0, batch_size=8, cache_dir=sys.argv[3])
    dm.setup()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Record(), datamodule=dm)
''')


def test_each_training_sample_seen_once_per_epoch_across_two_ranks(tmp_path: Path, data_file: Path) -> None:
    from tunelab.data.text import TextDataModule

    script = tmp_path / "record.py"
    script.write_text(SAMPLER_SCRIPT)
    cache = str(tmp_path / "cache")
    proc = subprocess.run([sys.executable, str(script), str(data_file), str(tmp_path), cache],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = [tuple(x) for r in (0, 1) for x in json.loads((tmp_path / f"rank{r}.json").read_text())]
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    assert 0 < len(rank0) < len(seen)  # both ranks took part
    dm = TextDataModule(str(data_file), val_fraction=0, test_fraction=0, cache_dir=cache)
    dm.setup()
    expected = sorted(tuple(x) for x in dm.datasets["train"]["input_ids"])
    assert sorted(seen) == expected


def tiny_bert() -> torch.nn.Module:
    return BertModel(BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64))


@pytest.mark.parametrize(("make", "unit", "count"), [
    (tiny_bert, "BertLayer", 3),
    (lambda: timm.create_model("resnet10t"), "BasicBlock", 4),
    (lambda: timm.create_model("vit_tiny_patch16_224", depth=2), "Block", 2),
])
def test_fsdp_wraps_each_transformer_layer_and_timm_block(make, unit: str, count: int) -> None:
    """The auto-wrap policy trainer=fsdp uses (FSDP itself needs a GPU: Lightning refuses it on CPU)."""
    policy = block_classes()
    wrapped = [type(m).__name__ for m in make().modules() if policy(m, recurse=False, nonwrapped_numel=0)]
    assert wrapped == [unit] * count
