"""Compression: int8, structured pruning with recovery, and ONNX against PyTorch fp32, measured in one run.

Both models are trained here first, so the figures never depend on a stale model: a `bert_mini`
classifier on the embedded reviews and a ResNet-10-T on the digits. Each is then compressed by
`compress.py`'s own run (`tunelab.compress.run`): text with half of the encoder's layers removed (the two
least important of four) and recovered by distillation from the unpruned model; images with half the
channels removed by torch-pruning and recovered by fine-tuning. The text model is also pruned unstructured
(70% of its linear weights zeroed, no recovery) to show what sparsity alone does: nothing to dense CPU
kernels' latency, something to the gzip size of the weights. torchao's int8 (dynamic activations, int8
weights) of the same text model is timed eager and under `torch.compile`, for the record of why it is not
the default. Latency is CPU at one thread (`threads=1`), as ratios to PyTorch fp32 eager measured in the
same run.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from tunelab.config import compose_config

TEXT_TRAIN = ["model=bert_mini", "trainer.max_epochs=3"]
IMAGE_TRAIN = ["data=digits", "model=timm", "model.name=resnet10t", "trainer.max_epochs=8"]
INT8_ONNX = ["quantize=int8", "export=onnx"]
TEXT_COMPRESS = [*INT8_ONNX, "prune=layers", "prune.layers=2", "recover=distill", "recover.epochs=1",
                 "recover.limit_batches=200", "recover.lr=3e-4"]
UNSTRUCTURED = ["prune=unstructured", "prune.amount=0.7", "quantize=none", "export=none"]
IMAGE_COMPRESS = [*INT8_ONNX, "prune=channels", "prune.amount=0.5", "recover=finetune", "recover.epochs=4",
                  "recover.lr=1e-3"]
QUIET = ["logger=none", "callbacks=none", "trainer.enable_progress_bar=false"]
COMMON = ["threads=1", "latency.repeats=50", "latency.warmup=5"]


def train(overrides: list[str], logs: Path, name: str) -> Path:
    from tunelab.train import run

    out = logs / "finetune" / "runs" / name
    run(compose_config([*overrides, *QUIET], out, logs))
    return out


def compress(source: Path, overrides: list[str], logs: Path, name: str) -> dict[str, Any]:
    from tunelab.compress.config import compose
    from tunelab.compress.run import run

    out = logs / "compress" / "runs" / name
    result = run(compose([f"source={source}", *COMMON, *overrides], out, logs))
    print((out / "report.md").read_text(), flush=True)
    return result


def best(rows: dict[str, dict], names: list[str], key: str) -> dict:
    found = [rows[n] for n in names if n in rows]
    return max(found, key=lambda r: r[key])


def summary(result: dict[str, Any], label: str) -> dict[str, float]:
    """The issue's ratios: speed-ups over PyTorch fp32 eager and accuracy loss in points."""
    rows = {r["variant"]: r for r in result["rows"]}
    fp32 = rows["fp32"]
    loss = lambda r: 100 * (fp32["score"] - r["score"])  # noqa: E731
    int8 = best(rows, ["int8 (torch)", "ONNX int8"], "b1_speedup")
    picks = {"int8": int8, "pruned+recovered": rows.get("pruned+recovered"),
             "pruned+int8": rows.get("pruned+int8 (ONNX)"), "ONNX fp32": rows.get("ONNX fp32")}
    out: dict[str, float] = {}
    for name, row in picks.items():
        if row is None:
            continue
        print(f"compress  {label:<22} {name:<17} ({row['variant']}) speed-up b1 {row['b1_speedup']:.2f}x  "
              f"b32 {row['b32_speedup']:.2f}x  acc {row['score']:.4f} vs fp32 {fp32['score']:.4f} "
              f"({loss(row):+.2f} points lost)  size {row['size_mb']:.2f} MB vs {fp32['size_mb']:.2f} MB", flush=True)
        out.update({f"{label}/{name}/b1": row["b1_speedup"], f"{label}/{name}/b32": row["b32_speedup"],
                    f"{label}/{name}/points_lost": loss(row)})
    onnx_fp32 = rows.get("ONNX fp32")
    if onnx_fp32:  # int8 against the other fp32 backend too, not only PyTorch eager
        ratios = {b: onnx_fp32[f"b{b}_p50_ms"] / int8[f"b{b}_p50_ms"] for b in (1, 32)}
        print(f"compress  {label:<22} int8 vs ONNX fp32  speed-up b1 {ratios[1]:.2f}x  b32 {ratios[32]:.2f}x", flush=True)
        out.update({f"{label}/int8_vs_onnx_fp32/b{b}": r for b, r in ratios.items()})
    return out


def sparsity_summary(result: dict[str, Any], label: str) -> dict[str, float]:
    """Unstructured pruning: latency and sizes of the sparse model against the dense one (same shapes)."""
    rows = {r["variant"]: r for r in result["rows"]}
    fp32, sparse = rows["fp32"], rows["pruned"]
    b1, b32, gzip = sparse["b1_speedup"], sparse["b32_speedup"], fp32["size_gz_mb"] / sparse["size_gz_mb"]
    print(f"compress  {label:<22} unstructured {sparse['sparsity']:.0%} sparse: speed-up b1 {b1:.2f}x  b32 {b32:.2f}x  "
          f"size {sparse['size_mb']:.2f} MB vs {fp32['size_mb']:.2f} MB, gzip {sparse['size_gz_mb']:.2f} MB vs "
          f"{fp32['size_gz_mb']:.2f} MB ({gzip:.2f}x smaller)  acc {sparse['score']:.4f} vs {fp32['score']:.4f}", flush=True)
    return {f"{label}/unstructured/b1": b1, f"{label}/unstructured/b32": b32, f"{label}/unstructured/gzip_ratio": gzip}


def torchao_int8(source: Path, repeats: int = 30) -> dict[str, float]:
    """torchao int8 (dynamic int8 activations, int8 weights) against fp32 eager: eager and compiled, batch 1 and 32."""
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError:
        print("compress  torchao: not installed, not measured", flush=True)
        return {}
    import time

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tunelab import latency
    from tunelab.data.embedded import reviews_test

    folder = source / "model"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    fp32 = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    int8 = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    quantize_(int8, Int8DynamicActivationInt8WeightConfig())
    compiled = torch.compile(int8)
    records = [json.loads(line) for line in reviews_test().open()]
    out: dict[str, float] = {}
    with latency.threads(1), torch.inference_mode():
        for b in (1, 32):
            batch = dict(tokenizer([r["text"] for r in records[:b]], padding=True, return_tensors="pt"))
            start = time.perf_counter()
            compiled(**batch)
            compile_s = time.perf_counter() - start
            (base, _), (eager, _), (comp, _) = latency.interleaved(
                [lambda: fp32(**batch), lambda: int8(**batch), lambda: compiled(**batch)], repeats)  # noqa: B023
            agree = float((fp32(**batch).logits.argmax(-1) == compiled(**batch).logits.argmax(-1)).float().mean())
            print(f"compress  torchao int8 b{b}: fp32 eager {base:.2f} ms, int8 eager {eager:.2f} ms ({base / eager:.2f}x), "
                  f"int8 compiled {comp:.2f} ms ({base / comp:.2f}x; first call {compile_s:.1f} s), "
                  f"agreement {agree:.3f}", flush=True)
            out.update({f"torchao/eager/b{b}": base / eager, f"torchao/compiled/b{b}": base / comp,
                        f"torchao/compile_s/b{b}": compile_s})
    return out


def main() -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        logs = Path(tmp) / "logs"
        text_model = train(TEXT_TRAIN, logs, "reviews_bert_mini")
        text = compress(text_model, TEXT_COMPRESS, logs, "reviews")
        sparse = compress(text_model, UNSTRUCTURED, logs, "reviews_unstructured")
        ao = torchao_int8(text_model)
        image = compress(train(IMAGE_TRAIN, logs, "digits_resnet10t"), IMAGE_COMPRESS, logs, "digits")
    results = {**summary(text, "reviews bert_mini"), **sparsity_summary(sparse, "reviews bert_mini"), **ao,
               **summary(image, "digits resnet10t")}
    print("compress  targets: int8 >= 3x (b1), >= 2x (b32), <= 1 point; pruned+recovered >= 1.8x, <= 2 points; "
          "pruned+int8 >= 5x; ONNX fp32 >= 1.2x at b1", flush=True)
    print(json.dumps(results), flush=True)
    return results


if __name__ == "__main__":
    main()
