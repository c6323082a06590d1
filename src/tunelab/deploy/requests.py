"""The request bodies `POST /predict` accepts, as pydantic models: FastAPI validates them before a request
reaches the model, so a malformed one is a 4xx naming the field and never touches the inference worker.

Validation runs in the HTTP process, not in the worker: a batch is formed from requests that already passed,
so one bad request can never fail the others it would have been batched with. Limits are class attributes
the server sets before it starts (its HTTP processes are forked from it and inherit them). A form body (a
multipart upload) is turned into the same JSON body first (`FormBodies`), so it passes the same checks.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from typing import Any, ClassVar

from fastapi.responses import JSONResponse
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, PrivateAttr, model_validator

from tunelab.deploy.inputs import IMAGE_ERRORS


class Limits:
    """How much one request may carry (the server's `max_items`, `max_image_bytes`, `max_image_pixels`)."""

    max_items: ClassVar[int] = 64
    max_image_bytes: ClassVar[int] = 16 << 20
    max_image_pixels: ClassVar[int] = 4096 * 4096


def _one_of(single: Any, many: list | None, names: tuple[str, str]) -> list:
    if (single is None) == (many is None):
        raise ValueError(f"give exactly one of {names[0]!r} (one input) or {names[1]!r} (a list of inputs)")
    items = [single] if many is None else many
    if not items:
        raise ValueError(f"{names[1]!r} is empty (expected 1 to {Limits.max_items} inputs)")
    if len(items) > Limits.max_items:
        raise ValueError(f"{names[1]!r} holds {len(items)} inputs (expected at most {Limits.max_items} per "
                         "request; split the list)")
    return items


class TextRequest(BaseModel):
    """`{"text": "..."}` or `{"texts": ["...", ...]}`."""

    model_config = ConfigDict(extra="forbid", strict=True)
    text: str | None = None
    texts: list[str] | None = None

    @model_validator(mode="after")
    def _check(self) -> TextRequest:
        for i, text in enumerate(_one_of(self.text, self.texts, ("text", "texts"))):
            if not text.strip():
                where = "'text'" if self.texts is None else f"'texts'[{i}]"
                raise ValueError(f"{where} is empty (expected a non-empty string)")
        return self

    @property
    def items(self) -> list[str]:
        return [self.text] if self.texts is None else list(self.texts)

    @property
    def single(self) -> bool:
        return self.texts is None


def decode_image(data: str, where: str) -> Image.Image:
    """A base64 string to an RGB image, or a ValueError saying what is wrong with it."""
    if len(data) > Limits.max_image_bytes * 4 // 3 + 4:
        raise ValueError(f"{where} is over {Limits.max_image_bytes:,} bytes (expected a smaller image)")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{where} is not valid base64 (expected the image file's bytes, base64-encoded)") from None
    try:
        with Image.open(io.BytesIO(raw)) as image:
            if image.width * image.height > Limits.max_image_pixels:
                raise ValueError(f"{where} has {image.width}x{image.height} pixels (expected at most "
                                 f"{Limits.max_image_pixels:,})")
            return image.convert("RGB")
    except IMAGE_ERRORS as e:
        if isinstance(e, ValueError) and str(e).startswith(where):
            raise
        why = "not a known image format" if isinstance(e, UnidentifiedImageError) else str(e)
        raise ValueError(f"{where} does not decode as an image ({why}; expected a PNG, JPEG or other image "
                         "file, base64-encoded)") from None


class ImageRequest(BaseModel):
    """`{"image": "<base64>"}` or `{"images": ["<base64>", ...]}`: image files, base64-encoded."""

    model_config = ConfigDict(extra="forbid", strict=True)
    image: str | None = None
    images: list[str] | None = None
    _decoded: list[Image.Image] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> ImageRequest:
        data = _one_of(self.image, self.images, ("image", "images"))
        self._decoded = [decode_image(d, "'image'" if self.images is None else f"'images'[{i}]")
                         for i, d in enumerate(data)]
        return self

    @property
    def items(self) -> list[Image.Image]:
        return self._decoded

    @property
    def single(self) -> bool:
        return self.images is None


class FormBodies:
    """ASGI middleware: a form body (a multipart upload, or URL-encoded fields) becomes the JSON body the typed
    request model validates, so uploads and JSON share one check in the HTTP process. A file part is
    base64-encoded as `{"image": ...}` expects (a text model's: read as UTF-8 text); a field named in the plural
    (`images`, `texts`) is a list."""

    LISTS = ("images", "texts")

    def __init__(self, app: Any, text_files: bool = False) -> None:
        self.app, self.text_files = app, text_files

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        kind = dict(scope.get("headers") or []).get(b"content-type", b"").split(b";")[0].strip().lower()
        if scope["type"] != "http" or kind not in (b"multipart/form-data", b"application/x-www-form-urlencoded"):
            return await self.app(scope, receive, send)
        from starlette.requests import Request

        request = Request(scope, receive)
        try:
            form = await request.form(max_files=Limits.max_items, max_fields=Limits.max_items)
        except Exception as e:  # starlette's parser (400: malformed, too many parts) or the size limit (413)
            status = getattr(e, "status_code", 400)
            message = getattr(e, "detail", None) or str(e) or type(e).__name__
            expected = "" if status == 413 else f" (expected a form of at most {Limits.max_items} parts)"
            response = JSONResponse({"error": f"form body: {message}{expected}"}, status_code=status)
            return await response(scope, receive, send)
        try:
            body = json.dumps(await self.fields(form)).encode()
        except UnicodeDecodeError as e:
            response = JSONResponse({"error": f"form body: an uploaded file is not UTF-8 text ({e.reason} at byte "
                                              f"{e.start}; expected a text file)"}, status_code=422)
            return await response(scope, receive, send)
        finally:
            await form.close()
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        delivered = [False]

        async def replay() -> dict:
            if delivered[0]:
                return await receive()  # what comes after the body (a disconnect)
            delivered[0] = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app({**scope, "headers": headers}, replay, send)

    async def fields(self, form: Any) -> dict[str, Any]:
        from starlette.datastructures import UploadFile

        values: dict[str, list] = {}
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                data = await value.read()
                value = data.decode("utf-8") if self.text_files else base64.b64encode(data).decode()
            values.setdefault(name, []).append(value)
        return {name: v if name in self.LISTS or len(v) > 1 else v[0] for name, v in values.items()}
