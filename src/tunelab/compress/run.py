"""One compression run, top to bottom: source `model/` folder -> variants -> measured report.

Every variant is written to its own folder of the run (`pruned/`, `pruned_recovered/`, `int8/`,
`onnx_fp32/`, `onnx_int8/`, `pruned_int8/`) through the artifacts module, loaded back from there, and
measured as loaded: parameters, size on disk (and gzip-compressed), sparsity, CPU latency p50/p95 at each
batch size at a stated thread count, test accuracy and agreement with the fp32 model. The source folder is
only read.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from tunelab import artifacts, latency, runs
from tunelab.artifacts import onnx as onnx_kind
from tunelab.artifacts import pruned as pruned_kind
from tunelab.artifacts import quantized as int8_kind
from tunelab.artifacts.kinds import IMAGE_CLASSIFIER, PRUNED, TEXT_CLASSIFIER
from tunelab.compress import data, onnx_export, quantize, report, structured, unstructured, vision
from tunelab.compress.checks import check_source, check_values
from tunelab.compress.recover import recover
from tunelab.config import check_required
from tunelab.contracts import INPUT_IDS, PIXEL_VALUES

log = logging.getLogger("tunelab")
COMPRESSIBLE = [TEXT_CLASSIFIER, IMAGE_CLASSIFIER, PRUNED]


@dataclass
class Variant:
    name: str
    net: Any  # a torch network or an OnnxNet, as loaded from `folder`
    folder: Path
    params: int
    sparsity: float


def run(cfg: DictConfig) -> dict[str, Any]:
    """Check everything, then compress `cfg.source` into the run folder; returns metrics.json's content."""
    check_required(cfg)
    check_values(cfg)
    source = artifacts.load(cfg.source, kinds=COMPRESSIBLE, role="source")
    check_source(cfg, source)
    node = data.data_node(cfg.get("data"), source)
    out = Path(cfg.paths.output_dir)
    runs.claim(out, None)
    try:
        datamodule = data.prepared(node, source)
        variants, notes = make_variants(cfg, source, datamodule, node, out)
        rows, meta = measure_all(cfg, variants, datamodule, notes, source.problem)
        text = report.write(out, rows, meta)
        runs.finish(out)
        runs.point_latest(out, Path(cfg.paths.log_dir) / cfg.task_name / "latest")
    finally:
        runs.release(out)
    log.info("compression report:\n%s", text)
    return {"rows": rows, **meta}


def count(net: Any) -> int:
    return sum(p.numel() for p in net.parameters())


def loaded(name: str, folder: Path, params: int | None = None, sparsity: float | None = None) -> Variant:
    """A variant as read back from its folder (what is measured is what was saved)."""
    net = artifacts.load(folder).net.eval()
    torch_net = hasattr(net, "parameters") and not isinstance(net, onnx_kind.OnnxNet)
    return Variant(name, net, folder, params if params is not None else count(net),
                   sparsity if sparsity is not None else (unstructured.sparsity(net) if torch_net else 0.0))


# ----------------------------------------------------------------------------- making the variants
def make_variants(cfg: DictConfig, source: Any, datamodule: Any, node: dict, out: Path) -> tuple[list[Variant], list]:
    notes: list[str] = []
    fp32 = Variant("fp32", source.net.eval(), Path(source.source), count(source.net),
                   unstructured.sparsity(source.net))
    variants, best = [fp32], fp32
    if cfg.prune.method != "none":
        best = prune_variant(cfg, source, datamodule, node, out, notes)
        variants.append(best)
        if cfg.recover.method != "none":
            model = recover(cfg.recover, best.folder, source, datamodule, node, out / "recover", cfg.paths.log_dir,
                            cfg.seed)
            best = loaded("pruned+recovered", save_pruned(cfg, out / "pruned_recovered", model, source, "recover"))
            variants.append(best)
    if cfg.quantize.method == "int8" and source.modality == "text":
        folder = int8_kind.save(out / "int8", quantize.torch_dynamic(source.net), source,
                                {"method": "torch.ao dynamic int8", "modules": "Linear"})
        variants.append(loaded("int8 (torch)", folder, fp32.params, fp32.sparsity))
    elif cfg.quantize.method == "int8":
        notes.append("PyTorch dynamic int8 covers nn.Linear only, i.e. nothing but the classifier of a CNN: "
                     "the image model's int8 is onnxruntime static QDQ.")
    if cfg.export.format == "onnx":
        variants += onnx_variants(cfg, source, fp32, datamodule, out, False, notes)
        if best is not fp32 and cfg.quantize.method == "int8":
            variants += onnx_variants(cfg, artifacts.load(best.folder), best, datamodule, out, True, notes)
    elif best is not fp32 and cfg.quantize.method == "int8" and source.modality == "text":
        pruned = artifacts.load(best.folder)
        folder = int8_kind.save(out / "pruned_int8", quantize.torch_dynamic(pruned.net), pruned,
                                {"method": "torch.ao dynamic int8", "modules": "Linear"})
        variants.append(loaded("pruned+int8 (torch)", folder, best.params, best.sparsity))
    return variants, notes


def prune_variant(cfg: DictConfig, source: Any, datamodule: Any, node: dict, out: Path, notes: list) -> Variant:
    method, amount = cfg.prune.method, float(cfg.prune.amount)
    if method == "unstructured":
        model = unstructured.prune_global(source.net, amount)
        notes.append(f"unstructured: {amount:.0%} of linear/conv weights zeroed (global magnitude); the dense "
                     "kernels do the same work, so only the gzip size moves.")
    elif method == "channels":
        example = data.first_batch(datamodule, 1)["pixel_values"]
        model = vision.prune_channels(source.net, example, amount)
        notes.append(f"image: structured channel pruning (torch-pruning, L2 group magnitude), {amount:.0%} of "
                     "the channels of every prunable group.")
    else:
        model = structured_pruning(cfg, source, datamodule, node, out)
        notes.append(f"heads/FFN: {cfg.prune.heads:.0%} of heads (gradient importance, ranked across layers), "
                     f"{cfg.prune.ffn:.0%} of each layer's FFN neurons, {cfg.prune.layers} layer(s), "
                     f"{cfg.prune.iterations} iteration(s); importance on {cfg.importance.limit_batches} "
                     "validation batches.")
    return loaded("pruned", save_pruned(cfg, out / "pruned", model, source, "prune"))


def structured_pruning(cfg: DictConfig, source: Any, datamodule: Any, node: dict, out: Path) -> Any:
    p = cfg.prune

    def between(model: Any, k: int) -> Any:  # iterative schedule: recover after each round but the last
        if cfg.recover.method == "none":
            return model
        folder = save_pruned(cfg, out / f"iteration_{k}", model, source, f"iteration {k}")
        return recover(cfg.recover, folder, source, datamodule, node, out / f"recover_{k}", cfg.paths.log_dir,
                       cfg.seed)

    model, plans = structured.prune(source.net, lambda: data.batches(datamodule, "val", cfg.importance.limit_batches),
                                    float(p.heads), float(p.ffn), int(p.layers), int(p.iterations),
                                    p.get("remove_heads"), between, source.problem.loss)
    return model


def save_pruned(cfg: DictConfig, folder: Path, model: Any, source: Any, step: str) -> Path:
    compression = {"method": cfg.prune.method, "amount": cfg.prune.amount, "step": step,
                   "recover": cfg.recover.method if step != "prune" else None}
    if cfg.prune.method == "unstructured":  # same shapes: the source's own kind and format
        text = source.preprocessing.get("text") or {}
        card = {"task": "compress", "compression": compression,
                "parents": [artifacts.parent("source", source.source)]}
        return artifacts.save(folder, model, labels=source.labels, tokenizer=source.tokenizer,
                              data_config=source.preprocessing.get("image"), max_length=text.get("max_length"),
                              card=card)
    return pruned_kind.save(folder, model, source, compression)


def onnx_variants(cfg: DictConfig, source: Any, base: Variant, datamodule: Any, out: Path, pruned: bool,
                  notes: list) -> list[Variant]:
    """ONNX fp32 (checked against PyTorch at every latency shape; a row for the unpruned model) and, with
    quantize=int8, ONNX int8 (`onnx_int8/`, or `pruned_int8/` for the pruned model)."""
    shapes = [data.first_batch(datamodule, b) for b in cfg.latency.batch_sizes]
    found: list[Variant] = []
    name = "pruned ONNX fp32" if pruned else "ONNX fp32"
    with tempfile.TemporaryDirectory(dir=out) as work:
        graph = onnx_export.export(source.net, Path(work) / "fp32.onnx", shapes[-1], cfg.export.opset)
        worst = onnx_export.max_difference(base.net, onnx_kind.OnnxNet(graph, threads=cfg.threads), shapes)
        notes.append(f"{name}: max |logit difference| to PyTorch {worst:.2e} at shapes "
                     f"{', '.join(shape(s) for s in shapes)} (export.tolerance {cfg.export.tolerance}).")
        if worst > cfg.export.tolerance:
            raise RuntimeError(f"{name} differs from PyTorch by {worst:.2e} > export.tolerance={cfg.export.tolerance}")
        if not pruned:
            folder = onnx_kind.save(out / "onnx_fp32", graph, source, {"precision": "fp32",
                                                                       "exporter": "torch.onnx dynamo"})
            found.append(loaded(name, folder, base.params, base.sparsity))
        if cfg.quantize.method == "int8":
            found.append(onnx_int8(cfg, source, base, graph, datamodule, out, pruned, notes))
    return found


def onnx_int8(cfg: DictConfig, source: Any, base: Variant, graph: Path, datamodule: Any, out: Path, pruned: bool,
              notes: list) -> Variant:
    how = cfg.quantize.onnx if cfg.quantize.onnx != "auto" else ("static" if source.modality == "image" else "dynamic")
    target = graph.with_name("int8.onnx")
    if how == "static":
        calibration: Iterable[dict] = data.batches(datamodule, "train", cfg.quantize.calibration_batches)
        quantize.onnx_static(graph, target, calibration, onnx_kind.OnnxNet(graph).input_names)
        notes.append(f"{'pruned ' if pruned else ''}int8: onnxruntime static QDQ, per-channel int8 weights, uint8 "
                     f"activations calibrated (min/max) on {cfg.quantize.calibration_batches} training batches.")
    else:
        quantize.onnx_dynamic(graph, target)
    folder = onnx_kind.save(out / ("pruned_int8" if pruned else "onnx_int8"), target, source,
                            {"precision": "int8", "quantization": f"onnxruntime {how}"})
    return loaded("pruned+int8 (ONNX)" if pruned else "ONNX int8", folder, base.params, base.sparsity)


# ----------------------------------------------------------------------------- measuring them
def measure_all(cfg: DictConfig, variants: list[Variant], datamodule: Any, notes: list,
                problem: Any) -> tuple[list, dict]:
    """Each variant's monitored test metric (the problem's), its agreement with the first (fp32), sizes and
    latencies."""
    shapes = {b: data.first_batch(datamodule, b) for b in cfg.latency.batch_sizes}
    rows: list[dict[str, Any]] = []
    reference = None
    with latency.threads(cfg.threads):
        nets = [v.net.with_threads(cfg.threads) if isinstance(v.net, onnx_kind.OnnxNet) else v.net for v in variants]
        for v, net in zip(variants, nets, strict=True):
            outputs, targets = data.predict(net, datamodule, cfg.eval.limit_batches)
            reference = outputs if reference is None else reference
            size, packed = report.sizes(v.folder)
            rows.append({"variant": v.name, "folder": str(v.folder), "params": v.params, "size_mb": size,
                         "size_gz_mb": packed, "sparsity": v.sparsity,
                         "score": data.score(problem, outputs, targets),
                         "agreement": problem.agreement(outputs, reference)})
        for b, batch in shapes.items():  # every variant in turn, so load changes hit them alike
            with torch.inference_mode():
                calls = [lambda net=net, batch=batch: net(batch) for net in nets]
                timings = latency.interleaved(calls, cfg.latency.repeats, cfg.latency.warmup)
            for row, (p50, p95) in zip(rows, timings, strict=True):
                row.update({f"b{b}_p50_ms": p50, f"b{b}_p95_ms": p95, f"b{b}_speedup": timings[0][0] / p50})
    for row in rows:
        log.info("measured %s", row)
    meta = {"source": str(variants[0].folder), "metric": problem.monitor, "threads": cfg.threads, "batch_sizes": list(cfg.latency.batch_sizes),
            "repeats": cfg.latency.repeats, "warmup": cfg.latency.warmup, "test_records": int(len(reference)),
            "shapes": ", ".join(shape(s) for s in shapes.values()),
            "notes": [*notes, quantize.torchao_note()],
            "versions": {p: _version(p) for p in ("torch", "onnxruntime", "onnx", "transformers", "torch-pruning")}}
    return rows, meta


def shape(batch: dict[str, torch.Tensor]) -> str:
    """`batch 32 × 128 tokens` or `batch 32 × 3×32×32`."""
    if INPUT_IDS in batch:
        return f"batch {batch[INPUT_IDS].shape[0]} × {batch[INPUT_IDS].shape[1]} tokens"
    return f"batch {batch[PIXEL_VALUES].shape[0]} × {'×'.join(map(str, batch[PIXEL_VALUES].shape[1:]))}"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
