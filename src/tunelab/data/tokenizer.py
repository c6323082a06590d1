"""Tokenizers: the model's own, or a WordPiece vocabulary trained on the training text.

A from-scratch model has no tokenizer, so one is trained with `tokenizers` and saved in Hugging Face
format; the exported `model/` then carries it and any `transformers` user can load both by path.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from tunelab.errors import TunelabError
from tunelab.folders import check_pretrained

SPECIAL_TOKENS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                  "mask_token": "[MASK]"}


def load_tokenizer(source: str, trust_remote_code: bool = False, role: str = "model.pretrained") -> PreTrainedTokenizerBase:
    """Load the tokenizer that belongs to a model directory or hub name; errors name `role`, the key that gave
    `source` (data.tokenizer follows model.pretrained unless a task points it elsewhere)."""
    source = check_pretrained(source, role)
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise TunelabError(
            f"{role}: could not load a tokenizer from {source!r} (expected a model directory with tokenizer files, "
            f"or a hub name when online): {e}"
        ) from None


def train_wordpiece(texts: Iterable[str], vocab_size: int, lowercase: bool = True) -> PreTrainedTokenizerFast:
    """Train a BERT-style WordPiece tokenizer on `texts`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()))
    tok.train_from_iterator(texts, trainer=trainer)
    cls, sep = SPECIAL_TOKENS["cls_token"], SPECIAL_TOKENS["sep_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}",
        pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))],
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_input_names=["input_ids", "attention_mask"],
                                   **SPECIAL_TOKENS)


def cached_wordpiece(texts: Iterator[str], key: str, vocab_size: int, cache_dir: str | Path) -> PreTrainedTokenizerFast:
    """Train once per (data, vocab size) and reuse from `cache_dir`; written atomically for parallel ranks."""
    digest = hashlib.sha256(f"{key}:{vocab_size}".encode()).hexdigest()[:16]
    target = Path(cache_dir) / "tokenizers" / f"wordpiece-{vocab_size}-{digest}"
    if not (target / "tokenizer.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=target.parent)
        train_wordpiece(texts, vocab_size).save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    return AutoTokenizer.from_pretrained(str(target))
