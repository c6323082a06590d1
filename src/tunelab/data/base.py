"""What every DataModule shares: named splits of a dataset, turned into loaders the same way."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from lightning import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, Sampler

from tunelab.errors import TunelabError


def eval_sampler(dataset: Dataset) -> Sampler | None:
    """Across ranks, evaluate every sample exactly once (Lightning's default pads with repeats)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    return UnrepeatedDistributedSampler(dataset, shuffle=False)


class IndexedDataset(Dataset):
    """Each sample plus `index`, its position in the split, so a task can look up per-sample caches."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.base[i], "index": i}


class SplitDataModule(LightningDataModule):
    """Holds `self.datasets[split]`; subclasses fill it in `setup` and may supply a collator."""

    modality: str = ""

    def __init__(self, batch_size: int, eval_batch_size: int | None, num_workers: int) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.labels: list[str] | None = None
        self.datasets: dict[str, Dataset] = {}
        # set by a task that looks samples up by position (the distillation teacher cache): batches get `index`
        self.with_index = False

    @property
    def num_classes(self) -> int:
        if self.labels is None:
            raise TunelabError("num_classes asked of data without labels (or before setup)")
        return len(self.labels)

    def collate_fn(self) -> Any:
        return None

    def loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            raise TunelabError(f"no {split} split (give data.{split}_file / a {split}/ folder, or a non-zero "
                               f"data.{split}_fraction)")
        dataset = IndexedDataset(self.datasets[split]) if self.with_index else self.datasets[split]
        return DataLoader(
            dataset,
            batch_size=self.batch_size if shuffle else self.eval_batch_size,
            shuffle=shuffle,
            sampler=None if shuffle else eval_sampler(dataset),
            collate_fn=self.collate_fn(),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self.loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.loader("test", shuffle=False)
