"""ddp_cpu (two gloo processes): runs, sweeps, resume, Optuna resume, exactly-once sampling; FSDP wrapping."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import timm
import torch
from conftest import ROOT, check_one_ddp_run, finished_trials, run_cli
from transformers import BertConfig, BertModel

from tunelab.distributed import block_classes

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
    lrs = {json.loads((sweeps[0] / j / "metrics.json").read_text())["task"] for j in jobs}
    assert lrs == {"finetune"}


def test_resume_ddp_cpu_run_from_last(tmp_path: Path, data_file: Path) -> None:
    first = run_cli("trainer=ddp_cpu", *TINY, f"data.train_file={data_file}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    run = next((tmp_path / "logs" / "finetune" / "runs").iterdir())
    steps = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    second = run_cli("trainer=ddp_cpu", *TINY, f"data.train_file={data_file}", "ckpt_path=last",
                     "trainer.max_epochs=2", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert [p.name for p in (tmp_path / "logs" / "finetune" / "runs").iterdir()] == [run.name]
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2 * steps


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
