"""One table for a whole sweep: a metric's mean ± std over seeds, one row per option, one column per setting.

`SweepSummary` is a Hydra callback (`hydra.callbacks`, see conf/experiment/reviews_fewshot.yaml): when the
multirun ends it reads every job's `metrics.json` and `.hydra/overrides.yaml` in the sweep folder and writes
`summary.md` (the tables) and `summary.json` (every job's values) there. Rows and columns are override keys
(`fewshot_method`, `data.limit_train_per_class`); the seeds are whatever else varies. With
`keep_checkpoints: false` each finished job's `checkpoints/` is removed (a study of a hundred runs would
otherwise keep gigabytes of weights it never reads again; `model/` and `metrics.json` stay).
"""

from __future__ import annotations

import json
import shutil
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class SweepSummary(Callback):
    def __init__(self, rows: str, columns: str, metric: str = "test/acc", extra: list[str] | None = None,
                 keep_checkpoints: bool = True) -> None:
        self.rows, self.columns, self.metric = rows, columns, metric
        self.extra = list(extra or [])
        self.keep_checkpoints = keep_checkpoints

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if not self.keep_checkpoints:
            shutil.rmtree(Path(config.hydra.runtime.output_dir) / "checkpoints", ignore_errors=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        write(Path(config.hydra.sweep.dir), self.rows, self.columns, self.metric, self.extra)


def jobs(sweep: Path) -> list[dict[str, Any]]:
    """Each finished job's overrides, metrics and model file sizes."""
    found = []
    for metrics_file in sorted(sweep.glob("*/metrics.json")):
        job = metrics_file.parent
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []
        values = dict(o.lstrip("+~").split("=", 1) for o in overrides if "=" in o)
        sizes = {name: (job / "model" / path).stat().st_size for name, path in
                 (("model_bytes", "model.safetensors"), ("adapter_bytes", "adapter/adapter_model.safetensors"))
                 if (job / "model" / path).is_file()}
        found.append({"job": job.name, "overrides": values, **sizes,
                      "metrics": json.loads(metrics_file.read_text())["metrics"]})
    return found


def _order(values: set[str]) -> list[str]:
    return sorted(values, key=lambda v: (not v.lstrip("-").isdigit(), int(v) if v.lstrip("-").isdigit() else 0, v))


def table(found: list[dict], rows: str, columns: str, value: Any, scale: float = 100.0) -> str:
    """A markdown table of `value(job)`'s mean ± std (and count) per row and column."""
    cells: dict[tuple[str, str], list[float]] = defaultdict(list)
    for job in found:
        v = value(job)
        if v is not None:
            cells[job["overrides"].get(rows, "?"), job["overrides"].get(columns, "?")].append(float(v) * scale)
    row_names = _order({r for r, _ in cells})
    col_names = _order({c for _, c in cells})
    lines = [f"| {rows} \\ {columns} | " + " | ".join(col_names) + " |", "| --- |" + " --- |" * len(col_names)]
    for r in row_names:
        shown = []
        for c in col_names:
            xs = cells.get((r, c), [])
            std = statistics.stdev(xs) if len(xs) > 1 else 0.0
            shown.append(f"{statistics.mean(xs):.1f} ± {std:.1f} (n={len(xs)})" if xs else "")
        lines.append(f"| {r} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def write(sweep: Path, rows: str, columns: str, metric: str = "test/acc", extra: list[str] | None = None) -> str:
    """summary.md and summary.json in `sweep`; returns the markdown."""
    found = jobs(sweep)
    parts = [f"# {sweep.name}: {metric} (%), mean ± std over seeds\n",
             table(found, rows, columns, lambda j: j["metrics"].get(metric))]
    for key in extra or []:
        parts += [f"\n## {key}\n", table(found, rows, columns, lambda j, key=key: j["metrics"].get(key), scale=1.0)]
    parts += ["\n## adapter file / full model file (%)\n",
              table(found, rows, columns, lambda j: j["adapter_bytes"] / j["model_bytes"] if "adapter_bytes" in j
                    else None)]
    text = "\n".join(parts) + "\n"
    (sweep / "summary.md").write_text(text)
    (sweep / "summary.json").write_text(json.dumps(found, indent=2, sort_keys=True))
    return text


if __name__ == "__main__":  # python -m tunelab.sweep_summary <sweep folder> [rows columns]: rewrite the tables
    import sys

    args = sys.argv[1:]
    print(write(Path(args[0]), *(args[1:3] or ["fewshot_method", "data.limit_train_per_class"])))
