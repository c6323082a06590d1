"""The text DataModule: files in, tokenized dict batches out, for every text task.

Records are read and validated by `readers`, stored with Hugging Face `datasets` (Arrow on disk,
memory-mapped, cached by file content) and tokenized once with a cached `map`. Labelled data
(`label_field` set) gives `labels`; unlabelled data (`label_field: null`) feeds MLM, packed into
full blocks (`pack`, see `packing`) and masked by a `collator` (see `collators`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import datasets
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from tunelab.contracts import LABELS
from tunelab.data import packing
from tunelab.data.base import SplitDataModule
from tunelab.data.readers import MAX_RECORD_BYTES, LabelField, as_text, check_file, file_stamp, read_records
from tunelab.data.tokenizer import cached_wordpiece, load_tokenizer
from tunelab.errors import TunelabError
from tunelab.problems import Problem

SPLITS = ("train", "val", "test")


def _generate(path: str, text_field: str, label_field: LabelField, encoding_errors: str, stamp: str,
              domain_field: str | None, domains: list[str] | None,
              max_record_bytes: int = MAX_RECORD_BYTES, read_target: Callable = as_text) -> Iterator[dict]:
    """Module-level generator so `datasets` can fingerprint it; `stamp` ties the cache to the file's content."""
    del stamp
    extra = (domain_field,) if domains else ()
    for record in read_records(path, text_field, label_field, encoding_errors, extra, max_record_bytes,
                               read_target):
        if not domains or record.pop(domain_field) in domains:
            yield record


def _tokenize(batch: dict, tokenizer: PreTrainedTokenizerBase, max_length: int) -> dict:
    enc = tokenizer(batch["text"], truncation=True, max_length=max_length, return_token_type_ids=False)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _tokenize_words(batch: dict, tokenizer: PreTrainedTokenizerBase, max_length: int) -> dict:
    """`_tokenize` plus `word_starts`, for whole-word masking with tokenizers that have no `##` pieces."""
    enc = tokenizer(batch["text"], truncation=True, max_length=max_length, return_token_type_ids=False)
    starts = [packing.word_starts(enc[i], len(ids)) for i, ids in enumerate(enc["input_ids"])]
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "word_starts": starts}


def with_unlabelled(train: datasets.Dataset, unlabelled: datasets.Dataset, missing: Any) -> datasets.Dataset:
    """Training records followed by unlabelled ones (`labels` the problem's `missing()`): a transfer set for
    distillation, whose teacher labels what has no label."""
    unlabelled = unlabelled.add_column(LABELS, [missing] * len(unlabelled))
    return datasets.concatenate_datasets([train, unlabelled.cast(train.features)])


def per_class_subset(ds: datasets.Dataset, per_class: int, seed: int) -> datasets.Dataset:
    """At most `per_class` records of each label, drawn with `seed` (few-shot subsets)."""
    shuffled = ds.shuffle(seed=seed)
    seen: Counter[str] = Counter()
    keep = []
    for i, label in enumerate(shuffled["label"]):
        if seen[label] < per_class:
            seen[label] += 1
            keep.append(i)
    return shuffled.select(keep)


class TextDataModule(SplitDataModule):
    """Train/val/test text from separate files, or a seeded split of the training file."""

    modality = "text"

    def __init__(
        self,
        train_file: str,
        val_file: str | None = None,
        test_file: str | None = None,
        *,
        text_field: str = "text",
        label_field: LabelField = "label",
        labels: list[str] | None = None,
        problem: Problem | None = None,
        domains: list[str] | None = None,
        domain_field: str = "domain",
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
        limit_train: int | None = None,
        limit_train_per_class: int | None = None,
        limit_val_per_class: int | None = None,
        unlabelled_file: str | None = None,
        limit_unlabelled: int | None = None,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        trust_remote_code: bool = False,
        vocab_size: int = 8000,
        max_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        encoding_errors: str = "strict",
        max_record_bytes: int = MAX_RECORD_BYTES,
        cache_dir: str = ".cache",
        pack: bool = False,
        collator: Callable[..., Any] | None = None,
        num_proc: int | None = None,
        embedded: str | None = None,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, embedded)
        if encoding_errors not in ("strict", "replace", "ignore"):
            raise TunelabError(f"data.encoding_errors={encoding_errors!r} (expected strict, replace or ignore)")
        self.files = {"train": train_file, "val": val_file, "test": test_file}
        self.text_field = text_field
        self.label_field = list(label_field) if isinstance(label_field, list | tuple) else label_field
        self.fixed_labels = [str(x) for x in labels] if labels is not None else None
        self.labels: list[str] | None = None
        if problem is None and self.labelled:
            from tunelab.problems.classification import Classification

            problem = Classification()
        self.problem = problem

        self.domains = [str(d) for d in domains] if domains else None
        self.domain_field = domain_field
        self.val_fraction, self.test_fraction, self.seed = val_fraction, test_fraction, seed
        self.limit_train = limit_train
        self.limit_train_per_class = limit_train_per_class
        self.limit_val_per_class = limit_val_per_class  # few-shot protocol: a validation set as small as training
        self.unlabelled_file, self.limit_unlabelled = unlabelled_file, limit_unlabelled
        self.pack, self.collator_factory, self.num_proc = pack, collator, num_proc
        self.masking: Any = None
        self.tokenizer_source, self.trust_remote_code, self.vocab_size = tokenizer, trust_remote_code, vocab_size
        self.max_length, self.encoding_errors = max_length, encoding_errors
        self.max_record_bytes = max_record_bytes
        self.cache_dir = Path(cache_dir)
        self.tokenizer: PreTrainedTokenizerBase | None = None

    # ----------------------------------------------------------------- what tasks read
    @property
    def labelled(self) -> bool:
        return self.label_field is not None

    def use_problem(self, problem: Problem) -> None:
        """Unlabelled text (`label_field: null`) has no targets to read."""
        if self.labelled:
            super().use_problem(problem)

    # ----------------------------------------------------------------- building
    def setup(self, stage: str | None = None) -> None:
        """Idempotent: train.py calls it before the task exists, Lightning calls it again."""
        if self.datasets:
            return
        self._check_options()
        raw = self.read_splits()
        self.tokenizer = self._tokenizer(raw["train"])
        if self.collator_factory is not None:  # built now so its settings fail before any tokenizing
            self.masking = self.collator_factory(tokenizer=self.tokenizer)
        unlabelled = raw.pop("unlabelled", None)
        for split, ds in raw.items():
            if self.labelled:
                ds = self._encode_labels(ds, split)
            if split == "train" and unlabelled is not None:
                ds = with_unlabelled(ds, unlabelled, self.problem.missing())
            self.datasets[split] = self._packed(ds, split) if self.pack else self._tokenized(ds)

    def _check_options(self) -> None:
        """Checked in `setup` (outside Hydra's instantiate, which would wrap the message)."""
        for split in ("train", "val"):
            per_class = getattr(self, f"limit_{split}_per_class")
            if per_class is not None and (not self.labelled or per_class < 1):
                raise TunelabError(f"data.limit_{split}_per_class={per_class} (expected a positive count of records "
                                   "per label, with labelled data)")
        if self.unlabelled_file and not self.labelled:
            raise TunelabError(f"data.unlabelled_file={self.unlabelled_file} adds unlabelled records to labelled "
                               "training data (expected data.label_field set; this train file is unlabelled already)")
        if self.pack and self.labelled:
            raise TunelabError(f"data.pack=true joins documents into blocks, which mixes labels (expected "
                               f"data.label_field=null for unlabelled text, got {self.label_field!r})")

    def _read(self, split: str) -> datasets.Dataset:
        """Records of `data.<split>_file`; split "unlabelled" reads `data.unlabelled_file`, without labels."""
        path = check_file(self.unlabelled_file if split == "unlabelled" else self.files[split], f"data.{split}_file")
        stamp = file_stamp(path)
        only = f" of domains {self.domains}" if self.domains else ""
        empty = TunelabError(f"data.{split}_file: {path} holds no records{only} (expected at least one non-empty line)")
        label_field = None if split == "unlabelled" else self.label_field
        try:
            ds = datasets.Dataset.from_generator(
                _generate,
                gen_kwargs={"path": str(path.resolve()), "text_field": self.text_field,
                            "label_field": label_field, "encoding_errors": self.encoding_errors,
                            "stamp": stamp, "domain_field": self.domain_field, "domains": self.domains,
                            "max_record_bytes": self.max_record_bytes,
                            "read_target": self.problem.read_target if label_field is not None else as_text},
                cache_dir=str(self.cache_dir / "datasets"),
            )
        except datasets.exceptions.DatasetGenerationError as e:
            cause = e.__cause__
            while cause is not None and not isinstance(cause, TunelabError):
                cause = cause.__cause__ or cause.__context__
            raise (cause or empty) from None
        if len(ds) == 0:
            raise empty
        return ds

    def read_splits(self) -> dict[str, datasets.Dataset]:
        """The raw train/val/test records (before tokenizing), split and subset as configured."""
        self.ensure_embedded()  # read here by `setup` and by a domain pair's shared tokenizer
        train = self._read("train")
        raw = {"train": train}
        for split, fraction in (("test", self.test_fraction), ("val", self.val_fraction)):
            if self.files[split]:
                raw[split] = self._read(split)
            elif fraction > 0:
                parts = raw["train"].train_test_split(test_size=fraction, seed=self.seed)
                raw["train"], raw[split] = parts["train"], parts["test"]
        if self.limit_train:
            raw["train"] = raw["train"].shuffle(seed=self.seed).select(range(min(self.limit_train, len(raw["train"]))))
        if self.limit_train_per_class:
            raw["train"] = per_class_subset(raw["train"], self.limit_train_per_class, self.seed)
        if self.limit_val_per_class and "val" in raw:
            raw["val"] = per_class_subset(raw["val"], self.limit_val_per_class, self.seed)
        if self.unlabelled_file:
            raw["unlabelled"] = self._read("unlabelled")
            if self.limit_unlabelled:
                n = min(self.limit_unlabelled, len(raw["unlabelled"]))
                raw["unlabelled"] = raw["unlabelled"].shuffle(seed=self.seed).select(range(n))
        for split, ds in raw.items():
            if len(ds) == 0:
                raise TunelabError(f"the {split} split is empty (check data.{split}_file or data.{split}_fraction)")
        return raw

    def _tokenizer(self, train: datasets.Dataset) -> PreTrainedTokenizerBase:
        """data.tokenizer: a tokenizer object (shared by a caller), a folder or hub name, or trained here."""
        if isinstance(self.tokenizer_source, PreTrainedTokenizerBase):
            return self.tokenizer_source
        if self.tokenizer_source:
            return load_tokenizer(str(self.tokenizer_source), self.trust_remote_code)
        texts = (train[i : i + 1000]["text"] for i in range(0, len(train), 1000))
        flat = (t for batch in texts for t in batch)
        return cached_wordpiece(flat, key=train._fingerprint, vocab_size=self.vocab_size, cache_dir=self.cache_dir)

    def _encode_labels(self, ds: datasets.Dataset, split: str) -> datasets.Dataset:
        """Targets as the problem encodes them; the training split first teaches it the label set or scales."""
        file = self.files[split] or self.files["train"]
        if self.labels is None:
            if split != "train":
                raise TunelabError("label set unknown: read the train split first")
            subset = " (of the records data.limit_train keeps)" if self.limit_train or self.limit_train_per_class else ""
            fields = [self.label_field] if isinstance(self.label_field, str) else self.label_field
            self.problem.fit(ds["label"], f"data.train_file: {file}{subset}", labels=self.fixed_labels,
                             fields=fields)
            self.labels = list(self.problem.outputs)
        encode = self.problem.encode
        return ds.map(lambda r: {LABELS: encode(r["label"], f"{file}:{r['line']}")}, remove_columns=["label"])

    @property
    def _needs_word_ids(self) -> bool:
        return bool(getattr(self.masking, "needs_word_ids", False))

    def _tokenized(self, ds: datasets.Dataset) -> datasets.Dataset:
        return ds.map(
            _tokenize_words if self._needs_word_ids else _tokenize,
            batched=True,
            num_proc=self.num_proc,
            fn_kwargs={"tokenizer": self.tokenizer, "max_length": self.max_length},
            remove_columns=["text", "line"],
        )

    def _packed(self, ds: datasets.Dataset, split: str) -> datasets.Dataset:
        source = (f"data.{split}_file: {self.files[split]}" if self.files[split]
                  else f"the {split} split of data.train_file: {self.files['train']}")
        return packing.pack(ds, self.tokenizer, self.max_length, str(self.cache_dir / "datasets"), source,
                            num_proc=self.num_proc, with_word_starts=self._needs_word_ids)

    # ----------------------------------------------------------------- loaders
    def collate_fn(self) -> Any:
        if self.masking is not None:
            return self.masking
        return DataCollatorWithPadding(self.tokenizer, return_tensors="pt")

    def loader(self, split: str, shuffle: bool) -> Any:
        """Evaluation splits get masks seeded by content, so their loss is comparable across epochs."""
        loader = super().loader(split, shuffle)
        if self.masking is not None and split != "train":
            loader.collate_fn = self.collator_factory(tokenizer=self.tokenizer, seed=self.seed)
        return loader
