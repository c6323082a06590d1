"""Load test of `serve.py` on loopback: dynamic batching against batching off and a bare onnxruntime loop.

The model is an ONNX int8 reviews classifier: an untrained MODEL-sized classifier on the reviews tokenizer,
exported and quantized here (timing needs its cost, not its accuracy, and the figures must not depend on what
`logs/` holds), or the folder given as `python -m tunelab.bench.serve <folder>` (e.g.
`logs/compress/latest/onnx_int8`). CLIENTS concurrent clients send REQUESTS single-text requests each, ROUNDS
times; the server runs with batching (max_batch_size=CLIENTS) and then without (max_batch_size=1), each in a
fresh process; the bare loop runs the same texts through the same predictor in batches of CLIENTS, and one at
a time. The inference worker and the bare loop use THREADS onnxruntime threads, so the ratios compare like
with like.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CLIENTS, REQUESTS, THREADS = 16, 50, 1
ROUNDS = 5  # each load (and bare loop) runs this many times; a round takes about a second, so the median is reported
MODEL = "bert_mini"  # the size `make bench`'s compression part fine-tunes and quantizes
TIMEOUTS = (0.0, 0.005)  # batch_timeout: 0 takes what is queued without waiting
ROOT = Path(__file__).resolve().parents[3]


def model_folder(work: Path) -> Path:
    """An ONNX int8 folder made here from an untrained MODEL-sized classifier."""
    import torch

    from tunelab import artifacts
    from tunelab.artifacts import onnx as onnx_kind
    from tunelab.compress import onnx_export, quantize
    from tunelab.config import build as instantiate
    from tunelab.config import compose_config

    cfg = compose_config([f"model={MODEL}", "trainer.enable_progress_bar=false"], work / "run")
    dm = instantiate(cfg.data)
    dm.setup("fit")
    torch.manual_seed(0)
    net = instantiate(cfg.model)("classifier", dm.labels, dm.tokenizer)
    source = artifacts.load(artifacts.save(work / "fp32", net, labels=dm.labels, tokenizer=dm.tokenizer,
                                           max_length=cfg.data.max_length))
    example = next(iter(dm.test_dataloader()))
    graph = onnx_export.export(source.net, work / "fp32.onnx", {k: example[k] for k in ("input_ids", "attention_mask")})
    quantize.onnx_dynamic(graph, work / "int8.onnx")
    return onnx_kind.save(work / "onnx_int8", work / "int8.onnx", source, {"precision": "int8"})


def texts() -> list[str]:
    from tunelab.data.embedded import reviews_test

    path = reviews_test(ROOT / ".cache")
    records = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    return records[: CLIENTS * REQUESTS]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: Path, max_batch_size: int, timeout: float, log: Path) -> tuple[subprocess.Popen, str]:
    import urllib.request

    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), f"model={model}", f"port={port}",
                                 f"max_batch_size={max_batch_size}", f"batch_timeout={timeout}",
                                 f"threads={THREADS}", "log_requests=false"], stdout=out, stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"serve.py exited: {log.read_text()[-2000:]}") from None
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"serve.py not ready after 300 s: {log.read_text()[-2000:]}")


async def load(url: str, items: list[str]) -> dict[str, Any]:
    """CLIENTS clients, each sending its share of `items` one request at a time."""
    import aiohttp

    latencies: list[float] = []
    errors: list[str] = []

    async def client(session: aiohttp.ClientSession, mine: list[str]) -> None:
        for text in mine:
            start = time.perf_counter()
            try:
                async with session.post(f"{url}/predict", json={"text": text}) as r:
                    body = await r.json()
                    if r.status != 200 or "label" not in body:
                        errors.append(f"{r.status} {str(body)[:200]}")
            except aiohttp.ClientError as e:
                errors.append(repr(e))
            latencies.append(time.perf_counter() - start)

    shares = [items[i::CLIENTS] for i in range(CLIENTS)]
    rates = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CLIENTS)) as session:
        await asyncio.gather(*(client(session, s[:2]) for s in shares))  # warm-up, not timed
        latencies.clear()
        for _ in range(ROUNDS):
            start = time.perf_counter()
            await asyncio.gather(*(client(session, s) for s in shares))
            rates.append(len(items) / (time.perf_counter() - start))
    q = statistics.quantiles(latencies, n=20)
    return {"rps": statistics.median(rates), "rps_rounds": rates, "p50_ms": 1000 * statistics.median(latencies),
            "p95_ms": 1000 * q[18], "errors": errors, "requests": len(latencies)}


def served(model: Path, items: list[str], max_batch_size: int, work: Path, timeout: float = 0.0) -> dict[str, Any]:
    log = work / f"serve_{max_batch_size}_{timeout}.log"
    proc, url = start(model, max_batch_size, timeout, log)
    try:
        result = asyncio.run(load(url, items))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    server_errors = [line for line in log.read_text().splitlines()
                     if " 500 " in line or "Traceback" in line]
    return {**result, "server_errors": server_errors}


def bare(model: Path, items: list[str], batch_size: int = CLIENTS) -> float:
    """Texts/s of the predictor alone (tokenize + onnxruntime) over the same texts, `batch_size` at a time.

    At batch 1 it bounds what batching can gain: a server cannot beat the ratio of the two bare loops."""
    from tunelab import artifacts
    from tunelab.deploy.predictor import Predictor

    predictor = Predictor(artifacts.load(model), "onnxruntime", THREADS)
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    predictor.probabilities(batches[0])
    rates = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for batch in batches:
            predictor.describe(predictor.probabilities(batch))
        rates.append(len(items) / (time.perf_counter() - start))
    return statistics.median(rates)


def line(name: str, r: dict[str, Any]) -> str:
    rounds = ", ".join(f"{x:.0f}" for x in r["rps_rounds"])
    return (f"  {name}: {r['rps']:.0f} requests/s (median of {rounds}), p50 {r['p50_ms']:.1f} ms, "
            f"p95 {r['p95_ms']:.1f} ms, {len(r['errors'])} client errors, {len(r['server_errors'])} server errors")


def main(folder: str | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, items = Path(folder) if folder else model_folder(work), texts()
        runs = {t: served(model, items, CLIENTS, work, t) for t in TIMEOUTS}
        best = max(TIMEOUTS, key=lambda t: runs[t]["rps"])
        batched = runs[best]
        unbatched = served(model, items, 1, work)
        loop, loop_single = bare(model, items), bare(model, items, 1)
    print(f"serve (ONNX int8 reviews classifier {model.name}, {CLIENTS} clients x {REQUESTS} requests, "
          f"{THREADS} onnxruntime thread(s), {os.cpu_count()} CPUs):")
    for t in TIMEOUTS:
        print(line(f"batching on (max_batch_size={CLIENTS}, batch_timeout={t})", runs[t]))
    print(line("batching off (max_batch_size=1)", unbatched))
    print(f"  bare onnxruntime loop, batch {CLIENTS}: {loop:.0f} texts/s; batch 1: {loop_single:.0f} texts/s "
          f"(batching can gain at most {loop / loop_single:.2f}x)")
    ratios = {"batched_vs_unbatched": batched["rps"] / unbatched["rps"], "batched_vs_bare": batched["rps"] / loop}
    print(f"  throughput (batch_timeout={best}): {ratios['batched_vs_unbatched']:.2f}x batching off (target >= 3), "
          f"{ratios['batched_vs_bare']:.2f}x the bare loop (target >= 0.7)")
    needed = 3 * unbatched["rps"]  # the worker runs the bare loop's code on as many threads: it cannot outrun it
    print(f"  3x batching off needs {needed:.0f} requests/s: {needed / loop:.2f}x what the bare loop alone "
          f"manages at batch {CLIENTS} ({loop:.0f} texts/s)")
    for r in (*runs.values(), unbatched):
        for e in (r["errors"] + r["server_errors"])[:3]:
            print(f"  error: {e}")
    return {"batched": batched, "batch_timeout": best, "unbatched": unbatched, "bare_rps": loop,
            "bare_single_rps": loop_single, **ratios}


if __name__ == "__main__":
    main(*sys.argv[1:2])
