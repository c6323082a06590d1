"""Two DataModules as two domains: a labelled source and a target whose labels only score the model.

Any pair of the shared DataModules composes (two image-folder trees, two text files, two review
domains). Training draws one batch from each domain every step through Lightning's
`CombinedLoader`, giving `{"source": batch, "target": batch}`; the smaller domain cycles, so
domains of different sizes train for as long as the larger one. Validation and test keep the
domains apart (dataloader 0 is the source, 1 the target), so every metric exists per domain.

Text domains share one tokenizer: the model's own when it is pretrained, otherwise one WordPiece
vocabulary trained on the source and target training text together, so target words are not all
`[UNK]`.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Iterator
from typing import Any

from lightning import LightningDataModule
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader

from tunelab.contracts import SOURCE, TARGET
from tunelab.data.augment import TokenNoise
from tunelab.data.base import SplitDataModule, train_loader
from tunelab.data.tokenizer import cached_wordpiece
from tunelab.errors import TunelabError

DOMAINS = (SOURCE, TARGET)
TRAIN_MODES = ("max_size_cycle", "min_size")
NOISE_KEYS = ("drop", "replace", "swap")


@contextlib.contextmanager
def blame(role: str, dm: SplitDataModule) -> Iterator[None]:
    """Re-raise a side's errors with its own config keys: `data.train_file` -> `data.target.train_file`."""
    try:
        yield
    except TunelabError as e:
        keys = "|".join(p for p in inspect.signature(type(dm).__init__).parameters if p != "self")
        message = re.sub(rf"(?<![\w/.\-])data\.(?=(?:{keys})\b)", f"data.{role}.", str(e))
        if f"data.{role}." not in message:
            message = f"data.{role}: {message}"
        raise TunelabError(message) from None


def check_noise(token_noise: dict[str, float]) -> None:
    """Fail at start-up, not at the first training batch, on a misspelt key or a bad probability."""
    bad = sorted(set(token_noise) - set(NOISE_KEYS))
    if bad:
        raise TunelabError(f"data.token_noise: unknown key(s) {bad} (expected some of {list(NOISE_KEYS)})")
    for key, p in token_noise.items():
        if not 0.0 <= float(p) < 1.0:
            raise TunelabError(f"data.token_noise.{key}={p} (expected a probability in [0, 1))")


class DomainPairDataModule(LightningDataModule):
    """`source` and `target` DataModules of one modality and one label set."""

    def __init__(
        self,
        source: SplitDataModule,
        target: SplitDataModule,
        *,
        mode: str = "max_size_cycle",
        token_noise: dict[str, float] | None = None,
        noise_on: list[str] | tuple[str, ...] = DOMAINS,
        share_tokenizer: bool = True,
    ) -> None:
        super().__init__()
        self.source, self.target = source, target
        self.mode = mode
        self.token_noise = dict(token_noise or {})
        self.noise_on = tuple(noise_on)
        self.share_tokenizer = share_tokenizer
        self._ready = False

    def check_config(self) -> None:
        """Checked in `setup` (not `__init__`, where Hydra would wrap the error in its own)."""
        source, target = self.source, self.target
        if self.mode not in TRAIN_MODES:
            raise TunelabError(f"data.mode={self.mode!r} (expected one of {list(TRAIN_MODES)})")
        if source.modality != target.modality:
            raise TunelabError(
                f"data.target is {target.modality} data ({type(target).__name__}) but data.source is "
                f"{source.modality} data ({type(source).__name__}) (expected two domains of one modality)"
            )
        unknown = sorted(set(self.noise_on) - set(DOMAINS))
        if unknown:
            raise TunelabError(f"data.noise_on: unknown domain(s) {unknown} (expected a subset of {list(DOMAINS)})")
        if self.token_noise and self.modality != "text":
            raise TunelabError(
                f"data.token_noise applies to text, but the domains are {self.modality} data (augment images "
                "with data.source.augment / data.target.augment)"
            )
        check_noise(self.token_noise)

    # ----------------------------------------------------------------- what tasks read
    @property
    def modality(self) -> str | None:
        """The domains' common modality (None for a mixed pair, which `setup` rejects)."""
        return self.source.modality if self.source.modality == self.target.modality else None

    @property
    def labels(self) -> list[str] | None:
        return self.source.labels

    @property
    def problem(self) -> Any:
        return self.source.problem

    def use_problem(self, problem: Any) -> None:
        """One problem type for both domains, each with its own copy: each learns its own label set from its
        training split, and `setup` checks that the two agree."""
        import copy

        self.source.use_problem(problem)
        self.target.use_problem(copy.deepcopy(problem))

    @property
    def num_classes(self) -> int:
        return self.source.num_classes

    @property
    def tokenizer(self) -> Any:
        return getattr(self.source, "tokenizer", None)

    def sides(self) -> Iterator[tuple[str, SplitDataModule]]:
        yield from zip(DOMAINS, (self.source, self.target), strict=True)

    # ----------------------------------------------------------------- building
    def prepare_data(self) -> None:
        for role, dm in self.sides():
            with blame(role, dm):
                dm.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        """Idempotent: train.py calls it before the task exists, Lightning calls it again."""
        if self._ready:
            return
        self.check_config()
        if self.modality == "text" and self.share_tokenizer:
            self._share_tokenizer()
        for role, dm in self.sides():
            with blame(role, dm):
                dm.setup(stage)
        self._check_pair()
        self._ready = True

    def _share_tokenizer(self) -> None:
        """One vocabulary for both domains (see the module docstring)."""
        sources = {role: getattr(dm, "tokenizer_source", None) for role, dm in self.sides()}
        if any(sources.values()):
            if sources[SOURCE] != sources[TARGET]:
                raise TunelabError(
                    f"data.source.tokenizer={sources['source']!r} but data.target.tokenizer={sources['target']!r} "
                    "(expected one tokenizer for both domains)"
                )
            return
        trains = []
        for role, dm in self.sides():
            with blame(role, dm):
                trains.append(dm.read_splits()["train"])
        texts = (text for ds in trains for i in range(0, len(ds), 1000) for text in ds[i : i + 1000]["text"])
        tokenizer = cached_wordpiece(texts, key="+".join(ds._fingerprint for ds in trains),
                                     vocab_size=self.source.vocab_size, cache_dir=self.source.cache_dir)
        for _, dm in self.sides():
            dm.tokenizer_source = tokenizer

    def _check_pair(self) -> None:
        """Both domains labelled with one label set, and a target with data to adapt to."""
        for role, dm in self.sides():
            if dm.labels is None:
                raise TunelabError(
                    f"data.{role} has no labels (expected labelled data; the target's labels are never trained "
                    "on, they score the adapted model)"
                )
            if not len(dm.datasets.get("train", ())):
                raise TunelabError(f"data.{role}: the train split is empty (expected at least one example)")
        sizes = [getattr(dm, "data_config", {}).get("input_size") for _, dm in self.sides()]
        if sizes[0] != sizes[1]:
            raise TunelabError(
                f"data.source images are {sizes[0]} but data.target images are {sizes[1]} (expected one input "
                "size for both domains; set data.source.image_size and data.target.image_size alike)"
            )
        src, tgt = self.source.labels, self.target.labels
        if len(src) != len(tgt):
            raise TunelabError(
                f"data.source has {len(src)} classes {src} but data.target has {len(tgt)} classes {tgt} "
                "(expected the same classes in both domains)"
            )
        if src != tgt:
            raise TunelabError(
                f"data.source labels {src} differ from data.target labels {tgt} (expected the same label set "
                "in the same order; set data.source.labels / data.target.labels)"
            )

    # ----------------------------------------------------------------- loaders
    def _train_loader(self, role: str, dm: SplitDataModule) -> DataLoader:
        collate = dm.collate_fn()
        if self.token_noise and role in self.noise_on:
            collate = TokenNoise(collate, dm.tokenizer, **self.token_noise)
        dataset = dm.datasets["train"]
        ranks = self.trainer.world_size if self.trainer is not None else 1  # each rank gets its share
        return train_loader(
            dataset,
            stream=0 if role == SOURCE else 1,
            batch_size=dm.batch_size,
            drop_last=len(dataset) // ranks > dm.batch_size,  # no 1-sample batch for batch norm to choke on
            collate_fn=collate,
            num_workers=dm.num_workers,
            persistent_workers=dm.num_workers > 0,
        )

    def train_dataloader(self) -> CombinedLoader:
        return CombinedLoader({role: self._train_loader(role, dm) for role, dm in self.sides()}, mode=self.mode)

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("val")

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("test")

    def _eval_loaders(self, split: str) -> list[DataLoader]:
        """One loader per domain (source first), each blaming its own config on error."""
        loaders = []
        for role, dm in self.sides():
            with blame(role, dm):
                loaders.append(getattr(dm, f"{split}_dataloader")())
        return loaders
