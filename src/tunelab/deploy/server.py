"""`python serve.py model=...`: the model behind `POST /predict`, on LitServe.

LitServe runs the HTTP side (uvicorn, forked) apart from the inference worker (spawned, where the model
lives) and batches concurrent requests for the worker (`max_batch_size`, `batch_timeout`; a batch starts at
its first request, `tunelab.deploy.batching`). What this module adds to it:

- typed bodies (`requests`): FastAPI validates them in the HTTP process, and a validation error is a 400
  (not JSON) or 422 with one line naming the field, so nothing malformed reaches the worker or fails a batch;
- `GET /health` answers 503 while the worker is still loading the model (LitServe would not listen until
  it had), `GET /info` the artifact's card;
- image uploads as multipart forms (`FormBodies` turns a form into the JSON body, checked as JSON is);
- a body-size limit (413) checked on the declared length before anything is read, request logging with
  latency, and a shutdown on SIGTERM/SIGINT that lets in-flight requests finish before the worker stops.
"""


import logging
import os
import signal
import threading
import time
from typing import Any

import litserve as ls
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from tunelab.deploy.batching import FirstArrivalBatchedLoop
from tunelab.deploy.requests import FormBodies, ImageRequest, TextRequest

log = logging.getLogger("tunelab.serve")


def one_line(errors: list[dict], fields: str) -> str:
    """FastAPI's validation errors as `where: what` parts (never the submitted input itself)."""
    parts = []
    for e in errors:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        msg = str(e.get("msg", "")).removeprefix("Value error, ")
        if e.get("type") == "extra_forbidden":
            msg = f"unknown field (expected {fields})"
        parts.append(f"{where}: {msg}" if where and not msg.startswith("'") else msg)
    return "; ".join(parts)


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    fields = getattr(request.app.state, "fields", "the fields of the request model")
    errors = list(exc.errors())
    bad_json = any(e.get("type") == "json_invalid" for e in errors)
    not_object = any(e.get("type") == "model_attributes_type" and tuple(e.get("loc", ())) == ("body",)
                     for e in errors)
    if bad_json:
        message = "body is not valid JSON (expected a JSON object)"
    elif not_object:
        message = ("body is not a JSON object (expected a JSON object such as {\"text\": \"...\"}, sent with "
                   "Content-Type: application/json)")
    else:
        message = one_line(errors, fields)
    detail = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg")), "type": e.get("type")} for e in errors]
    return JSONResponse({"error": message, "detail": detail}, status_code=400 if bad_json else 422)


class Guard:
    """ASGI middleware: refuse bodies over `max_bytes` (413), log each request with its latency.

    Clients such as urllib and requests read the answer only once they have sent the whole body, and a connection
    closed on unread bytes is reset, losing the 413: so a body over the limit is read and dropped, up to
    `drain_bytes`, before it is refused. A client that waits for `100 Continue`, or declares more than that, is
    refused at once. A body without a declared length (chunked) is read here before the app sees it."""

    def __init__(self, app: Any, max_bytes: int, log_requests: bool = True) -> None:
        self.app, self.max_bytes, self.log_requests = app, max_bytes, log_requests
        self.drain_bytes = max(16 * max_bytes, 8 << 20)  # more is a flood, not a mistake: not worth reading

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [0]

        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        headers, body = dict(scope.get("headers") or []), receive
        if b"content-length" in headers:
            refusal = await self._declared(headers, receive)
        elif b"transfer-encoding" in headers:
            refusal, body = await self._chunked(receive)
        else:
            refusal = None
        if refusal:
            response = JSONResponse({"error": f"request body {refusal} exceeds max_body_bytes={self.max_bytes:,}"},
                                    status_code=413, headers={"Connection": "close"})
            await response(scope, receive, sending)
        elif body is not None:  # None: the client left while sending
            await self.app(scope, body, sending)
        if self.log_requests:
            log.info("%s %s %d %.1f ms", scope["method"], scope["path"], status[0],
                     1000 * (time.perf_counter() - start))

    async def _declared(self, headers: dict, receive: Any) -> str | None:
        """Why a body of declared length is refused (None: it is not); one over the limit is drained first."""
        length = headers[b"content-length"]
        if not length.isdigit():
            return f"of Content-Length {length.decode(errors='replace')!r}"
        if int(length) <= self.max_bytes:
            return None
        if int(length) <= self.drain_bytes and headers.get(b"expect", b"").lower() != b"100-continue":
            await self._drain(receive, 0)
        return f"of {int(length):,} bytes"

    async def _chunked(self, receive: Any) -> tuple[str | None, Any]:
        """Read a body sent without a length: (why it is refused, None) or (None, a receive that replays it)."""
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None, None
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            more = message.get("more_body", False)
            if seen > self.max_bytes:
                seen, ended = await self._drain(receive, seen) if more else (seen, True)
                return f"of {'' if ended else 'more than '}{seen:,} bytes", None
            if not more:
                return None, self._replay(b"".join(chunks), receive)

    async def _drain(self, receive: Any, seen: int) -> tuple[int, bool]:
        """Read and drop the rest of a body, up to `drain_bytes`: the bytes seen in all, and whether it ended."""
        while seen <= self.drain_bytes:
            message = await receive()
            seen += len(message.get("body", b""))
            if not message.get("more_body", False):  # its end, or the client left
                return seen, True
        return seen, False

    @staticmethod
    def _replay(body: bytes, receive: Any) -> Any:
        """A receive that gives `body` whole, then what follows it (a disconnect)."""
        delivered = [False]

        async def replayed() -> dict:
            if delivered[0]:
                return await receive()
            delivered[0] = True
            return {"type": "http.request", "body": body, "more_body": False}

        return replayed


class ClassifierAPI(ls.LitAPI):
    """Requests of one or many inputs, batched across requests for one pass of the predictor."""

    def __init__(self, model: str, backend: str, threads: int | None, chunk: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model, self.backend_name, self.threads, self.chunk = model, backend, threads, chunk

    def setup(self, device: str) -> None:
        from tunelab import artifacts
        from tunelab.deploy.predictor import Predictor

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C reaches every process: the server stops this one last
        self.predictor = Predictor(artifacts.load(self.model, role="model"), self.backend_name, self.threads)
        self.predictor.outputs(self.warmup())  # the first pass allocates; do not bill a client for it

    def _answers(self, items: list) -> list[dict]:
        out = []
        for i in range(0, len(items), self.chunk):
            out.extend(self.predictor.describe(self.predictor.outputs(items[i:i + self.chunk])))
        return out

    def batch(self, inputs: list[list]) -> tuple[list, list[int]]:
        return [x for items in inputs for x in items], [len(items) for items in inputs]

    def predict(self, x: Any) -> Any:
        if not isinstance(x, tuple):  # batching off: one request's inputs
            return self._answers(x)
        items, counts = x
        answers, out, start = self._answers(items), [], 0
        for n in counts:
            out.append(answers[start:start + n])
            start += n
        return out

    def unbatch(self, output: list) -> list:
        return output

    def encode_response(self, output: list[dict], context: dict) -> dict:
        return output[0] if context.get("single") else {"predictions": output}


class TextAPI(ClassifierAPI):
    def decode_request(self, request: TextRequest, context: dict) -> list[str]:
        context["single"] = request.single
        return request.items

    def warmup(self) -> list:
        return ["warm up"]


class ImageAPI(ClassifierAPI):
    def decode_request(self, request: ImageRequest, context: dict) -> list:
        context["single"] = request.single
        return request.items

    def warmup(self) -> list:
        from PIL import Image

        return [Image.new("RGB", (32, 32))]


class Server(ls.LitServer):
    """LitServer that listens while the model loads (health 503 until then) and stops gracefully."""

    failed = False

    def verify_worker_status(self) -> None:
        """Do not wait for the worker before listening; stop the server if it fails to load."""
        def watch() -> None:
            while True:
                states = list(self.workers_setup_status.values())
                if any(s == ls.utils.WorkerSetupStatus.ERROR for s in states):
                    log.error("the inference worker failed to load the model; stopping")
                    Server.failed = True
                    self._shutdown_event.set()
                    return
                if states and all(s == ls.utils.WorkerSetupStatus.READY for s in states):
                    log.info("model loaded: ready")
                    return
                time.sleep(0.05)

        threading.Thread(target=watch, daemon=True, name="tunelab-worker-watch").start()

    def _start_server(self, *args: Any, **kwargs: Any) -> dict:
        self.http_workers = super()._start_server(*args, **kwargs)
        return self.http_workers

    def _perform_graceful_shutdown(self, *args: Any, **kwargs: Any) -> None:
        """Every shutdown path (a signal, a worker that failed to load, a dead worker) ends LitServe's
        worker-monitoring thread first: waking mid-shutdown, it would find the workers and the manager its
        loop asks already stopped and log a dead worker or a traceback. Its loop reads `_shutdown_event` each
        round; it gets a set local event, since the manager's one may be the main thread's pending `wait()`."""
        stopped = threading.Event()
        stopped.set()
        self._shutdown_event = stopped
        for thread in threading.enumerate():
            if thread.name == "litserve-monitoring" and thread is not threading.current_thread():
                thread.join(timeout=self.monitor_internal + 1)
        super()._perform_graceful_shutdown(*args, **kwargs)

    def drain(self, signum: int, frame: Any) -> None:
        """Stop accepting, let in-flight requests finish (uvicorn's graceful shutdown), then stop the workers."""
        if os.getpid() != self.pid:  # an HTTP process forked with this handler: uvicorn re-raises its signal here
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        log.info("signal %d: finishing in-flight requests, then stopping", signum)
        for worker in getattr(self, "http_workers", {}).values():
            if worker.is_alive():
                worker.terminate()
        for worker in getattr(self, "http_workers", {}).values():
            worker.join(timeout=self.uvicorn_graceful_timeout)
        raise KeyboardInterrupt  # LitServer.run's own shutdown path: stop the inference workers and the manager


def build(model: str, modality: str, card: dict, cfg: Any) -> Server:
    """The LitServer for `model` with the `serve` config `cfg` (batching, limits, logging)."""
    from tunelab.deploy.requests import Limits

    Limits.max_items, Limits.max_image_bytes = cfg.max_items, cfg.max_image_bytes
    api_class = ImageAPI if modality == "image" else TextAPI
    batching = {"loop": FirstArrivalBatchedLoop()} if cfg.max_batch_size > 1 else {}
    api = api_class(model, cfg.backend, cfg.threads, cfg.max_batch_size * cfg.max_items,
                    max_batch_size=cfg.max_batch_size, batch_timeout=cfg.batch_timeout, **batching)
    server = Server(api, accelerator="cpu", workers_per_device=cfg.workers, timeout=cfg.timeout,
                    model_metadata=card,
                    middlewares=[(FormBodies, {"text_files": modality == "text"}),
                                 (Guard, {"max_bytes": cfg.max_body_bytes,  # the last is the outermost
                                          "log_requests": cfg.log_requests})],
                    fast_queue=cfg.fast_queue)
    server.app.add_exception_handler(RequestValidationError, validation_error)
    server.app.state.fields = "'image' or 'images'" if modality == "image" else "'text' or 'texts'"
    return server


def serve(server: Server, host: str, port: int, log_level: str = "info") -> None:
    server.pid = os.getpid()
    signal.signal(signal.SIGTERM, server.drain)
    signal.signal(signal.SIGINT, server.drain)
    server.run(host=host, port=port, generate_client_file=False, log_level=log_level, access_log=False)


def rules() -> tuple:
    from tunelab import checks
    from tunelab.deploy.predictor import BACKENDS

    return (
        ("host", checks.choice("127.0.0.1", "0.0.0.0", "::")),  # what LitServe binds to
        ("port", checks.integer(1024, 65535)),
        ("backend", checks.choice(*BACKENDS)),
        ("threads", checks.OPTIONAL_COUNT),
        ("workers", checks.COUNT),
        ("max_batch_size", checks.COUNT),
        ("batch_timeout", checks.NON_NEGATIVE),
        ("max_items", checks.COUNT),
        ("max_body_bytes", checks.COUNT),
        ("max_image_bytes", checks.COUNT),
        ("timeout", checks.POSITIVE),
        ("fast_queue", checks.BOOL),
        ("log_requests", checks.BOOL),
        ("log_level", checks.choice("debug", "info", "warning", "error")),
    )


def run(cfg: Any) -> int:
    """Check the config and the model in this process (bad input: an error before anything starts), then
    serve until stopped; returns the exit code."""
    from tunelab import artifacts
    from tunelab.deploy.predict import check_rules, classifier_kinds, model_folder
    from tunelab.deploy.predictor import Predictor

    check_rules(cfg, rules())
    model = model_folder(str(cfg.model))
    predictor = Predictor(artifacts.load(model, kinds=classifier_kinds(), role="model"), cfg.backend,
                          cfg.threads)  # what the worker will load: fails here, before anything starts
    card = {**predictor.card, "labels": predictor.labels, "source": str(model), "backend": predictor.backend}
    modality = predictor.modality
    del predictor
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(build(str(model), modality, card, cfg), cfg.host, cfg.port, cfg.log_level)
    return 1 if Server.failed else 0
