"""`python predict.py model=... input=... output=...`: predictions for every row of a file, streamed.

Rows are read, predicted and written a batch at a time, so memory stays flat however long the input is.
Every problem with the command (a model of the wrong kind, an input the model cannot read, an output
inside the model's folder) is found before any row is predicted; a row that cannot be predicted is skipped
into the errors file or stops the run (`on_error`), and either way the output is written to a temporary
file renamed only once the run succeeds, so a failed run leaves existing files as they were.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from itertools import islice
from pathlib import Path
from typing import IO, Any

from omegaconf import DictConfig, OmegaConf

from tunelab import artifacts, checks
from tunelab.deploy.inputs import Fields, Row, check_input, rows
from tunelab.deploy.predictor import BACKENDS, Predictor
from tunelab.errors import TunelabError

CLASSIFIERS = [artifacts.TEXT_CLASSIFIER, artifacts.IMAGE_CLASSIFIER]
RULES = (
    ("backend", checks.choice(*BACKENDS)),
    ("on_error", checks.choice("skip", "fail")),
    ("threads", checks.OPTIONAL_COUNT),
    ("progress", checks.BOOL),
)


def check_rules(cfg: DictConfig, rules: tuple[tuple[str, checks.Rule], ...]) -> None:
    """The config's own keys checked like training's (`checks.DATA` does the `data.*` ones)."""
    checks.check(cfg, checks.DATA)
    for key, rule in rules:
        if (problem := rule.error(key, OmegaConf.select(cfg, key))) is not None:
            raise TunelabError(problem)


def fields(cfg: DictConfig) -> Fields:
    data = cfg.data
    return Fields(data.text_field, data.image_field, data.label_field, data.encoding_errors,
                  data.max_record_bytes, data.max_file_bytes)


# ----------------------------------------------------------------------------- where things go
def model_folder(source: str) -> Path:
    """The model folder behind `model=`; a compression run (folders of variants, no model/) names its variants."""
    try:
        return artifacts.model_dir(source, "model")
    except TunelabError:
        folder = Path(source).expanduser()
        variants = sorted(p.name for p in folder.glob("*/") if (p / artifacts.CARD).is_file()) if folder.is_dir() else []
        if not variants:
            raise
        raise TunelabError(f"model: {folder} is a compression run, not a model folder (expected one of its variants: "
                           f"{', '.join(f'model={folder}/{v}' for v in variants)})") from None


def protected(model: Path) -> Path:
    """What a prediction must never write into: the model folder, or its whole run folder."""
    run = model.parent
    return run if model.name == "model" and (run / "status.json").exists() else model


def check_output(output: str, errors: str | None, model: Path, source: Path) -> tuple[Path, Path]:
    """The output and errors files: JSONL, outside the source artifact and the input, in an existing folder."""
    out = Path(output).expanduser()
    if out.suffix.lower() != ".jsonl":
        raise TunelabError(f"output={out} (expected a .jsonl file for the predictions)")
    err = Path(errors).expanduser() if errors else out.with_name(f"{out.stem}.errors.jsonl")
    guarded = protected(model)
    for key, path in (("output", out), ("errors", err)):
        resolved = path.resolve()
        if resolved.is_relative_to(guarded):
            raise TunelabError(f"{key}={path} is inside the source artifact {guarded} (expected a path outside it; "
                               "a model folder is never written to)")
        if resolved == source.resolve() or (source.is_dir() and resolved.is_relative_to(source.resolve())):
            raise TunelabError(f"{key}={path} would overwrite the input {source} (expected another path)")
        if path.is_dir():
            raise TunelabError(f"{key}={path} is a folder (expected a .jsonl file path)")
    if out.resolve() == err.resolve():
        raise TunelabError(f"errors={err} is the output file (expected another path)")
    return out, err


class AtomicFile:
    """A file written under a temporary name and renamed over `path` only by `commit`."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.tmp = path, path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self.file: IO[str] = open(self.tmp, "w")  # noqa: SIM115 (closed by commit or discard)

    def commit(self) -> None:
        self.file.close()
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- the run
class Scores:
    """The problem's metrics over the labelled rows (torchmetrics, as the training tasks compute them)."""

    def __init__(self, problem: Any) -> None:
        self.problem, self.metrics, self.count = problem, problem.metrics(), 0

    def target(self, row: Row) -> Any:
        """The row's encoded target, or None with `row.error` set when the problem cannot read it."""
        try:
            return self.problem.encode(self.problem.read_target(row.label, row.where), row.where)
        except TunelabError as e:
            row.error = f"{e} (the model's problem is {self.problem.name})"
            return None

    def update(self, outputs: Any, targets: list[Any]) -> None:
        import torch

        if targets:
            preds, target = self.problem.metric_inputs(torch.as_tensor(outputs), torch.as_tensor(targets))
            self.metrics.update(preds, target)
            self.count += len(targets)

    def compute(self) -> dict[str, Any]:
        if not self.count:
            return {}
        return {**{name: float(value) for name, value in self.metrics.compute().items()}, "labelled": self.count}


def batches(source: Iterator[Row], size: int, on_error: str, errors: IO[str], scores: Scores,
            progress: Any, counts: dict[str, int]) -> Iterator[list[tuple[Row, Any]]]:
    """Batches of (row, encoded target or None) that can be predicted; the others go to `errors` (counted), or
    stop the run."""
    while chunk := list(islice(source, size)):
        good = []
        for row in chunk:
            target = scores.target(row) if row.error is None and row.label is not None else None
            if row.error is None:
                good.append((row, target))
                continue
            if on_error == "fail":
                raise TunelabError(f"{row.error} (on_error=fail; set on_error=skip to skip such rows into an "
                                   "errors file)")
            errors.write(json.dumps({"file": row.source, "line": row.line, "error": row.error}) + "\n")
            counts["skipped"] += 1
        progress.update(len(chunk))
        if good:
            yield good


def output_row(row: Row, answer: dict[str, Any]) -> str:
    where = {"line": row.line} if row.line is not None else {"path": row.source}
    target = {"target": row.label} if row.label is not None else {}
    return json.dumps({**where, **answer, **target}) + "\n"


def predict_all(predictor: Predictor, source: Iterator[Row], cfg: DictConfig, out: IO[str], errors: IO[str],
                progress: Any) -> dict[str, Any]:
    scores = Scores(predictor.problem)
    counts = {"predicted": 0, "skipped": 0}
    for batch in batches(source, cfg.data.batch_size, cfg.on_error, errors, scores, progress, counts):
        outputs = predictor.outputs([row.item for row, _ in batch])
        labelled = [i for i, (_, target) in enumerate(batch) if target is not None]
        scores.update(outputs[labelled], [batch[i][1] for i in labelled])
        answers = predictor.describe(outputs)
        out.writelines(output_row(row, answer) for (row, _), answer in zip(batch, answers, strict=True))
        counts["predicted"] += len(batch)
    values = scores.compute()
    return {**counts, **values, "metric_names": [k for k in values if k != "labelled"]}


def run(cfg: DictConfig) -> dict[str, Any]:
    """Predict every row of `cfg.input` with `cfg.model`; returns the summary (also written next to the
    output as `<output>.metrics.json`)."""
    from tqdm import tqdm

    check_rules(cfg, RULES)
    model = model_folder(str(cfg.model))
    artifact = artifacts.load(model, kinds=classifier_kinds(), role="model")
    source = check_input(str(cfg.input), artifact.modality)
    out_path, err_path = check_output(str(cfg.output), cfg.errors, model, source)
    predictor = Predictor(artifact, cfg.backend, cfg.threads)
    stream = rows(source, predictor.modality, fields(cfg))  # reads the first record: a file without the field fails
    start = time.perf_counter()
    with ExitStack() as stack:
        out = AtomicFile(out_path)
        stack.callback(out.discard)
        errors = AtomicFile(err_path)
        stack.callback(errors.discard)
        progress = stack.enter_context(tqdm(desc=f"predict {source.name}", unit=" rows", disable=not cfg.progress,
                                            file=sys.stderr, dynamic_ncols=True))
        summary = predict_all(predictor, stream, cfg, out.file, errors.file, progress)
        stack.pop_all()
        progress.close()
        out.commit()
        errors.commit()
    summary.update(backend=predictor.backend, seconds=round(time.perf_counter() - start, 3),
                   output=str(out_path), errors=str(err_path),
                   peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
    out_path.with_name(f"{out_path.stem}.metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def classifier_kinds() -> list[str]:
    """Classifier kinds predict takes: the two trained ones and any registered variant of them (ONNX...)."""
    return [*CLASSIFIERS, *(k for k in artifacts.LOADERS if k not in CLASSIFIERS and k != artifacts.MASKED_LM)]


def summary_line(summary: dict[str, Any]) -> str:
    named = ", ".join(f"{k} {summary[k]:.4f}" for k in summary.get("metric_names", []))
    scores = f"; {named} on {summary['labelled']} labelled rows" if "labelled" in summary else ""
    return (f"predicted {summary['predicted']} rows ({summary['skipped']} skipped, see {summary['errors']}) "
            f"with {summary['backend']} in {summary['seconds']:.1f} s{scores} -> {summary['output']}")
