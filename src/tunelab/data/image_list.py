"""The image-list DataModule: a CSV/TSV/JSONL file of image paths and targets in, `pixel_values`/`labels` out.

Class folders can only say "one class per image"; a list file gives each image any target the problem reads
(a class, one or several real values, a set of labels). Records are read by `readers` (same formats, line
numbers and size cap as text data); transforms come from timm's data config for the model, exactly as for
`ImageFolderDataModule`, so the exported model records the preprocessing it was trained with. Every listed
image is checked (exists, size cap, decodes) before training, and a bad one is named by its list line.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from tunelab.contracts import LABELS, PIXEL_VALUES
from tunelab.data.base import SplitDataModule
from tunelab.data.images import MAX_FILE_BYTES, ImageFolderDataModule
from tunelab.data.readers import MAX_RECORD_BYTES, LabelField, check_file, read_records
from tunelab.errors import TunelabError
from tunelab.problems import Problem

SPLITS = ("train", "val", "test")
DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError)


@dataclass
class Item:
    """One listed image: where it was listed (`file:line`), its resolved path and its (read) target."""

    where: str
    path: Path
    target: Any


class ImageListDataset(Dataset):
    """Listed images opened as RGB (as torchvision's ImageFolder opens them) with their encoded targets."""

    def __init__(self, paths: list[Path], targets: list[Any], transform: Any) -> None:
        self.paths, self.transform = paths, transform
        self.targets = [torch.tensor(t) for t in targets]  # int64 class ids, float32 values or multi-hot rows

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        with Image.open(self.paths[i]) as image:
            pixels = self.transform(image.convert("RGB"))
        return {PIXEL_VALUES: pixels, LABELS: self.targets[i]}


def fields_of(label_field: LabelField) -> list[str]:
    """The target field names: one, or several (regression with several targets)."""
    if label_field is None or isinstance(label_field, str):
        return [label_field] if label_field else []
    return [str(name) for name in label_field]


def check_image(item: Item, max_bytes: int, verify: bool) -> None:
    """The listed file exists, fits the size cap and (with `verify`) decodes: a stat and a header read."""
    try:
        size = item.path.stat().st_size
    except OSError:
        raise TunelabError(f"{item.where}: image file not found: {item.path} (expected an existing image file; "
                           "relative paths are read from the list file's folder)") from None
    if size > max_bytes:
        raise TunelabError(f"{item.where}: image file {item.path} of {size:,} bytes exceeds data.max_file_bytes="
                           f"{max_bytes:,} (expected image files of at most that size; raise data.max_file_bytes)")
    if verify:
        try:
            with Image.open(item.path) as image:
                image.verify()
        except DECODE_ERRORS as e:
            raise TunelabError(f"{item.where}: cannot decode image {item.path} ({e}; expected a readable image "
                               "file)") from None


def seeded_split(items: list[Item], fractions: dict[str, float], seed: int) -> dict[str, list[Item]]:
    """Carve `fractions` of `items` out in a seeded order (the same for every run); the rest is "train"."""
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    out, start = {}, 0
    for split, fraction in fractions.items():
        n = int(round(fraction * len(order)))
        out[split] = [items[i] for i in order[start : start + n]]
        start += n
    out["train"] = [items[i] for i in order[start:]]
    return out


class ImageListDataModule(SplitDataModule):
    """Train/val/test image lists, or a seeded split of the training list; any problem's targets."""

    modality = "image"
    data_config = ImageFolderDataModule.data_config  # the same resolution: exports record the same preprocessing

    def __init__(
        self,
        train_file: str,
        val_file: str | None = None,
        test_file: str | None = None,
        *,
        image_field: str = "image",
        label_field: LabelField = "label",
        labels: Sequence[str] | None = None,
        problem: Problem | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
        model_name: str | None = None,
        image_size: int | None = None,
        augment: dict | None = None,
        verify_images: bool = True,
        max_file_bytes: int = MAX_FILE_BYTES,
        max_record_bytes: int = MAX_RECORD_BYTES,
        encoding_errors: str = "strict",
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers)
        self.files = {"train": train_file, "val": val_file, "test": test_file}
        self.image_field, self.fields = image_field, fields_of(label_field)
        self.label_field = self.fields[0] if isinstance(label_field, str) else self.fields
        self.fixed_labels = [str(x) for x in labels] if labels is not None else None
        self.problem = problem
        self.val_fraction, self.test_fraction, self.seed = val_fraction, test_fraction, seed
        self.model_name, self.image_size = model_name, image_size
        self.augment = dict(augment or {})
        self.verify_images, self.max_file_bytes = verify_images, max_file_bytes
        self.max_record_bytes, self.encoding_errors = max_record_bytes, encoding_errors

    # ----------------------------------------------------------------- building
    def setup(self, stage: str | None = None) -> None:
        """Idempotent: train.py calls it before the task exists, Lightning calls it again."""
        if self.datasets:
            return
        self._check_options()
        if self.problem is None:
            from tunelab.problems.classification import Classification

            self.problem = Classification()
        splits = self.read_splits()
        self.problem.fit([item.target for item in splits["train"]], f"data.train_file: {self.files['train']}",
                         labels=self.fixed_labels, fields=self.fields)
        self.labels = list(self.problem.outputs)
        config = self.data_config
        train_tf = timm.data.create_transform(**config, is_training=True, **self.augment)
        eval_tf = timm.data.create_transform(**config, is_training=False)
        for split, items in splits.items():
            targets = [self.problem.encode(item.target, item.where) for item in items]
            self.datasets[split] = ImageListDataset([item.path for item in items], targets,
                                                    train_tf if split == "train" else eval_tf)

    def _check_options(self) -> None:
        """Checked in `setup` (outside Hydra's instantiate, which would wrap the message)."""
        if not self.fields:
            raise TunelabError("data.label_field is empty (expected the field holding each image's target, or a "
                               "list of fields for several regression targets)")
        if self.encoding_errors not in ("strict", "replace", "ignore"):
            raise TunelabError(f"data.encoding_errors={self.encoding_errors!r} (expected strict, replace or ignore)")
        for split, fraction in (("val", self.val_fraction), ("test", self.test_fraction)):
            if not 0 <= fraction < 1:
                raise TunelabError(f"data.{split}_fraction={fraction} (expected a fraction in [0, 1))")

    def read_splits(self) -> dict[str, list[Item]]:
        """Each split's checked items: its own list file, or a seeded share of the training list."""
        splits = {s: self._read(s) for s in SPLITS if self.files[s]}
        carve = {s: f for s, f in (("val", self.val_fraction), ("test", self.test_fraction))
                 if s not in splits and f > 0}
        if carve:
            splits.update(seeded_split(splits["train"], carve, self.seed))
        for split, items in splits.items():
            if not items:
                raise TunelabError(f"the {split} split is empty (check data.{split}_file or data.{split}_fraction)")
        return splits

    def _read(self, split: str) -> list[Item]:
        """The records of `data.<split>_file` as items, every image checked."""
        path = check_file(self.files[split], f"data.{split}_file")
        items = [Item(f"{path}:{r['line']}", self._image_path(r["text"], path, r["line"]), r["label"])
                 for r in self._records(path)]
        if not items:
            raise TunelabError(f"data.{split}_file: {path} holds no records (expected at least one non-empty line)")
        for item in items:
            check_image(item, self.max_file_bytes, self.verify_images)
        return items

    def _records(self, path: Path) -> Iterator[dict]:
        """`readers.read_records` with the image field as its text field; its messages name the image field."""
        try:
            yield from read_records(path, self.image_field, self.label_field, self.encoding_errors, (),
                                    self.max_record_bytes, self.problem.read_target)
        except TunelabError as e:
            if f"missing text field {self.image_field!r}" not in str(e):
                raise
            raise TunelabError(str(e).replace("text field", "image field").replace(
                "data.text_field", "data.image_field")) from None

    @staticmethod
    def _image_path(value: str, list_file: Path, line: int) -> Path:
        """A listed path; a relative one is read from the list file's folder (the list travels with its images)."""
        if not value.strip():
            raise TunelabError(f"{list_file}:{line}: empty image path (expected the path of an image file)")
        image = Path(value.strip()).expanduser()
        return image if image.is_absolute() else list_file.parent / image
