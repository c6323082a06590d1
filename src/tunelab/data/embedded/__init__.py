"""Embedded datasets, generated once into a cache folder and then read by the ordinary file loaders.

They ship as code rather than files so the project runs offline and its tests need no downloads;
being deterministic, every generation of a given VERSION is byte-identical.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from tunelab.data.embedded import digits, reviews

MARKER = ".complete"
ABANDONED_AFTER_S = 3600

_GENERATORS: dict[str, tuple[Callable[[Path], None], str]] = {
    "reviews": (reviews.generate, reviews.VERSION),
    "digits": (digits.generate_digits, digits.VERSION),
    "digits_m": (digits.generate_digits_m, digits.VERSION),
}
NAMES = tuple(_GENERATORS)

__all__ = ["MARKER", "NAMES", "ensure", "folder", "reviews_test"]


def folder(name: str, root: str | Path) -> Path:
    """Where the embedded dataset `name` lives under `root` (`<root>/<name>`); nothing is generated."""
    if name not in _GENERATORS:
        raise ValueError(f"unknown embedded dataset {name!r}; valid names: {', '.join(NAMES)}")
    return Path(root) / name


def ensure(name: str, root: str | Path) -> Path:
    """Return `<root>/<name>`, generating it first unless a complete copy of this version is there.

    Generation happens in a temporary sibling folder that is renamed into place only when finished, so
    a killed run or two concurrent runs never leave a half-written dataset behind.
    """
    target = folder(name, root)
    generate, version = _GENERATORS[name]
    if _is_complete(target, version):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _sweep_abandoned(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the installed dataset should be readable like its siblings
    installed = False
    try:
        generate(tmp)
        (tmp / MARKER).write_text(version + "\n", encoding="utf-8")
        installed = _install(tmp, target, version)
    finally:
        if not installed:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def reviews_test(cache_dir: str | Path = ".cache") -> Path:
    """The embedded reviews' test split in the project's cache (`TUNELAB_CACHE_DIR` if set, else `cache_dir`):
    what the tools outside a Hydra run (the pipeline's table, the benchmarks) measure on."""
    cache = Path(os.environ.get("TUNELAB_CACHE_DIR", cache_dir)) / "data"
    return ensure("reviews", cache) / "all" / "test.jsonl"


def _sweep_abandoned(target: Path) -> None:
    """Delete temporary folders of killed generations (those take seconds, so an hour-old one is dead)."""
    cutoff = time.time() - ABANDONED_AFTER_S
    for path in target.parent.glob(f".{target.name}.*"):
        with contextlib.suppress(OSError):
            if path.suffix in (".tmp", ".old") and path.stat().st_mtime < cutoff:
                shutil.rmtree(path, ignore_errors=True)


def _is_complete(folder: Path, version: str) -> bool:
    try:
        return (folder / MARKER).read_text(encoding="utf-8").strip() == version
    except OSError:
        return False


def _install(tmp: Path, target: Path, version: str) -> bool:
    """Rename `tmp` to `target`; False if another process installed a complete copy first."""
    for _ in range(5):
        try:
            os.replace(tmp, target)
            return True
        except OSError:
            if _is_complete(target, version):
                return False
            _discard(target)
    raise RuntimeError(f"could not install {target}: it keeps reappearing incomplete")


def _discard(folder: Path) -> None:
    """Move a stale or partial copy aside, then delete it; another process may already have done so."""
    aside = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}.old")
    try:
        os.replace(folder, aside)
    except FileNotFoundError:
        return
    shutil.rmtree(aside, ignore_errors=True)
