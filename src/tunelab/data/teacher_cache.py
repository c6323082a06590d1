"""Teacher outputs for the training set, computed once and memory-mapped from disk.

A frozen teacher gives the same answer for the same input, yet distillation runs it on every training
batch of every epoch. The cache runs it once over the training split and keeps its logits (and the
hidden states the loss matches) as `.npy` files under `<cache_dir>/teacher_outputs/<key>/`, where the
key hashes the training inputs, the teacher's weights and what is kept; later epochs, runs and sweep
jobs read rows by sample index (`SplitDataModule.with_index`) instead of running the teacher. It only
holds when the inputs are the same every epoch, so random augmentation or masking is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from tunelab.contracts import ATTENTION_MASK, INDEX, INPUT_IDS, PIXEL_VALUES, Layer
from tunelab.data.base import IndexedDataset
from tunelab.errors import TunelabError
from tunelab.runs import processes

VERSION = "1"
INPUT_KEYS = (INPUT_IDS, ATTENTION_MASK, PIXEL_VALUES)


def array_name(layer: Layer) -> str:
    return "features" if layer == "features" else f"hidden_{layer}"


def check_static(dataset: Dataset, collate_fn: Callable[[list], dict] | None, samples: int = 4) -> None:
    """Draw the first samples twice: if the inputs differ, cached teacher outputs would be stale."""
    collate = collate_fn or torch.utils.data.default_collate
    items = range(min(samples, len(dataset)))  # type: ignore[arg-type]
    with torch.random.fork_rng(devices=[]):
        first, second = collate([dataset[i] for i in items]), collate([dataset[i] for i in items])
    for key in INPUT_KEYS:
        if key in first and not torch.equal(torch.as_tensor(first[key]), torch.as_tensor(second[key])):
            raise TunelabError(
                f"task.cache_teacher=true needs training inputs that are the same every epoch, but the training "
                f"data gives a different {key!r} each time a sample is drawn (random augmentation or masking): set "
                "task.cache_teacher=false, or turn the randomness off (images: "
                "data.augment={scale:[1.0,1.0],ratio:[1.0,1.0],hflip:0.0,color_jitter:null})"
            )


def content_key(dataset: Dataset) -> str:
    """The training inputs' identity: a `datasets` fingerprint when there is one, else a hash of every sample."""
    fingerprint = getattr(dataset, "_fingerprint", None)
    if fingerprint:
        return f"datasets:{fingerprint}"
    h = hashlib.sha256()
    for i in range(len(dataset)):  # type: ignore[arg-type]
        item = dataset[i]
        for key in INPUT_KEYS:
            if key in item:
                h.update(key.encode())
                h.update(np.ascontiguousarray(torch.as_tensor(item[key]).numpy()).tobytes())
    return f"items:{h.hexdigest()}"


class TeacherCache:
    """Read-only memory-mapped teacher outputs, looked up by the `index` a batch carries."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.meta = json.loads((folder / "meta.json").read_text())
        self.arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in self.meta["arrays"]}

    def __len__(self) -> int:
        return int(self.meta["samples"])

    def lookup(self, index: torch.Tensor, device: torch.device, seq_len: int | None = None) -> dict[str, torch.Tensor]:
        """Rows for `index` (fancy indexing copies them out of the map), cut to the batch's sequence length."""
        rows = index.cpu().numpy()
        out = {}
        for name, array in self.arrays.items():
            values = array[rows]
            if values.ndim == 3 and seq_len is not None:
                values = values[:, :seq_len]
            out[name] = torch.from_numpy(np.ascontiguousarray(values)).to(device=device, dtype=torch.float32)
        return out


def cache_folder(cache_dir: str | Path, dataset_key: str, teacher_key: str, layers: Sequence[Layer]) -> Path:
    names = sorted(array_name(layer) for layer in layers)
    digest = hashlib.sha256(json.dumps([VERSION, dataset_key, teacher_key, names]).encode()).hexdigest()[:24]
    return Path(cache_dir) / "teacher_outputs" / digest


def load_or_build(teacher: Any, dataset: Dataset, collate_fn: Callable | None, batch_size: int,
                  layers: Sequence[Layer], cache_dir: str | Path, build: bool = True) -> TeacherCache:
    """The cache for this (data, teacher, layers), built first when missing and `build` (rank zero) is set."""
    folder = cache_folder(cache_dir, content_key(dataset), teacher.fingerprint(), layers)
    if not (folder / "meta.json").is_file() and build:
        with torch.random.fork_rng(devices=[]):  # training draws the same random numbers with or without a build
            _build(teacher, dataset, collate_fn, batch_size, layers, folder)
    return TeacherCache(folder)


def _building_prefix() -> str:
    """Half-built caches are named by host and pid, so a later build can tell a killed build from a live one."""
    return f".building-{socket.gethostname()}-"


def sweep_abandoned(parent: Path) -> None:
    """Remove the half-built caches of processes on this machine that were killed while building them."""
    prefix = _building_prefix()
    for tmp in parent.glob(f"{prefix}*"):
        if not processes.other_alive(tmp.name[len(prefix):].split("-", 1)[0]):
            shutil.rmtree(tmp, ignore_errors=True)


def _build(teacher: Any, dataset: Dataset, collate_fn: Callable | None, batch_size: int,
           layers: Sequence[Layer], folder: Path) -> None:
    """Run the teacher over the split in order and write each output into its memory map; publish atomically."""
    n = len(dataset)  # type: ignore[arg-type]
    text = teacher.modality == "text"
    seq_len = max(len(dataset[i][INPUT_IDS]) for i in range(n)) if text and any(
        layer != "features" for layer in layers) else 0
    folder.parent.mkdir(parents=True, exist_ok=True)
    sweep_abandoned(folder.parent)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f"{_building_prefix()}{os.getpid()}-"))
    try:
        shapes = {"logits": ((n, teacher.num_classes), np.float32)}
        for layer in layers:
            shape = (n, teacher.width()) if layer == "features" else (n, seq_len, teacher.width())
            shapes[array_name(layer)] = (shape, np.float32 if layer == "features" else np.float16)
        arrays = {name: np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
                  for name, (shape, dtype) in shapes.items()}
        loader = DataLoader(IndexedDataset(dataset), batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
        hidden = any(layer != "features" for layer in layers)
        for batch in loader:
            rows = batch.pop(INDEX).numpy()
            batch = {k: v.to(teacher.device) for k, v in batch.items() if torch.is_tensor(v)}
            out = teacher(batch, output_hidden_states=hidden)
            arrays["logits"][rows] = out.logits.float().cpu().numpy()
            for layer in layers:
                value = out.features if layer == "features" else out.hidden_states[int(layer)]
                value = value.float().cpu().numpy()
                target = arrays[array_name(layer)]
                if value.ndim == 3:
                    target[rows, : value.shape[1]] = value
                else:
                    target[rows] = value
        for array in arrays.values():
            array.flush()
        meta = {"version": VERSION, "samples": n, "arrays": sorted(arrays), "teacher": teacher.source,
                "seq_len": seq_len}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        del arrays
        try:
            os.replace(tmp, folder)
        except OSError:  # another run published the same cache first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
