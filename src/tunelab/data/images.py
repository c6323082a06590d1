"""The image DataModule: class-per-folder trees in, `pixel_values`/`labels` batches out.

Transforms come from timm's data config for the chosen model, so a pretrained model sees the size
and normalisation it was trained with; `image_size` and the augmentation knobs override it.
Each image file is read whole to decode it, so files above `max_file_bytes` are refused up front.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Subset
from torchvision.datasets import ImageFolder

from tunelab.contracts import LABELS, PIXEL_VALUES
from tunelab.data.base import SplitDataModule
from tunelab.errors import TunelabError

SPLITS = ("train", "val", "test")
MAX_FILE_BYTES = 64 << 20  # 64 MiB: a large photograph is a few MiB


class _DictDataset(Dataset):
    """Turn `(image, target)` pairs into the project's batch keys."""

    def __init__(self, base: Dataset, transform: Any) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image, target = self.base[i]
        return {PIXEL_VALUES: self.transform(image), LABELS: torch.tensor(target)}


def _check_sizes(folder: ImageFolder, max_bytes: int) -> None:
    """Refuse files too large to read into memory before any is read (a stat per file, no reading)."""
    for path, _ in folder.samples:
        size = Path(path).stat().st_size
        if size > max_bytes:
            raise TunelabError(
                f"{path}: image file of {size:,} bytes exceeds data.max_file_bytes={max_bytes:,} (expected "
                "image files of at most that size; raise data.max_file_bytes for larger ones)"
            )


def _verify_images(folder: ImageFolder) -> None:
    """Decode headers up front: a corrupt file should stop the run before training, naming the file."""
    for path, _ in folder.samples:
        try:
            with Image.open(path) as im:
                im.verify()
        except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
            raise TunelabError(f"{path}: cannot decode image ({e}; expected a readable image file)") from None


class ImageFolderDataModule(SplitDataModule):
    """`root/{train,val,test}/<class>/*.png` or one class tree split with a seed."""

    modality = "image"

    def __init__(
        self,
        root: str,
        *,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
        model_name: str | None = None,
        image_size: int | None = None,
        augment: dict | None = None,
        verify_images: bool = True,
        max_file_bytes: int = MAX_FILE_BYTES,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        embedded: str | None = None,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, embedded)
        self.root = Path(root).expanduser()
        self.val_fraction, self.test_fraction, self.seed = val_fraction, test_fraction, seed
        self.model_name, self.image_size = model_name, image_size
        self.augment = dict(augment or {})
        self.verify_images = verify_images
        self.max_file_bytes = max_file_bytes

    @property
    def data_config(self) -> dict[str, Any]:
        """timm's resolved data config (input size, mean, std, interpolation, crop) for the model."""
        pretrained_cfg = {"input_size": (3, 224, 224), "mean": timm.data.IMAGENET_DEFAULT_MEAN,
                          "std": timm.data.IMAGENET_DEFAULT_STD}
        if self.model_name:
            cfg = timm.models.get_pretrained_cfg(self.model_name)
            pretrained_cfg = cfg.to_dict() if cfg is not None else pretrained_cfg
        config = timm.data.resolve_data_config(pretrained_cfg=pretrained_cfg)
        if self.image_size:
            config["input_size"] = (3, self.image_size, self.image_size)
        return config

    def _folder(self, path: Path, role: str) -> ImageFolder:
        if not path.is_dir():
            raise TunelabError(f"{role}: folder not found: {path} (expected <class>/<image> sub-folders)")
        try:
            folder = ImageFolder(str(path))
        except (FileNotFoundError, RuntimeError) as e:
            raise TunelabError(f"{role}: {path} holds no images in class folders ({e})") from None
        _check_sizes(folder, self.max_file_bytes)
        if self.verify_images:
            _verify_images(folder)
        return folder

    def _check_problem(self) -> None:
        """Class folders hold one class per image: single-label classification."""
        from tunelab.problems.classification import Classification

        if self.problem is None:
            self.problem = Classification()
        if self.problem.name != "classification":
            raise TunelabError(f"data.root: class folders give one class per image, not problem={self.problem.name} "
                               "targets (expected problem=classification, or data=image_list with a target field)")

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        self.ensure_embedded()
        split_dirs = {s: self.root / s for s in SPLITS if (self.root / s).is_dir()}
        if "train" in split_dirs:
            folders = {s: self._folder(p, f"data.root/{s}") for s, p in split_dirs.items()}
        else:
            folders = {"train": self._folder(self.root, "data.root")}
        self._check_problem()
        self.labels = list(folders["train"].classes)
        self.problem.fit(self.labels, "data.root", labels=self.labels)
        if len(self.labels) < 2:  # nothing to classify; torchmetrics would fail later on its arguments
            raise TunelabError(
                f"data.root: found {len(self.labels)} class {self.labels} in {folders['train'].root} "
                "(expected at least two class folders, one per label)"
            )
        for split, folder in folders.items():
            if folder.classes != self.labels:
                raise TunelabError(
                    f"{self.root / split}: classes {folder.classes} differ from train classes {self.labels}"
                )
        subsets = self._split(folders)
        config = self.data_config
        train_tf = timm.data.create_transform(**config, is_training=True, **self.augment)
        eval_tf = timm.data.create_transform(**config, is_training=False)
        for split, ds in subsets.items():
            if len(ds) == 0:
                raise TunelabError(f"the {split} split of {self.root} is empty (expected at least one image)")
            self.datasets[split] = _DictDataset(ds, train_tf if split == "train" else eval_tf)

    def _split(self, folders: dict[str, ImageFolder]) -> dict[str, Dataset]:
        """Carve missing val/test splits out of train, seeded so every run sees the same split."""
        train: Dataset = folders["train"]
        out: dict[str, Dataset] = {s: f for s, f in folders.items() if s != "train"}
        missing = {s: f for s, f in (("val", self.val_fraction), ("test", self.test_fraction)) if s not in out and f > 0}
        if missing:
            g = torch.Generator().manual_seed(self.seed)
            order = torch.randperm(len(train), generator=g).tolist()
            start = 0
            for split, fraction in missing.items():
                n = int(round(fraction * len(order)))
                out[split] = Subset(train, order[start : start + n])
                start += n
            train = Subset(train, order[start:])
        out["train"] = train
        return out
