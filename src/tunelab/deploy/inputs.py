"""Rows to predict, read lazily from a text file, an image folder or a list of image files.

Training stops at the first bad record; prediction must not: a row it cannot take (a line that is not
JSON, an empty text, an image that does not decode) becomes a `Row` with an `error` naming its file and
line, and the caller skips it or stops. Records are read as `data.readers` reads training data (the same
formats, field options, size caps and messages), one line at a time, so memory does not grow with the
file. A file whose first record lacks the field to predict on is refused before any row is predicted.
"""

from __future__ import annotations

import csv
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from tunelab.data import readers
from tunelab.errors import TunelabError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
IMAGE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclass
class Row:
    """One input: what to predict on (text, or an image path until decoded), its label if the input has one,
    or why it cannot be predicted."""

    source: str  # file the row came from
    line: int | None  # line in that file (None: an image found in a folder)
    item: Any = None
    label: Any = None  # the raw target, read by the model's problem
    error: str | None = None

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}" if self.line is not None else self.source


@dataclass(frozen=True)
class Fields:
    """The `data.*` options of a prediction run: which fields hold the input and the label."""

    text_field: str = "text"
    image_field: str = "image"
    label_field: str | None = "label"
    encoding_errors: str = "strict"
    max_record_bytes: int = readers.MAX_RECORD_BYTES
    max_file_bytes: int = 64 << 20


# ----------------------------------------------------------------------------- lines and records
def lines(path: Path, fields: Fields) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, text, None) per line, or (line number, None, problem) for a line over the record cap or
    not valid UTF-8; reading goes on after either."""
    with open(path, "rb") as f:
        lineno = 0
        while raw := f.readline(fields.max_record_bytes + 2):
            lineno += 1
            content = raw.rstrip(b"\r\n")
            if len(content) > fields.max_record_bytes:
                rest = 0 if raw.endswith(b"\n") else readers._rest_of_line(f)
                yield lineno, None, str(readers.too_long(path, lineno, len(content) + rest, fields.max_record_bytes))
                continue
            try:
                yield lineno, content.decode("utf-8", errors=fields.encoding_errors), None
            except UnicodeDecodeError as e:
                yield lineno, None, (f"{path}:{lineno}: bytes that are not valid UTF-8 at column {e.start + 1} "
                                     "(expected UTF-8 text; set data.encoding_errors=replace to replace them)")


def record(obj: dict, path: Path, lineno: int, field: str, fields: Fields) -> Row:
    """A row from one parsed record: `field` must hold a non-empty string; the label is optional."""
    try:
        item = readers._record(obj, path, lineno, field, None)["text"]
    except TunelabError as e:
        message = str(e) if field == fields.text_field else str(e).replace("text field", "image field").replace(
            "data.text_field", "data.image_field")
        return Row(str(path), lineno, error=message)
    label = obj.get(fields.label_field) if fields.label_field else None
    row = Row(str(path), lineno, item, None if label in (None, "") else label)
    if not item.strip():
        row.error = f"{path}:{lineno}: empty {field!r} (expected a non-empty string)"
    return row


def _json_rows(path: Path, field: str, fields: Fields) -> Iterator[Row]:
    for lineno, line, problem in lines(path, fields):
        if problem or not line.strip():
            if problem:
                yield Row(str(path), lineno, error=problem)
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield Row(str(path), lineno, error=f"{path}:{lineno}: malformed JSON ({e.msg}; expected one JSON "
                                               "object per line)")
            continue
        if not isinstance(obj, dict):
            yield Row(str(path), lineno, error=f"{path}:{lineno}: expected a JSON object per line, got "
                                               f"{type(obj).__name__}")
            continue
        yield record(obj, path, lineno, field, fields)


def _csv_rows(path: Path, field: str, fields: Fields) -> Iterator[Row]:
    """csv rows; a line the line reader refuses, a row csv cannot parse or with the wrong number of fields is
    an error row and reading goes on."""
    refused: list[Row] = []

    def text_lines() -> Iterator[str]:
        for lineno, line, problem in lines(path, fields):
            if problem:
                refused.append(Row(str(path), lineno, error=problem))
                yield ""  # an empty line: csv skips it
            else:
                yield line

    csv.field_size_limit(max(csv.field_size_limit(), fields.max_record_bytes))
    reader = csv.reader(text_lines(), delimiter="\t" if path.suffix.lower() == ".tsv" else ",", strict=True)
    header = None
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            row = None
            refused.append(Row(str(path), reader.line_num, error=f"{path}:{reader.line_num}: malformed CSV ({e})"))
        yield from refused
        refused.clear()
        if not row:
            continue
        if header is None:
            header = row
        elif len(row) != len(header):
            yield Row(str(path), reader.line_num, error=f"{path}:{reader.line_num}: malformed CSV row with "
                                                        f"{len(row)} fields (expected {len(header)}: {header})")
        else:
            yield record(dict(zip(header, row, strict=True)), path, reader.line_num, field, fields)
    yield from refused


def _txt_rows(path: Path, fields: Fields) -> Iterator[Row]:
    """Plain text: one row per non-blank line (as training reads it), no labels."""
    for lineno, line, problem in lines(path, fields):
        if problem or line.strip():
            yield Row(str(path), lineno, line, error=problem)


def records(path: Path, field: str, fields: Fields) -> Iterator[Row]:
    suffix = path.suffix.lower()
    if suffix in readers.TEXT_SUFFIXES:
        return _txt_rows(path, fields)
    if suffix in readers.JSON_SUFFIXES:
        return _json_rows(path, field, fields)
    return _csv_rows(path, field, fields)


def check_first(rows: Iterator[Row], path: Path, field: str, fields: Fields) -> Iterator[Row]:
    """Refuse a file whose first record lacks `field` (every row would fail), or that holds no rows, before
    any prediction; the rows are handed on unchanged."""
    first = next(rows, None)
    if first is None:
        raise TunelabError(f"input: {path} holds no records (expected at least one non-empty line)")
    if first.error and f" field {field!r} (found fields" in first.error:
        raise TunelabError(f"input: {first.error}")
    return itertools.chain([first], rows)


# ----------------------------------------------------------------------------- images
def image_files(folder: Path) -> list[tuple[Path, str | None]]:
    """Image files under `folder`, sorted as torchvision's ImageFolder sorts them; with class sub-folders the
    sub-folder is the label."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    nested = any(p.parent != folder for p in files)
    return [(p, p.relative_to(folder).parts[0] if nested else None) for p in files]


def decode(row: Row, max_file_bytes: int) -> Row:
    """Open the row's image file as RGB (what training's loader does), or say why it cannot be."""
    path = Path(row.item)
    try:
        size = path.stat().st_size
        if size > max_file_bytes:
            row.error = (f"{path}: image file of {size:,} bytes exceeds data.max_file_bytes={max_file_bytes:,} "
                         "(expected image files of at most that size)")
            return row
        with Image.open(path) as image:
            row.item = image.convert("RGB")
    except FileNotFoundError:
        row.error = f"{row.where}: image file not found: {path}"
    except IMAGE_ERRORS as e:
        row.error = f"{row.where}: cannot decode image {path} ({e}; expected a readable image file)"
    return row


def _listed(rows: Iterator[Row], base: Path) -> Iterator[Row]:
    """Rows of a list file name image files, relative to the list file's folder."""
    for row in rows:
        if row.error is None:
            path = Path(row.item.strip()).expanduser()
            row.item = str(path if path.is_absolute() else base / path)
        yield row


def image_rows(path: Path, fields: Fields) -> Iterator[Row]:
    if path.is_dir():
        found = image_files(path)
        if not found:
            raise TunelabError(f"input: {path} holds no image files (expected {'/'.join(IMAGE_SUFFIXES)} files, "
                               "directly or in one folder per class)")
        rows: Iterator[Row] = (Row(str(p), None, str(p), label) for p, label in found)
    else:
        rows = _listed(check_first(records(path, fields.image_field, fields), path, fields.image_field, fields),
                       path.parent)
    return (decode(row, fields.max_file_bytes) if row.error is None else row for row in rows)


def text_rows(path: Path, fields: Fields) -> Iterator[Row]:
    return check_first(records(path, fields.text_field, fields), path, fields.text_field, fields)


def check_input(source: str, modality: str) -> Path:
    """The input path, checked against what the model reads, before anything is read."""
    path = Path(source).expanduser()
    if not path.exists():
        raise TunelabError(f"input: not found: {path} (expected a {'/'.join(readers.SUFFIXES)} file"
                           f"{' or an image folder' if modality == 'image' else ''})")
    if path.is_dir():
        if modality != "image":
            raise TunelabError(f"input: {path} is a folder, but the model is a text classifier (expected a "
                               f"{'/'.join(readers.SUFFIXES)} file)")
        return path
    if path.suffix.lower() not in readers.SUFFIXES:
        kind = "an image folder or a list file of image paths" if modality == "image" else "a text file"
        raise TunelabError(f"input: unsupported file type {path.suffix!r} for {path} (expected {kind}: one of "
                           f"{readers.SUFFIXES})")
    return path


def rows(path: Path, modality: str, fields: Fields) -> Iterator[Row]:
    return image_rows(path, fields) if modality == "image" else text_rows(path, fields)
