"""The request bodies `POST /predict` accepts, as pydantic models: FastAPI validates them before a request
reaches the model, so a malformed one is a 4xx naming the field and never touches the inference worker.

Validation runs in the HTTP process, not in the worker: a batch is formed from requests that already passed,
so one bad request can never fail the others it would have been batched with. Limits are class attributes
the server sets before it starts (its HTTP processes are forked from it and inherit them).
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any, ClassVar

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
