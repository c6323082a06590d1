"""What every DataModule shares: named splits of a dataset, turned into loaders the same way."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from tunelab.contracts import INDEX
from tunelab.errors import TunelabError


def eval_sampler(dataset: Dataset) -> Sampler | None:
    """Across ranks, evaluate every sample exactly once (Lightning's default pads with repeats)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    return UnrepeatedDistributedSampler(dataset, shuffle=False)


class EpochShuffle(Sampler[int]):
    """A random order per epoch that depends on (seed, epoch) alone, and can resume in the middle.

    Lightning calls `set_epoch` before each epoch; the order is drawn on the first index asked for, so a
    resumed run gets the same order as the uninterrupted run whatever else drew random numbers. Its
    state (epoch, samples handed out) travels in the checkpoint through `StatefulDataLoader`.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed = size, seed
        self.epoch, self.yielded, self._skip = 0, 0, 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self._skip = epoch, 0

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        # within a signed 64-bit seed: an unseeded process's initial seed times the multiplier overflows it
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % (1 << 63))
        order = torch.randperm(self.size, generator=generator).tolist()
        self.yielded, self._skip = self._skip, 0
        for index in order[self.yielded:]:
            self.yielded += 1
            yield index

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "yielded": self.yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self._skip = state["epoch"], state["yielded"]

    def restart_epoch(self) -> None:
        """Forget a loaded position: the checkpoint was taken at the end of an epoch."""
        self._skip = 0


def train_loader(dataset: Dataset, stream: int = 0, **kwargs: Any) -> StatefulDataLoader:
    """A shuffling loader that can stop and resume mid-epoch: Lightning saves its position in every
    checkpoint. The order comes from the run's seed (plus `stream` for a second loader of the same run)
    and the epoch, and the workers' seeds from the loader's own generator: neither takes a number from
    the global RNG, whose state the checkpoint restores exactly."""
    seed = (torch.initial_seed() + stream) % (1 << 63)
    return StatefulDataLoader(dataset, sampler=EpochShuffle(len(dataset), seed),
                              generator=torch.Generator().manual_seed(seed), **kwargs)


class IndexedDataset(Dataset):
    """Each sample plus `index`, its position in the split, so a task can look up per-sample caches."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.base[i], INDEX: i}


class SplitDataModule(LightningDataModule):
    """Holds `self.datasets[split]`; subclasses fill it in `setup` and may supply a collator.

    `embedded` names the folder of an embedded dataset the files live in (`${embedded:reviews,...}` in
    conf/data): `prepare_data` generates it unless a complete copy is there. Lightning calls that once per
    node before `setup`; the generation is atomic, so ranks that call it too are safe. Reading makes sure of
    it as well (a marker check once prepared), so a DataModule set up directly (tests, notebooks) finds the
    same files.
    """

    modality: str = ""

    def __init__(self, batch_size: int, eval_batch_size: int | None, num_workers: int,
                 embedded: str | None = None) -> None:
        super().__init__()
        self.embedded = Path(embedded) if embedded else None
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.labels: list[str] | None = None  # the problem's output names once set up
        self.problem: Any = None  # what the targets are (`tunelab.problems`), given by `use_problem`
        self.datasets: dict[str, Dataset] = {}
        # set by a task that looks samples up by position (the distillation teacher cache): batches get `index`
        self.with_index = False

    def prepare_data(self) -> None:
        self.ensure_embedded()

    def ensure_embedded(self) -> None:
        """Generate the embedded dataset this DataModule reads, unless a complete copy is there."""
        if self.embedded is None:
            return
        from tunelab.data.embedded import NAMES, ensure

        if self.embedded.name not in NAMES:
            raise TunelabError(f"data.embedded={self.embedded}: not an embedded dataset's folder (expected "
                               f"<data_dir>/<name>, the name one of {', '.join(NAMES)})")
        ensure(self.embedded.name, self.embedded.parent)

    @property
    def num_classes(self) -> int:
        if self.labels is None:
            raise TunelabError("num_classes asked of data without labels (or before setup)")
        return len(self.labels)

    def use_problem(self, problem: Any) -> None:
        """Read and encode targets as `problem` says; set before `setup` (a set-up DataModule keeps its own)."""
        if not self.datasets:
            self.problem = problem

    def collate_fn(self) -> Any:
        return None

    def loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            raise TunelabError(f"no {split} split (give data.{split}_file / a {split}/ folder, or a non-zero "
                               f"data.{split}_fraction)")
        dataset = IndexedDataset(self.datasets[split]) if self.with_index else self.datasets[split]
        common = {"collate_fn": self.collate_fn(), "num_workers": self.num_workers,
                  "persistent_workers": self.num_workers > 0}
        if shuffle:
            return train_loader(dataset, batch_size=self.batch_size, **common)
        return DataLoader(dataset, batch_size=self.eval_batch_size, sampler=eval_sampler(dataset), **common)

    def train_dataloader(self) -> DataLoader:
        return self.loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.loader("test", shuffle=False)
