"""`make pipeline` end to end on a few batches per stage (`--smoke`): every stage runs from the previous
stage's `latest`, and the summary has a row for each model, the last the distilled, pruned, int8 ONNX one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_the_pipeline_runs_end_to_end_and_ends_with_one_table(tmp_path: Path) -> None:
    env = {**os.environ, "TUNELAB_LOG_DIR": str(tmp_path / "logs")}
    proc = subprocess.run([sys.executable, "-m", "tunelab.pipeline", "--smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    table = (tmp_path / "logs" / "pipeline" / "summary.md").read_text().splitlines()
    rows = [line for line in table if line.startswith("| ") and not line.startswith(("| stage", "| ---"))]
    assert [r.split(" | ")[0] for r in rows] == [
        "| MLM-pretrained, fine-tuned (teacher)", "| distilled student", "| distilled + pruned",
        "| distilled, ONNX int8", "| distilled + pruned + int8 (ONNX)"]
    assert rows[-1].rstrip(" |").endswith("onnxruntime")
    assert (tmp_path / "logs" / "pipeline" / "predictions.jsonl").is_file()
    assert any("Final vs teacher:" in line and "lower network latency" in line for line in table)
