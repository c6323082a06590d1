"""Read user text files (.txt, .jsonl, .csv, .tsv) record by record, validating as we go.

Every problem is reported as `path:line: what is wrong (expected ...)`, because a user with a
100k-line file needs the line, not a pyarrow stack trace. Lines are read at most
`max_record_bytes` at a time, so one huge line (or a file without line breaks) is an error naming
its line, not gigabytes of memory and minutes of parsing.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from tunelab.errors import TunelabError

MAX_RECORD_BYTES = 1 << 20  # 1 MiB: far above any review or document line, far below a memory problem
TEXT_SUFFIXES = (".txt", ".text")
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
CSV_SUFFIXES = (".csv", ".tsv")
SUFFIXES = TEXT_SUFFIXES + JSON_SUFFIXES + CSV_SUFFIXES
LabelField = str | list[str] | tuple[str, ...] | None  # one target field, several (regression), or none
ReadTarget = Callable[[Any, str], Any]  # a raw target and where it is -> its canonical value (the problem's)


def as_text(value: Any, where: str) -> str:
    """The default target reader: a class name."""
    del where
    return str(value)


def check_file(path: str | Path, role: str) -> Path:
    """Return `path` as a Path if it is a readable file of a known format, else raise."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise TunelabError(f"{role}: file not found: {p} (expected an existing {'/'.join(SUFFIXES)} file)")
    if p.suffix.lower() not in SUFFIXES:
        raise TunelabError(f"{role}: unsupported file type {p.suffix!r} for {p} (expected one of {SUFFIXES})")
    return p


def file_stamp(path: Path) -> str:
    """A content fingerprint, so cached datasets are rebuilt when the file changes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _rest_of_line(f: BinaryIO) -> int:
    """Bytes up to the end of the line (its terminator not counted), read 1 MiB at a time."""
    size = 0
    while chunk := f.readline(1 << 20):
        if chunk.endswith(b"\n"):
            return size + len(chunk.rstrip(b"\r\n"))
        size += len(chunk)
    return size


def too_long(path: Path, lineno: int, size: int, max_bytes: int, at_least: bool = False) -> TunelabError:
    return TunelabError(
        f"{path}:{lineno}: record of {'more than ' if at_least else ''}{size:,} bytes exceeds "
        f"data.max_record_bytes={max_bytes:,} (expected records of at most that size, one per line; raise "
        "data.max_record_bytes for longer ones)"
    )


def _lines(path: Path, encoding_errors: str, max_bytes: int = MAX_RECORD_BYTES) -> Iterator[tuple[int, str]]:
    """Yield (line number, line); name the line when it is longer than `max_bytes` or not valid UTF-8."""
    with open(path, "rb") as f:
        lineno = 0
        while raw := f.readline(max_bytes + 2):  # the longest allowed line and its \r\n
            lineno += 1
            content = raw.rstrip(b"\r\n")
            if len(content) > max_bytes:
                rest = 0 if raw.endswith(b"\n") else _rest_of_line(f)
                raise too_long(path, lineno, len(content) + rest, max_bytes)
            try:
                yield lineno, content.decode("utf-8", errors=encoding_errors)
            except UnicodeDecodeError as e:
                raise TunelabError(
                    f"{path}:{lineno}: bytes that are not valid UTF-8 at column {e.start + 1} "
                    "(expected UTF-8 text; set data.encoding_errors=replace to replace them)"
                ) from None


def read_records(
    path: str | Path,
    text_field: str = "text",
    label_field: LabelField = "label",
    encoding_errors: str = "strict",
    extra_fields: tuple[str, ...] = (),
    max_record_bytes: int = MAX_RECORD_BYTES,
    read_target: ReadTarget = as_text,
) -> Iterator[dict]:
    """Yield `{"text", "label", "line", *extra_fields}` dicts; `label` only when `label_field` is set, as
    `read_target` (the problem's) reads it from the field's value (a list of values for several fields)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        if label_field is not None:
            raise TunelabError(
                f"{path}: plain-text files hold unlabelled lines, but data.label_field={label_field!r} "
                "(expected a .jsonl or .csv file for labelled data, or data.label_field=null)"
            )
        for lineno, line in _lines(path, encoding_errors, max_record_bytes):
            if line.strip():
                yield {"text": line, "line": lineno}
    elif suffix in JSON_SUFFIXES:
        for lineno, line in _lines(path, encoding_errors, max_record_bytes):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TunelabError(f"{path}:{lineno}: malformed JSON ({e.msg}; expected one JSON object per line)") from None
            if not isinstance(obj, dict):
                raise TunelabError(f"{path}:{lineno}: expected a JSON object per line, got {type(obj).__name__}")
            yield _record(obj, path, lineno, text_field, label_field, extra_fields, read_target)
    else:
        yield from _read_csv(path, text_field, label_field, encoding_errors, extra_fields, max_record_bytes,
                             read_target)


def _csv_lines(path: Path, encoding_errors: str, max_bytes: int, record: dict) -> Iterator[str]:
    """Lines for the csv reader, failing when the record being read (quoted fields may span lines) grows
    past `max_bytes`; the caller resets `record` after each row."""
    for lineno, line in _lines(path, encoding_errors, max_bytes):
        record.setdefault("start", lineno)
        record["size"] = record.get("size", -1) + len(line) + 1  # characters, and a line break between lines
        if record["size"] > max_bytes:
            raise too_long(path, record["start"], max_bytes, max_bytes, at_least=True)
        yield line


def _read_csv(path: Path, text_field: str, label_field: LabelField, encoding_errors: str,
              extra_fields: tuple[str, ...], max_record_bytes: int = MAX_RECORD_BYTES,
              read_target: ReadTarget = as_text) -> Iterator[dict]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    csv.field_size_limit(max(csv.field_size_limit(), max_record_bytes))  # the cap applies, not csv's 128 KiB
    record: dict = {}
    reader = csv.reader(_csv_lines(path, encoding_errors, max_record_bytes, record), delimiter=delimiter,
                        strict=True)
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as e:
        raise TunelabError(f"{path}:1: malformed CSV header ({e})") from None
    lineno = 1
    while True:
        record.clear()
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise TunelabError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
        lineno = reader.line_num
        if not row:
            continue
        if len(row) != len(header):
            raise TunelabError(
                f"{path}:{lineno}: malformed CSV row with {len(row)} fields (expected {len(header)}: {header})"
            )
        yield _record(dict(zip(header, row, strict=True)), path, lineno, text_field, label_field, extra_fields,
                      read_target)


def _record(obj: dict, path: Path, lineno: int, text_field: str, label_field: LabelField,
            extra_fields: tuple[str, ...] = (), read_target: ReadTarget = as_text) -> dict:
    text = obj.get(text_field)
    if not isinstance(text, str):
        found = sorted(obj)
        raise TunelabError(
            f"{path}:{lineno}: missing text field {text_field!r} (found fields {found}; set data.text_field)"
        )
    record = {"text": text, "line": lineno}
    if label_field is not None:
        record["label"] = read_target(target_value(obj, label_field, path, lineno), f"{path}:{lineno}")
    for name in extra_fields:
        if name not in obj:
            raise TunelabError(f"{path}:{lineno}: missing field {name!r} (found fields {sorted(obj)})")
        record[name] = str(obj[name])
    return record


def target_value(obj: dict, label_field: str | list[str] | tuple[str, ...], path: Path | str, lineno: int) -> Any:
    """The value of the target field, or the list of values of several target fields."""
    fields = [label_field] if isinstance(label_field, str) else list(label_field)
    for name in fields:
        if name not in obj or obj[name] is None or (isinstance(obj[name], str) and obj[name] == ""):
            raise TunelabError(
                f"{path}:{lineno}: missing label field {name!r} (found fields {sorted(obj)}; set data.label_field)"
            )
    return obj[fields[0]] if isinstance(label_field, str) else [obj[name] for name in fields]
