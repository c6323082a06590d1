"""The compression report: one row per variant, as Markdown (`report.md`), `metrics.json` and TensorBoard."""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

from tunelab import runs

WEIGHT_FILES = ("*.safetensors", "*.onnx", "*.pt", "*.bin")
COLUMNS = [("variant", "variant", "{}"), ("params", "parameters", "{:,}"), ("size_mb", "size MB", "{:.2f}"),
           ("size_gz_mb", "gzip MB", "{:.2f}"), ("sparsity", "sparsity", "{:.1%}")]
ACCURACY = [("score", "test {metric}", "{:.4f}"), ("agreement", "agreement", "{:.4f}")]


def weight_files(folder: Path) -> list[Path]:
    return sorted(f for pattern in WEIGHT_FILES for f in folder.glob(pattern))


def sizes(folder: Path) -> tuple[float, float]:
    """MB of the weight files on disk, and gzip-compressed (level 6): what zeros from pruning save."""
    raw = packed = 0
    for file in weight_files(folder):
        data = file.read_bytes()
        raw += len(data)
        packed += len(zlib.compress(data, 6))
    return raw / 1e6, packed / 1e6


def latency_columns(batch_sizes: list[int]) -> list[tuple[str, str, str]]:
    cols = []
    for b in batch_sizes:
        cols += [(f"b{b}_p50_ms", f"b{b} p50 ms", "{:.2f}"), (f"b{b}_p95_ms", f"b{b} p95 ms", "{:.2f}"),
                 (f"b{b}_speedup", f"b{b} speed-up", "{:.2f}x")]
    return cols


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The table, then what it was measured with and the notes."""
    columns = COLUMNS + latency_columns(meta["batch_sizes"]) + ACCURACY
    head = "| " + " | ".join(title.format(metric=meta.get("metric", "acc")) for _, title, _ in columns) + " |"
    lines = [head, "|" + " --- |" * len(columns)]
    for row in rows:
        cells = [fmt.format(row[key]) if row.get(key) is not None else "n/a" for key, _, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    notes = "\n".join(f"- {note}" for note in meta.get("notes", []))
    return (f"# Compression of `{meta['source']}`\n\n{chr(10).join(lines)}\n\n"
            f"Latency: CPU, {meta['threads']} thread(s) (torch.set_num_threads and onnxruntime intra-op), "
            f"p50/p95 over {meta['repeats']} calls after {meta['warmup']} warm-up calls, the variants measured in turns, "
            f"on the first records of the "
            f"test split ({meta['shapes']}); speed-up is fp32 p50 / variant p50. {meta.get('metric', 'acc')} on "
            f"{meta['test_records']} test records; agreement with the fp32 model's outputs, as the problem compares "
            f"them (classes: the share of equal predictions).\n\n{notes}\n")


def write(out: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """report.md, metrics.json (rows + meta), and the table as TensorBoard text with one scalar per cell."""
    from torch.utils.tensorboard import SummaryWriter

    text = markdown(rows, meta)
    runs.write_atomic(out / "report.md", text)
    runs.write_atomic(out / "metrics.json", json.dumps({"rows": rows, **meta}, indent=2, default=str))
    writer = SummaryWriter(str(out / "tensorboard"))
    try:
        writer.add_text("compression/report", text)
        for row in rows:
            for key, value in row.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    writer.add_scalar(f"{row['variant']}/{key}", value)
    finally:
        writer.close()
    return text
