"""Masked-LM pretraining: `task=mlm` against the Hugging Face reference recipe, and data-preparation memory.

(a) Training tokens/s of `task=mlm` (Trainer + MLMTask + packed TextDataModule + MaskingCollator) and of
the reference recipe: the same `BertForMaskedLM` (hidden 256, 4 layers, 4 heads, vocabulary 30522,
blocks of 128 tokens from the same packed data), `DataCollatorForLanguageModeling`, full-vocabulary
logits and loss, in a plain PyTorch loop. Each measurement runs in a fresh process, the two sides
alternating, so each reports its own peak memory (resident set growth during training on CPU).

(b) Peak resident memory of data preparation (read, train the tokenizer, tokenize, pack) for the
unlabelled reviews and for a 10x larger corpus made from them (sentences reshuffled, so no document
repeats), each in a fresh process with an empty cache.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate

from tunelab.bench.common import WindowTimer, median_ratio, timed_loop
from tunelab.config import compose_config
from tunelab.train import assemble, check_config, prepared_data

VOCAB = 30522  # bert-base-uncased's vocabulary size
OVERRIDES = ["task=mlm", "model=bert_mini", f"+model.vocab_size={VOCAB}", "data.batch_size=32",
             "callbacks.progress_bar=null"]
WARMUP, STEPS, REPEATS = 3, 12, 3
GROWTH = 10


# ----------------------------------------------------------------------------- memory
def reset_peak() -> None:
    """Restart the kernel's resident high-water mark (Linux); elsewhere the peak covers the whole process."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def rss_mb(field: str) -> float:
    """VmRSS (now), VmHWM (peak since `reset_peak`) or RssAnon (now, without mapped files) in MB;
    ru_maxrss where /proc is missing."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(rf"{field}:\s+(\d+)", status).group(1)) / 1024
    except OSError:
        import resource

        scale = 1 if sys.platform != "darwin" else 1 / 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1024


# ----------------------------------------------------------------------------- (a) training throughput
def _cycle(loader):
    while True:
        yield from loader


def tunelab_rate(cfg, datamodule, precision: str) -> float:
    timer = WindowTimer(WARMUP)
    built = assemble(cfg, datamodule, [timer], max_steps=WARMUP + STEPS, precision=precision, limit_val_batches=0,
                     enable_progress_bar=False, enable_model_summary=False)
    built.trainer.fit(built.task, datamodule=datamodule)
    return STEPS * datamodule.batch_size * datamodule.max_length / (timer.end - timer.start)


def reference_rate(cfg, datamodule, precision: str) -> float:
    """The Hugging Face recipe (run_mlm.py's model, collator and loss) in a plain loop; under bf16-mixed,
    CPU autocast to bfloat16 as the Hugging Face Trainer's `--bf16` does."""
    from torch.utils.data import DataLoader
    from transformers import BertConfig, BertForMaskedLM, DataCollatorForLanguageModeling

    m = cfg.model
    config = BertConfig(vocab_size=VOCAB, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
                        num_attention_heads=m.num_heads, intermediate_size=m.intermediate_size,
                        max_position_embeddings=m.max_position_embeddings, hidden_dropout_prob=m.dropout,
                        attention_probs_dropout_prob=m.dropout, pad_token_id=datamodule.tokenizer.pad_token_id)
    model = BertForMaskedLM(config).train()
    collator = DataCollatorForLanguageModeling(datamodule.tokenizer, mlm_probability=0.15)
    loader = DataLoader(datamodule.datasets["train"].with_format(None), batch_size=datamodule.batch_size,
                        shuffle=True, collate_fn=collator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay)
    scheduler = instantiate(cfg.scheduler)(optimizer=optimizer, num_training_steps=WARMUP + STEPS)

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed")

    def step(batch: dict) -> None:
        with autocast:
            loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()

    seconds = timed_loop(_cycle(loader), step, WARMUP, STEPS)
    return STEPS * datamodule.batch_size * datamodule.max_length / seconds


def measure_training(side: str, precision: str) -> dict:
    """One side, in this (fresh) process: tokens/s and the resident memory training adds."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config(OVERRIDES, Path(tmp) / "run")
        check_config(cfg)
        datamodule = prepared_data(cfg)
        L.seed_everything(0)
        reset_peak()
        before = rss_mb("VmRSS")
        rate = (tunelab_rate if side == "tunelab" else reference_rate)(cfg, datamodule, precision)
        return {"tokens_per_s": rate, "peak_mb": rss_mb("VmHWM") - before}


# ----------------------------------------------------------------------------- (b) data preparation memory
class AnonPeak(threading.Thread):
    """Samples RssAnon: the process's own memory, without the pages of memory-mapped Arrow files that the
    resident high-water mark also counts (the kernel drops those whenever it needs the room)."""

    def __init__(self, every_s: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.every_s, self.peak, self.done = every_s, 0.0, threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, rss_mb("RssAnon"))
            time.sleep(self.every_s)

    def stop(self) -> float:
        self.done.set()
        self.join()
        return max(self.peak, rss_mb("RssAnon"))


def measure_prep(corpus: str, cache_dir: str) -> dict:
    """Peak memory of preparing `corpus` from an empty cache, and the imports' baseline before it."""
    from tunelab.data.text import TextDataModule

    reset_peak()
    base, base_anon = rss_mb("VmRSS"), rss_mb("RssAnon")
    sampler = AnonPeak()
    sampler.start()
    datamodule = TextDataModule(corpus, label_field=None, pack=True, val_fraction=0.02, test_fraction=0.02,
                                cache_dir=cache_dir)
    datamodule.setup("fit")
    return {"peak_mb": rss_mb("VmHWM"), "base_mb": base, "anon_peak_mb": sampler.stop(), "anon_base_mb": base_anon,
            "blocks": len(datamodule.datasets["train"])}


def grow_corpus(source: Path, target: Path, times: int) -> None:
    """`times` copies of `source`, each review's sentences reshuffled (seeded), streamed line by line."""
    rng = np.random.default_rng(0)
    with open(target, "w", encoding="utf-8") as out:
        for _ in range(times):
            with open(source, encoding="utf-8") as f:
                for line in f:
                    sentences = [s.strip() for s in line.strip().split(". ") if s.strip()]
                    rng.shuffle(sentences)
                    out.write(". ".join(sentences).rstrip(".") + ".\n")


# ----------------------------------------------------------------------------- driver
def in_child(*args: str) -> dict:
    """Run `python -m tunelab.bench.mlm <args>` and read the JSON line it prints last."""
    proc = subprocess.run([sys.executable, "-m", "tunelab.bench.mlm", *args], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def training(precision: str) -> dict[str, float]:
    """Both sides at the same precision: `32-true`, or `bf16-mixed` (CPU autocast; fast where the CPU has
    bfloat16 instructions, e.g. AVX512-BF16 or AMX)."""
    runs: dict[str, list[dict]] = {"tunelab": [], "reference": []}
    for i in range(REPEATS):
        for side in (("tunelab", "reference") if i % 2 == 0 else ("reference", "tunelab")):
            runs[side].append(in_child("train", side, precision))
    pairs = [(a["tokens_per_s"], b["tokens_per_s"]) for a, b in zip(runs["tunelab"], runs["reference"], strict=True)]
    ours, ref, ratio = median_ratio(pairs)
    mem = {side: float(np.median([r["peak_mb"] for r in rs])) for side, rs in runs.items()}
    print(f"mlm  bert_mini(256x4, vocab {VOCAB}, len 128)/reviews {precision:>10}  tunelab {ours:8.0f} tokens/s "
          f"(peak +{mem['tunelab']:.0f} MB)  HF reference {ref:8.0f} tokens/s (peak +{mem['reference']:.0f} MB)  "
          f"ratio {ratio:.2f}x (target >= 3x)", flush=True)
    return {f"{precision}/{key}": value for key, value in {
        "tunelab": ours, "reference": ref, "ratio": ratio, "tunelab_mb": mem["tunelab"],
        "reference_mb": mem["reference"]}.items()}


def data_prep() -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        data = instantiate(compose_config(["task=mlm"], Path(tmp) / "run").data)
        data.prepare_data()  # the embedded reviews, generated unless there
        source = Path(data.files["train"])
        big = Path(tmp) / "unlabelled_x10.txt"
        grow_corpus(source, big, GROWTH)
        small_run = in_child("prep", str(source), str(Path(tmp) / "cache_small"))
        big_run = in_child("prep", str(big), str(Path(tmp) / "cache_big"))
    total = big_run["peak_mb"] / small_run["peak_mb"]
    anon = big_run["anon_peak_mb"] / small_run["anon_peak_mb"]
    added = [run["anon_peak_mb"] - run["anon_base_mb"] for run in (small_run, big_run)]
    print(f"mlm  data prep (tokenizer + tokenize + pack)  {small_run['blocks']} blocks: peak RSS "
          f"{small_run['peak_mb']:.0f} MB  {GROWTH}x corpus, {big_run['blocks']} blocks: {big_run['peak_mb']:.0f} MB  "
          f"growth {total:.2f}x (target <= 1.2x)  without mapped files: {small_run['anon_peak_mb']:.0f} -> "
          f"{big_run['anon_peak_mb']:.0f} MB, {anon:.2f}x (+{added[0]:.0f} -> +{added[1]:.0f} MB over the imports)",
          flush=True)
    return {"small_mb": small_run["peak_mb"], "big_mb": big_run["peak_mb"], "growth": total, "anon_growth": anon}


def main() -> dict[str, float]:
    return {**training("32-true"), **training("bf16-mixed"), **data_prep()}


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "train":
        print(json.dumps(measure_training(sys.argv[2], sys.argv[3])))
    elif len(sys.argv) > 1 and sys.argv[1] == "prep":
        print(json.dumps(measure_prep(sys.argv[2], sys.argv[3])))
    else:
        main()
