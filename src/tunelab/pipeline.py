"""`make pipeline`: MLM pretraining -> fine-tuning -> distillation -> compression -> predictions, then one table.

Each stage is the command a user would type, run as its own process, and picks up the previous stage's
`logs/<task>/latest`; nothing is passed between stages but folders. The summary measures every stage's
model the same way in this process: parameters, size of its weight files, CPU latency at batch 1 with the
same thread count (median over test texts: the network alone, and with tokenization), and test accuracy
on the whole test split, through the same predictor `predict.py` uses.

    python -m tunelab.pipeline                 # every stage, then the table
    python -m tunelab.pipeline --summary       # the table for the models the last pipeline left
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
THREADS = 1  # CPU threads of every latency figure (torch and onnxruntime)
REPEATS, WARMUP = 100, 5  # timed and untimed batch-1 calls per model
FAST = ["trainer.enable_progress_bar=true"]
# (name, command, what it leaves for the next stage)
STAGES: list[tuple[str, list[str]]] = [
    # the transfer recipe's masked LM (experiment=reviews_mlm_pretrain: bert_mini, one review per sequence),
    # 2 of its 25 epochs: what fits the pipeline's time (docs/mlm.md has the full recipe's gains)
    ("mlm", ["train.py", "experiment=reviews_mlm_pretrain", "trainer.max_epochs=2", *FAST]),
    # 3e-4: the transfer recipe's rate for this small self-pretrained encoder (docs/mlm.md); the 5e-5
    # default suits mature checkpoints, and 2 epochs of pretraining are far from one
    ("finetune", ["train.py", "task=finetune", "model=hf", "model.pretrained=${logs}/mlm/latest",
                  "optimizer.lr=3e-4", "trainer.max_epochs=3", *FAST]),
    ("distill", ["train.py", "task=distill", "teacher.path=${logs}/finetune/latest", "model=bert_tiny",
                 "task.cache_teacher=true", "trainer.max_epochs=20", *FAST]),
    ("compress", ["compress.py", "source=${logs}/distill/latest", "prune=heads_ffn", "prune.amount=0.5",
                  "recover=distill", "recover.epochs=4", "quantize=int8", "export=onnx"]),
    ("predict", ["predict.py", "model=${logs}/compress/latest/pruned_int8", "input=${test}",
                 "output=${logs}/pipeline/predictions.jsonl"]),
]


# --smoke: the same stages on a few batches each (a check that the chain runs, not a model worth keeping)
SMOKE = {"train.py": ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=2",
                      "trainer.limit_test_batches=2"],
         "compress.py": ["recover.epochs=1", "recover.limit_batches=2", "recover.limit_val_batches=2",
                         "importance.limit_batches=2", "eval.limit_batches=2", "latency.repeats=3",
                         "quantize.calibration_batches=2"]}


def log_dir() -> Path:
    return Path(os.environ.get("TUNELAB_LOG_DIR", ROOT / "logs"))


def test_file() -> Path:
    from tunelab.data.embedded import reviews_test

    return reviews_test(ROOT / ".cache")


def command(args: list[str]) -> list[str]:
    values = {"${logs}": str(log_dir()), "${test}": str(test_file())}
    for key, value in values.items():
        args = [a.replace(key, value) for a in args]
    return [sys.executable, str(ROOT / args[0]), *args[1:]]


def run_stages(names: list[str], smoke: bool = False) -> dict[str, float]:
    """Run the stages in order; stop at the first that fails (or whose tool does not exist)."""
    seconds = {}
    for name, args in STAGES:
        if name not in names:
            continue
        if not (ROOT / args[0]).is_file():
            sys.exit(f"pipeline: stage {name} needs {args[0]}, which this checkout does not have; stopping before it")
        print(f"\n=== {name}: {' '.join(args)}", flush=True)
        start = time.perf_counter()
        proc = subprocess.run(command(args) + (SMOKE.get(args[0], []) if smoke else []), cwd=ROOT)
        seconds[name] = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(f"pipeline: stage {name} failed (exit {proc.returncode}); the stages before it are in {log_dir()}")
        print(f"=== {name}: {seconds[name]:.0f} s", flush=True)
    return seconds


# ----------------------------------------------------------------------------- the summary table
def models() -> list[tuple[str, Path]]:
    logs = log_dir()
    found = [("MLM-pretrained, fine-tuned (teacher)", logs / "finetune" / "latest" / "model"),
             ("distilled student", logs / "distill" / "latest" / "model")]
    compressed = logs / "compress" / "latest"
    for folder, name in (("pruned_recovered", "distilled + pruned"), ("onnx_int8", "distilled, ONNX int8"),
                         ("pruned_int8", "distilled + pruned + int8 (ONNX)")):
        if (compressed / folder).is_dir():
            found.append((name, compressed / folder))
    return [(n, f) for n, f in found if f.is_dir()]


def params(net: Any) -> int:
    if hasattr(net, "session"):  # ONNX: the weights stored in the graph
        import onnx
        from onnx import numpy_helper

        graph = onnx.load(str(net.path)).graph
        return int(sum(numpy_helper.to_array(t).size for t in graph.initializer))
    return int(sum(p.numel() for p in net.parameters()))


def weights_mb(folder: Path) -> float:
    files = [*folder.glob("*.safetensors"), *folder.glob("*.onnx"), *folder.glob("*.bin"), *folder.glob("*.pt")]
    return sum(f.stat().st_size for f in files) / 2**20


def measure(folder: Path, texts: list[str], labels: list[str]) -> dict[str, Any]:
    """Parameters, weight size, batch-1 latency (the network alone, and with tokenization), test accuracy."""
    from tunelab import artifacts
    from tunelab.deploy.predictor import Predictor, softmax

    artifact = artifacts.load(folder)
    predictor = Predictor(artifact, "auto", THREADS)
    network, answer = [], []
    for i, text in enumerate(texts[: REPEATS + WARMUP]):
        start = time.perf_counter()
        feeds = predictor.encode([text])
        encoded = time.perf_counter()
        softmax(predictor.run(feeds))
        if i >= WARMUP:  # the first calls warm up allocators and kernels
            network.append(time.perf_counter() - encoded)
            answer.append(time.perf_counter() - start)
    correct = 0
    for i in range(0, len(texts), 64):
        best = predictor.outputs(texts[i:i + 64]).argmax(-1)
        correct += sum(predictor.labels[b] == y for b, y in zip(best, labels[i:i + 64], strict=True))
    return {"params": params(artifact.net), "size_mb": weights_mb(folder),
            "network_ms": 1000 * statistics.median(network), "answer_ms": 1000 * statistics.median(answer),
            "accuracy": correct / len(texts), "backend": predictor.backend}


def summary() -> str:
    import torch

    torch.set_num_threads(THREADS)
    records = [json.loads(line) for line in test_file().read_text().splitlines()]
    texts, labels = [r["text"] for r in records], [r["label"] for r in records]
    rows = [(name, folder, measure(folder, texts, labels)) for name, folder in models()]
    if not rows:
        return "pipeline: no models found (run the stages first)"
    teacher = rows[0][2]
    lines = ["| stage | params | size (MB) | network latency (ms) | speed-up | with tokenization (ms) | speed-up | "
             "test accuracy | backend |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, _, m in rows:
        lines.append(f"| {name} | {m['params'] / 1e6:.2f}M | {m['size_mb']:.1f} | {m['network_ms']:.2f} | "
                     f"{teacher['network_ms'] / m['network_ms']:.1f}x | {m['answer_ms']:.2f} | "
                     f"{teacher['answer_ms'] / m['answer_ms']:.1f}x | {m['accuracy']:.4f} | {m['backend']} |")
    final = rows[-1][2]
    lines.append(f"\nCPU, batch 1, {THREADS} thread, median over {min(REPEATS, len(texts) - WARMUP)} test reviews. Final vs "
                 f"teacher: {teacher['network_ms'] / final['network_ms']:.1f}x lower network latency, "
                 f"{teacher['answer_ms'] / final['answer_ms']:.1f}x with tokenization (target >= 15x); accuracy "
                 f"{100 * (final['accuracy'] - teacher['accuracy']):+.2f} points (target >= -1); test split: "
                 f"{len(texts)} reviews")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--summary", action="store_true", help="only the table, for the models already there")
    parser.add_argument("--stages", default=",".join(n for n, _ in STAGES), help="comma-separated subset")
    parser.add_argument("--smoke", action="store_true", help="a few batches per stage: check that the chain runs")
    args = parser.parse_args()
    seconds = {} if args.summary else run_stages(args.stages.split(","), args.smoke)
    table = summary()
    if seconds:
        table += "\nstage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + \
                 f" (total {sum(seconds.values()) / 60:.1f} min, {os.cpu_count()} CPUs)"
    print("\n" + table)
    out = log_dir() / "pipeline"
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
