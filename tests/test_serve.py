"""`serve.py`: a text server for the module on a free loopback port. It answers 503 until the model is loaded,
then the same probabilities as the predictor for single and batched requests, concurrent ones too, and for
form bodies; every malformed request is a 4xx naming the problem while the same inference worker goes on
serving; SIGTERM lets in-flight requests finish (the last test of that server). An image server answers
base64 JSON and multipart uploads alike."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
from pydantic import ValidationError

from tests.conftest import ROOT
from tests.test_predict import tiny_classifier  # noqa: F401 (the module fixture: a small text classifier folder)

TEXTS = ["the film was really good", "awful kettle", "fine", "the the the poor film"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, body: bytes | None = None, headers: dict | None = None, method: str | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            text = response.read()
            return response.status, json.loads(text) if response.headers.get_content_type() == "application/json" \
                else {"raw": text.decode()}
    except urllib.error.HTTPError as e:
        text = e.read()
        try:
            return e.code, json.loads(text)
        except ValueError:
            return e.code, {"raw": text.decode(errors="replace")}


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM (the server stops its HTTP and worker processes), then kill whatever is left of the tree."""
    if proc.poll() is not None:
        return
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for child in children:
        if child.is_running():
            child.kill()


class Served:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path, first_health: int) -> None:
        self.proc, self.url, self.log, self.first_health = proc, url, log, first_health

    def post(self, payload: object, **kwargs) -> tuple[int, dict]:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return call(f"{self.url}/predict", body, **kwargs)

    def workers(self) -> set[int]:
        return {p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)}


def launch(model: Path, tmp_path_factory: pytest.TempPathFactory, *options: str, env: dict | None = None):
    """Start `serve.py model=<model> <options>` on a free port; yield it once /health is 200, then stop it."""
    port, log = free_port(), tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), f"model={model}", f"port={port}", *options],
                                stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path_factory.mktemp("cwd"),
                                env={**os.environ, **(env or {})})
    url, first, deadline = f"http://127.0.0.1:{port}", None, time.monotonic() + 180
    try:
        while time.monotonic() < deadline:
            try:
                status, _ = call(f"{url}/health", method="GET")
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None, log.read_text()[-3000:]
                time.sleep(0.05)
                continue
            first = first or status
            if status == 200:
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"server not ready: {log.read_text()[-3000:]}")
    except BaseException:
        stop(proc)
        raise
    yield Served(proc, url, log, first)
    stop(proc)


@pytest.fixture(scope="module")
def server(tiny_classifier: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: F811
    # batches of up to 4 requests, collected for 0.3 s: a request stays in flight long enough to be caught
    # by the shutdown test
    yield from launch(tiny_classifier, tmp_path_factory, "max_batch_size=4", "batch_timeout=0.3", "max_items=8",
                      "max_body_bytes=65536", "threads=1")


def expected(folder: Path, texts: list[str]) -> list[dict]:
    from tunelab import artifacts
    from tunelab.deploy.predictor import Predictor

    predictor = Predictor(artifacts.load(folder), "torch", threads=1)
    return predictor.describe(predictor.outputs(texts))


def close(got: dict, want: dict) -> bool:
    return got["label"] == want["label"] and all(
        abs(got["probabilities"][k] - v) < 1e-5 for k, v in want["probabilities"].items())


def test_health_is_503_until_the_model_is_loaded_then_200(server: Served) -> None:
    assert server.first_health == 503
    assert call(f"{server.url}/health", method="GET")[0] == 200


def test_single_batched_and_concurrent_requests_get_the_predictors_answers(server: Served,
                                                                           tiny_classifier: Path) -> None:  # noqa: F811
    want = expected(tiny_classifier, TEXTS)
    status, single = server.post({"text": TEXTS[0]})
    assert status == 200 and close(single, want[0]) and set(single) == {"label", "probability", "probabilities"}
    status, many = server.post({"texts": TEXTS})
    assert status == 200 and all(close(g, w) for g, w in zip(many["predictions"], want, strict=True))
    with ThreadPoolExecutor(12) as pool:  # 12 clients at once: batched together by the server
        answers = list(pool.map(lambda i: server.post({"texts": TEXTS[i % 4:] or TEXTS}), range(24)))
    for i, (status, body) in enumerate(answers):
        assert status == 200
        assert all(close(g, w) for g, w in zip(body["predictions"], want[i % 4:] or want, strict=True))


def test_info_is_the_artifacts_card(server: Served, tiny_classifier: Path) -> None:  # noqa: F811
    status, info = call(f"{server.url}/info", method="GET")
    card = json.loads((tiny_classifier / "tunelab.json").read_text())
    assert status == 200
    model = info["model"]
    assert model["labels"] == ["negative", "positive"] and model["metrics"] == card["metrics"]
    assert model["sha256"] == card["sha256"] and model["source"] == str(tiny_classifier.resolve())
    assert model["backend"] == "torch" and model["kind"] == "text-classifier"


MALFORMED = [
    ("invalid JSON", b'{"text": "unterminated', 400, "not valid JSON"),
    ("not an object", b'["a text"]', 422, "not a JSON object"),
    ("unknown field", {"txt": "a"}, 422, "txt: unknown field (expected 'text' or 'texts')"),
    ("nothing to predict", {}, 422, "give exactly one of 'text'"),
    ("both fields", {"text": "a", "texts": ["b"]}, 422, "give exactly one of 'text'"),
    ("mistyped", {"text": 3}, 422, "text: Input should be a valid string"),
    ("mistyped item", {"texts": ["a", 3]}, 422, "texts.1: Input should be a valid string"),
    ("empty string", {"text": "  "}, 422, "'text' is empty"),
    ("empty in a list", {"texts": ["a", ""]}, 422, "'texts'[1] is empty"),
    ("empty list", {"texts": []}, 422, "'texts' is empty"),
    ("too many texts", {"texts": ["a"] * 9}, 422, "holds 9 inputs (expected at most 8"),
    ("body over the limit", {"text": "a" * 70000}, 413, "exceeds max_body_bytes=65,536"),
]


@pytest.mark.parametrize(("case", "payload", "status", "message"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_requests_are_4xx_naming_the_problem(server: Served, case: str, payload: object, status: int,
                                                       message: str) -> None:
    workers = server.workers()
    got, body = server.post(payload)
    assert got == status and message in body.get("error", body.get("detail", "")), body
    assert server.post({"text": "still serving"})[0] == 200
    assert server.workers() == workers  # the same processes: nothing crashed or restarted


def test_wrong_method_and_chunked_bodies_over_the_limit(server: Served) -> None:
    assert call(f"{server.url}/predict", method="GET")[0] == 405
    big = json.dumps({"text": "a" * 70000}).encode()
    def chunks():
        for i in range(0, len(big), 8192):
            yield big[i:i + 8192]
    request = urllib.request.Request(f"{server.url}/predict", data=chunks(), method="POST",
                                     headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=60)
    assert info.value.code == 413


def test_requests_are_logged_with_their_latency(server: Served) -> None:
    lines = [line for line in server.log.read_text().splitlines() if "POST /predict" in line]
    assert any(" 200 " in line and line.endswith(" ms") for line in lines), lines[-5:]
    assert any(" 422 " in line for line in lines)


def test_form_fields_are_answered_as_json_ones(server: Served, tiny_classifier: Path) -> None:  # noqa: F811
    want = expected(tiny_classifier, TEXTS)
    body, headers = form(*(("texts", None, t.encode()) for t in TEXTS))
    status, many = server.post(body, headers=headers)
    assert status == 200 and all(close(g, w) for g, w in zip(many["predictions"], want, strict=True))
    encoded = urllib.parse.urlencode({"text": TEXTS[1]}).encode()
    status, one = server.post(encoded, headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200 and close(one, want[1])
    body, headers = form(("txt", None, b"a"))
    status, unknown = server.post(body, headers=headers)
    assert status == 422 and unknown["error"] == "txt: unknown field (expected 'text' or 'texts')"
    body, headers = form(("text", "review.txt", TEXTS[2].encode()))  # a text file upload is read as text
    status, uploaded = server.post(body, headers=headers)
    assert status == 200 and close(uploaded, want[2])
    body, headers = form(("text", "review.txt", b"\xff\xfe not utf-8"))
    status, binary = server.post(body, headers=headers)
    assert status == 422 and "not UTF-8 text" in binary["error"]
    status, bad = server.post(b"--nope\r\ngarbage", headers={"Content-Type": "multipart/form-data"})
    assert status == 400 and bad["error"].startswith("form body:"), bad
    assert server.post({"text": "still serving"})[0] == 200


def test_sigterm_lets_in_flight_requests_finish(server: Served) -> None:
    """Runs last: stops the module's server."""
    results, sent = [], threading.Barrier(4)

    def client(i: int) -> None:
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", int(server.url.rsplit(":", 1)[1]), timeout=60)
        conn.request("POST", "/predict", json.dumps({"text": TEXTS[i]}), {"Content-Type": "application/json"})
        sent.wait()
        response = conn.getresponse()
        results.append((response.status, json.loads(response.read())))

    workers = [psutil.Process(pid) for pid in server.workers()]  # Process objects: a reused pid is not them
    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    sent.wait()
    time.sleep(0.1)  # received, and waiting in the 0.3 s batch window
    os.kill(server.proc.pid, signal.SIGTERM)
    for t in threads:
        t.join(60)
    assert [status for status, _ in results] == [200, 200, 200]
    assert server.proc.wait(60) == 0
    _, alive = psutil.wait_procs(workers, timeout=15)  # children may finish their exit just after the parent
    assert not [p.pid for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    assert "Traceback" not in server.log.read_text()


# ----------------------------------------------------------------------------- image bodies (validated in-process)
def png(size: tuple[int, int] = (8, 8), seed: int | None = None) -> str:
    """A base64 PNG: black, or random pixels from `seed`."""
    from PIL import Image

    buffer = io.BytesIO()
    pixels = np.zeros((*size, 3), dtype=np.uint8) if seed is None else \
        np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize(("payload", "message"), [
    ({"image": "not base64!"}, "'image' is not valid base64"),
    ({"images": [png(), base64.b64encode(b"hello").decode()]}, "'images'[1] does not decode as an image"),
    ({"image": png()[:40]}, "does not decode as an image"),
    ({"images": []}, "'images' is empty"),
])
def test_image_bodies_that_do_not_decode_are_refused(payload: dict, message: str) -> None:
    from tunelab.deploy.requests import ImageRequest

    with pytest.raises(ValidationError, match=None) as info:
        ImageRequest.model_validate(payload)
    assert message in str(info.value)
    request = ImageRequest.model_validate({"images": [png(), png((4, 6))]})
    assert [im.size for im in request.items] == [(8, 8), (6, 4)] and not request.single


# ----------------------------------------------------------------------------- bad commands (in-process)
def serve_cfg(*overrides: str):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf" / "deploy"), version_base="1.3"):
        return compose("serve", overrides=list(overrides))


@pytest.mark.parametrize(("overrides", "message"), [
    (["model={lm}"], "is a BertForMaskedLM, not a sequence classifier or image classifier"),
    (["model={tmp}"], "holds no model"),
    (["model={clf}", "port=80"], "port=80 (expected an integer in [1024, 65535])"),
    (["model={clf}", "host=example.com"], "host='example.com' (expected one of '127.0.0.1'"),
    (["model={clf}", "max_batch_size=0"], "max_batch_size=0 (expected an integer >= 1)"),
    (["model={clf}", "backend=onnxruntime"], "holds no ONNX graph"),
])
def test_bad_commands_stop_before_anything_listens(overrides: list[str], message: str, tiny_hf_dir: Path,
                                                   tiny_classifier: Path, tmp_path: Path) -> None:  # noqa: F811
    from tunelab.deploy.server import run
    from tunelab.errors import TunelabError

    cfg = serve_cfg(*(o.format(lm=tiny_hf_dir, tmp=tmp_path, clf=tiny_classifier) for o in overrides))
    with pytest.raises(TunelabError) as info:
        run(cfg)
    assert message in str(info.value)


# ----------------------------------------------------------------------------- form bodies (multipart uploads)
def form(*parts: tuple[str, str | None, bytes]) -> tuple[bytes, dict]:
    """A multipart/form-data body of (name, file name or None for a plain field, content) parts."""
    boundary, body = "tunelab-test-boundary", b""
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        body += (b"Content-Type: application/octet-stream\r\n" if filename else b"") + b"\r\n" + content + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def test_form_bodies_become_the_json_body_the_request_model_checks() -> None:
    import asyncio

    from tunelab.deploy.requests import FormBodies

    seen = {}

    async def app(scope: dict, receive, send) -> None:
        seen["headers"], seen["body"] = dict(scope["headers"]), (await receive())["body"]

    body, headers = form(("images", "a.png", b"\x89PNG one"), ("images", "b.png", b"two"), ("note", None, b"hi"))
    scope = {"type": "http", "method": "POST", "path": "/predict", "query_string": b"",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    chunks = iter([{"type": "http.request", "body": body, "more_body": False}])

    async def receive() -> dict:
        return next(chunks)

    asyncio.run(FormBodies(app)(scope, receive, None))
    assert seen["headers"][b"content-type"] == b"application/json"
    assert json.loads(seen["body"]) == {"images": [base64.b64encode(b"\x89PNG one").decode(),
                                                   base64.b64encode(b"two").decode()], "note": "hi"}


@pytest.fixture(scope="module")
def image_server(tmp_path_factory: pytest.TempPathFactory):
    import torch

    from tunelab import artifacts
    from tunelab.models.vision import ImageModel

    torch.manual_seed(0)
    net = ImageModel("classifier", [str(i) for i in range(10)], name="test_resnet")
    config = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bilinear",
              "crop_pct": 1.0}
    folder = artifacts.save(tmp_path_factory.mktemp("image") / "model", net.eval(), labels=net.labels,
                            data_config=config, card={"task": "finetune"})
    yield from launch(folder, tmp_path_factory, "max_batch_size=4", "threads=1")


def test_images_are_answered_from_base64_json_and_from_uploads(image_server: Served) -> None:
    from PIL import Image

    from tunelab import artifacts
    from tunelab.deploy.predictor import Predictor

    files = [base64.b64decode(png((12, 9), seed)) for seed in (1, 2)]
    source = call(f"{image_server.url}/info", method="GET")[1]["model"]["source"]
    predictor = Predictor(artifacts.load(source), "torch", threads=1)
    want = predictor.describe(predictor.outputs([Image.open(io.BytesIO(f)).convert("RGB") for f in files]))
    status, one = image_server.post({"image": base64.b64encode(files[0]).decode()})
    assert status == 200 and close(one, want[0])
    body, headers = form(*(("images", f"{i}.png", f) for i, f in enumerate(files)))
    status, many = image_server.post(body, headers=headers)
    assert status == 200 and all(close(g, w) for g, w in zip(many["predictions"], want, strict=True))
    body, headers = form(("image", "notes.txt", b"not an image at all"))
    status, bad = image_server.post(body, headers=headers)
    assert status == 422 and "'image' does not decode as an image" in bad["error"], bad
    assert image_server.post({"image": base64.b64encode(files[1]).decode()})[0] == 200
