"""Load test of `serve.py` on loopback: dynamic batching against batching off and a bare onnxruntime loop.

The model is an ONNX int8 reviews classifier: an untrained MODEL-sized classifier on the reviews tokenizer,
exported and quantized here (timing needs its cost, not its accuracy, and the figures must not depend on what
`logs/` holds), or the folder given as `python -m tunelab.bench.serve <folder>` (e.g.
`logs/compress/latest/onnx_int8`). CLIENTS concurrent clients send REQUESTS single-text requests each to a
server with batching (each of the BATCHED settings) and one without (max_batch_size=1), each its own process;
the bare loop runs the same texts through the same predictor at each of those batch sizes. All of them run in
turns, ROUNDS rounds, and each reports its median round; the best batching setting is compared with batching
off and with the bare loop at its batch size. The inference worker and the bare loop use THREADS onnxruntime
threads, so the ratios compare like with like.
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
ROUNDS = 5  # a round of each setting takes about a second: the median of several, taken in turns
MODEL = "bert_mini"  # the size `make bench`'s compression part fine-tunes and quantizes
# batching settings tried (max_batch_size, batch_timeout), the best compared: a timeout of 0 takes what is queued
# without waiting; a batch of half the clients lets the other half's requests travel while it runs
BATCHED = ((CLIENTS, 0.0), (CLIENTS, 0.005), (CLIENTS // 2, 0.0))
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


async def load(url: str, items: list[str]) -> tuple[float, list[float], list[str]]:
    """One round: CLIENTS clients, each sending its share of `items` one request at a time (after two untimed
    requests each); requests/s, each request's seconds, and the errors seen."""
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
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CLIENTS)) as session:
        await asyncio.gather(*(client(session, s[:2]) for s in shares))  # warm-up, not timed
        latencies.clear()
        start = time.perf_counter()
        await asyncio.gather(*(client(session, s) for s in shares))
        return len(items) / (time.perf_counter() - start), latencies, errors


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def summary(rounds: list[tuple[float, list[float], list[str]]], log: Path) -> dict[str, Any]:
    """A setting's rounds: the median requests/s, latency percentiles over every request, client and server errors."""
    rates = [r[0] for r in rounds]
    latencies = [x for r in rounds for x in r[1]]
    q = statistics.quantiles(latencies, n=20)
    server_errors = [line for line in log.read_text().splitlines() if " 500 " in line or "Traceback" in line]
    return {"rps": statistics.median(rates), "rps_rounds": rates, "p50_ms": 1000 * statistics.median(latencies),
            "p95_ms": 1000 * q[18], "errors": [e for r in rounds for e in r[2]], "requests": len(latencies),
            "server_errors": server_errors}


def bare_round(predictor: Any, items: list[str], batch_size: int) -> float:
    """Texts/s of the predictor alone (tokenize + onnxruntime + answers) over `items`, `batch_size` at a time.

    A server's worker runs this code on as many threads, so the loop at a server's batch size bounds it."""
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    start = time.perf_counter()
    for batch in batches:
        predictor.describe(predictor.outputs(batch))
    return len(items) / (time.perf_counter() - start)


def measure(model: Path, items: list[str], work: Path) -> tuple[dict[tuple, dict], dict[int, list[float]]]:
    """Every server setting started at once (an idle server blocks, using no CPU), then ROUNDS rounds in which
    each setting and the bare loops run in turn, so a change in machine speed hits them alike. Returns each
    setting's summary and each bare-loop batch size's rates, round by round."""
    from tunelab import artifacts
    from tunelab.deploy.predictor import Predictor

    settings = [*BATCHED, (1, 0.0)]
    servers: dict[tuple, tuple[subprocess.Popen, str]] = {}
    rounds: dict[tuple, list] = {setting: [] for setting in settings}
    bare: dict[int, list[float]] = {size: [] for size in sorted({size for size, _ in settings})}
    try:
        for size, timeout in settings:
            servers[size, timeout] = start(model, size, timeout, work / f"serve_{size}_{timeout}.log")
        predictor = Predictor(artifacts.load(model), "onnxruntime", THREADS)
        predictor.outputs(items[:CLIENTS])
        for _ in range(ROUNDS):
            for setting, (_, url) in servers.items():
                rounds[setting].append(asyncio.run(load(url, items)))
            for size, rates in bare.items():
                rates.append(bare_round(predictor, items, size))
    finally:
        for proc, _ in servers.values():
            stop(proc)
    runs = {(size, t): summary(r, work / f"serve_{size}_{t}.log") for (size, t), r in rounds.items()}
    return runs, bare


def line(name: str, r: dict[str, Any]) -> str:
    rounds = ", ".join(f"{x:.0f}" for x in r["rps_rounds"])
    return (f"  {name}: {r['rps']:.0f} requests/s (median of {rounds}), p50 {r['p50_ms']:.1f} ms, "
            f"p95 {r['p95_ms']:.1f} ms, {len(r['errors'])} client errors, {len(r['server_errors'])} server errors")


def main(folder: str | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, items = Path(folder) if folder else model_folder(work), texts()
        runs, bare_rounds = measure(model, items, work)
    bare = {size: statistics.median(rates) for size, rates in bare_rounds.items()}
    best = max(BATCHED, key=lambda setting: runs[setting]["rps"])
    batched, unbatched, loop = runs[best], runs[1, 0.0], bare[best[0]]
    print(f"serve (ONNX int8 reviews classifier {model.name}, {CLIENTS} clients x {REQUESTS} requests, {ROUNDS} "
          f"rounds in turns, {THREADS} onnxruntime thread(s), {os.cpu_count()} CPUs):")
    for size, timeout in BATCHED:
        print(line(f"batching on (max_batch_size={size}, batch_timeout={timeout})", runs[size, timeout]))
    print(line("batching off (max_batch_size=1)", unbatched))
    for size, rate in bare.items():
        print(f"  bare onnxruntime loop, batch {size}: {rate:.0f} texts/s (median of "
              f"{', '.join(f'{x:.0f}' for x in bare_rounds[size])})")
    ratios = {"batched_vs_unbatched": batched["rps"] / unbatched["rps"], "batched_vs_bare": batched["rps"] / loop}
    print(f"  throughput (max_batch_size={best[0]}, batch_timeout={best[1]}): {ratios['batched_vs_unbatched']:.2f}x "
          f"batching off (target >= 3), {ratios['batched_vs_bare']:.2f}x the bare loop at batch {best[0]} "
          f"(target >= 0.7)")
    needed = 3 * unbatched["rps"]  # the worker runs the bare loop's code on as many threads: it cannot outrun it
    fastest = max(bare.values())
    print(f"  3x batching off needs {needed:.0f} requests/s: {needed / fastest:.2f}x what the bare loop alone "
          f"manages at its best batch size ({fastest:.0f} texts/s), and {bare[max(bare)] / bare[1]:.2f}x is all "
          f"batch {max(bare)} gains over batch 1 per text in the worker")
    for r in runs.values():
        for e in (r["errors"] + r["server_errors"])[:3]:
            print(f"  error: {e}")
    return {"batched": batched, "setting": best, "unbatched": unbatched, "bare_rps": bare, **ratios}


if __name__ == "__main__":
    main(*sys.argv[1:2])
