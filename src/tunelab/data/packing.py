"""Pack a tokenized corpus into full fixed-length blocks, as BERT and RoBERTa pretrain.

Documents are tokenized once without special tokens (a cached, optionally multi-process
`datasets.map`), each followed by the separator; the token stream is then cut into blocks of
`max_length` including the model's own special tokens (`[CLS] ... [SEP]` for BERT). The remainder of
one chunk of documents carries into the next, so only the final partial block of the whole corpus is
dropped. Both steps stream Arrow record batches from memory-mapped files and write Arrow, so memory
stays flat however large the corpus is.
"""

from __future__ import annotations

from collections.abc import Iterator

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from transformers import PreTrainedTokenizerBase

from tunelab.errors import TunelabError

READ_ROWS = 1000


def special_template(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a single sequence (`[CLS]` / `[SEP]` for BERT)."""
    probe = "hello world"
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start], full[start + len(bare) :]
    return [], []


def separator_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The token that ends a document inside the stream ([SEP] for BERT, </s> for RoBERTa)."""
    for token_id in (tokenizer.sep_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return None


def word_starts(encoding: object, length: int) -> list[int]:
    """1 where a token begins a word (or is special), from a fast tokenizer's word ids."""
    ids = encoding.word_ids
    return [int(w is None or i == 0 or w != ids[i - 1]) for i, w in enumerate(ids[:length])]


def tokenize_documents(batch: dict, tokenizer: PreTrainedTokenizerBase, separator: int | None,
                       with_word_starts: bool) -> dict:
    """Token ids of whole documents, separator appended; no truncation, no special tokens."""
    enc = tokenizer(batch["text"], add_special_tokens=False, return_attention_mask=False,
                    return_token_type_ids=False, verbose=False)
    tail = [separator] if separator is not None else []
    out = {"input_ids": [ids + tail for ids in enc["input_ids"]]}
    if with_word_starts:
        out["word_starts"] = [word_starts(enc[i], len(ids)) + [1] * len(tail)
                              for i, ids in enumerate(enc["input_ids"])]
    return out


def _flat(table: pa.Table, column: str) -> np.ndarray:
    return table.column(column).combine_chunks().flatten().to_numpy(zero_copy_only=False)


def _blocks(source: datasets.Dataset, content: int, prefix: tuple[int, ...], suffix: tuple[int, ...],
            columns: tuple[str, ...]) -> Iterator[dict]:
    """Module-level generator (fingerprinted by `datasets`): full blocks, the remainder carried on."""
    fill = {"input_ids": (prefix, suffix), "word_starts": ((1,) * len(prefix), (1,) * len(suffix))}
    carry = {c: np.zeros(0, np.int32) for c in columns}
    for table in source.with_format("arrow").iter(batch_size=READ_ROWS):
        stream = {c: np.concatenate([carry[c], _flat(table, c).astype(np.int32)]) for c in columns}
        n = len(stream["input_ids"]) // content
        rows = {}
        for c in columns:
            head, tail = (np.broadcast_to(np.asarray(x, np.int32), (n, len(x))) for x in fill[c])
            rows[c] = np.concatenate([head, stream[c][: n * content].reshape(n, content), tail], axis=1)
            carry[c] = stream[c][n * content :]
        for i in range(n):
            yield {c: rows[c][i] for c in columns}


def count_tokens(tokenized: datasets.Dataset) -> int:
    """Tokens in the stream, counted batch by batch from the memory-mapped Arrow file."""
    tables = tokenized.with_format("arrow").iter(batch_size=10 * READ_ROWS)
    return sum(int(pc.sum(pc.list_value_length(t.column("input_ids"))).as_py() or 0) for t in tables)


def pack(ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int, cache_dir: str, source: str,
         num_proc: int | None = None, with_word_starts: bool = False) -> datasets.Dataset:
    """Blocks of `max_length` tokens from the `text` column of `ds`; `source` names it in errors."""
    prefix, suffix = special_template(tokenizer)
    content = max_length - len(prefix) - len(suffix)
    if content < 1:
        raise TunelabError(f"data.max_length={max_length} leaves no room for text between the special tokens "
                           f"{prefix} and {suffix} (expected more than {len(prefix) + len(suffix)})")
    columns = ["input_ids", "word_starts"] if with_word_starts else ["input_ids"]
    features = datasets.Features({c: datasets.Sequence(datasets.Value("int32")) for c in columns})
    tokenized = ds.map(
        tokenize_documents, batched=True, num_proc=num_proc, features=features, remove_columns=ds.column_names,
        fn_kwargs={"tokenizer": tokenizer, "separator": separator_id(tokenizer), "with_word_starts": with_word_starts},
        desc="Tokenizing documents",
    )
    tokens = count_tokens(tokenized)
    if tokens < content:
        raise TunelabError(
            f"{source} holds {tokens} tokens, fewer than one block of data.max_length={max_length} "
            f"({content} text tokens plus special tokens); expected more text or a smaller data.max_length"
        )
    block_features = datasets.Features(
        {c: datasets.Sequence(datasets.Value("int32"), length=max_length) for c in columns})
    packed = datasets.Dataset.from_generator(
        _blocks, features=block_features, cache_dir=cache_dir,
        # tuples, not lists: `datasets` reads lists in gen_kwargs as shards to split across processes
        gen_kwargs={"source": tokenized, "content": content, "prefix": tuple(prefix), "suffix": tuple(suffix),
                    "columns": tuple(columns)},
    )
    return packed.with_format("numpy")
