"""Masked-language-model pretraining: masking statistics, packing, the sparse head, end to end, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import FAST, check_one_ddp_run, check_one_trial_search, compose_cfg, expect_error, run_cli
from transformers import (
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    PreTrainedTokenizerFast,
    pipeline,
)

from tunelab.contracts import masked_targets
from tunelab.data import packing
from tunelab.data.collators import MaskingCollator
from tunelab.data.tokenizer import train_wordpiece
from tunelab.errors import TunelabError
from tunelab.models import mlm_fast_path
from tunelab.models.linear_cross_entropy import linear_cross_entropy
from tunelab.models.text import TextModel
from tunelab.train import run

SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sta", "ble", "pre", "ton", "vi", "qua", "zor"]


def corpus(n: int, seed: int = 0) -> list[str]:
    """Sentences of made-up words of 1-4 syllables: plenty of words a small vocabulary splits into pieces."""
    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(SYLLABLES, size=rng.integers(1, 5))) for _ in range(400)]
    return [" ".join(rng.choice(words, size=rng.integers(3, 30))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def wordpiece() -> PreTrainedTokenizerFast:
    return train_wordpiece(corpus(500), vocab_size=120)


@pytest.fixture(scope="module")
def bpe() -> PreTrainedTokenizerFast:
    """A byte-pair tokenizer: no `##` pieces, so whole words come from its word ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(corpus(500), trainers.BpeTrainer(vocab_size=150, special_tokens=specials))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def examples(tokenizer, n: int, seed: int = 0, word_starts: bool = False) -> list[dict]:
    """Unpacked rows of different lengths ([CLS] ... [SEP], so the batch has padding too)."""
    texts = corpus(n, seed)
    enc = tokenizer(texts, truncation=True, max_length=64)
    rows = [{"input_ids": ids} for ids in enc["input_ids"]]
    if word_starts:
        for i, row in enumerate(rows):
            row["word_starts"] = packing.word_starts(enc[i], len(row["input_ids"]))
    return rows


# ----------------------------------------------------------------------------- masking statistics
@pytest.mark.parametrize("fixed_count", [False, True])
def test_collator_masks_15_percent_split_80_10_10_never_special_or_pad(wordpiece, fixed_count: bool) -> None:
    collate = MaskingCollator(wordpiece, fixed_count=fixed_count)
    special = torch.tensor(sorted(set(wordpiece.all_special_ids)))
    counts = dict.fromkeys(("maskable", "chosen", "mask", "random", "kept"), 0)
    rows = examples(wordpiece, 2000)
    for start in range(0, len(rows), 32):
        chunk = rows[start : start + 32]
        original = collate.pad(chunk)[0]
        batch = collate(chunk)
        ids, labels, attention = batch["input_ids"], batch["mlm_labels"], batch["attention_mask"].bool()
        maskable = attention & ~torch.isin(original, special)
        chosen = labels != -100
        assert not (chosen & ~maskable).any(), "a special or padding token was chosen"
        assert torch.equal(ids[~maskable], original[~maskable]), "a special or padding token was changed"
        assert torch.equal(labels[chosen], original[chosen])
        if fixed_count:
            expected = (0.15 * maskable.sum(1)).round().clamp(min=1)
            assert torch.equal(chosen.sum(1), expected.long())
            assert batch["mlm_positions"].shape == (len(chunk), int(np.ceil(0.15 * ids.shape[1])))
            assert torch.equal(labels.gather(1, batch["mlm_positions"]).ne(-100).sum(1), chosen.sum(1))
        counts["maskable"] += int(maskable.sum())
        counts["chosen"] += int(chosen.sum())
        counts["mask"] += int((chosen & (ids == wordpiece.mask_token_id)).sum())
        counts["random"] += int((chosen & (ids != wordpiece.mask_token_id) & (ids != original)).sum())
        counts["kept"] += int((chosen & (ids == original)).sum())
    assert abs(counts["chosen"] / counts["maskable"] - 0.15) < 0.01, counts
    for kind, share in (("mask", 0.8), ("random", 0.1), ("kept", 0.1)):
        assert abs(counts[kind] / counts["chosen"] - share) < 0.02, (kind, counts)


def test_masks_are_new_each_time_but_seeded_masks_repeat(wordpiece) -> None:
    rows = examples(wordpiece, 32)
    train = MaskingCollator(wordpiece)
    assert not torch.equal(train(rows)["mlm_labels"], train(rows)["mlm_labels"])
    evaluation = MaskingCollator(wordpiece, seed=0)
    first, again = evaluation(rows), evaluation(rows)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(MaskingCollator(wordpiece, seed=1)(rows)["mlm_labels"], first["mlm_labels"])


def _words_all_or_none(tokenizer, rows: list[dict], batch: dict) -> tuple[int, int]:
    """Check, with the tokenizer's own word ids, that no word is partly chosen; count words of 2+ pieces."""
    chosen = batch["mlm_labels"] != -100
    split_words = multi_piece = 0
    for i, text in enumerate(corpus(len(rows))):
        word_ids = tokenizer(text, truncation=True, max_length=64).word_ids()
        for w in {w for w in word_ids if w is not None}:
            picked = [bool(chosen[i, j]) for j, x in enumerate(word_ids) if x == w]
            multi_piece += len(picked) > 1 and all(picked)
            split_words += len(set(picked)) > 1
    return split_words, multi_piece


@pytest.mark.parametrize("fixed_count", [False, True])
def test_whole_word_masking_wordpiece(wordpiece, fixed_count: bool) -> None:
    collate = MaskingCollator(wordpiece, whole_word=True, fixed_count=fixed_count)
    assert not collate.needs_word_ids  # `##` pieces are enough
    rows = examples(wordpiece, 64)
    split_words, multi_piece = _words_all_or_none(wordpiece, rows, collate(rows))
    assert split_words == 0 and multi_piece > 0


def test_whole_word_masking_through_word_ids(bpe) -> None:
    collate = MaskingCollator(bpe, whole_word=True)
    assert collate.needs_word_ids
    rows = examples(bpe, 64, word_starts=True)
    split_words, multi_piece = _words_all_or_none(bpe, rows, collate(rows))
    assert split_words == 0 and multi_piece > 0
    with pytest.raises(TunelabError, match="needs word ids"):
        collate(examples(bpe, 4))


def test_tokenizer_without_mask_token(bpe) -> None:
    plain = PreTrainedTokenizerFast(tokenizer_object=bpe.backend_tokenizer, pad_token="[PAD]")
    with pytest.raises(TunelabError, match="has no mask token"):
        MaskingCollator(plain)


def test_whole_word_masking_rate(wordpiece) -> None:
    collate = MaskingCollator(wordpiece, whole_word=True)
    rows = examples(wordpiece, 2000)
    chosen = maskable = 0
    for start in range(0, len(rows), 64):
        batch = collate(rows[start : start + 64])
        chosen += int((batch["mlm_labels"] != -100).sum())
        maskable += int((batch["attention_mask"].bool() & ~torch.isin(
            collate.pad(rows[start : start + 64])[0], torch.tensor(wordpiece.all_special_ids))).sum())
    assert abs(chosen / maskable - 0.15) < 0.01


# ----------------------------------------------------------------------------- packing
@pytest.mark.parametrize("num_proc", [None, 2])
def test_packing_keeps_the_whole_stream_in_full_blocks(wordpiece, tmp_path: Path, monkeypatch,
                                                       num_proc: int | None) -> None:
    import datasets

    monkeypatch.setattr(packing, "READ_ROWS", 7)  # many chunks: the remainder must carry across all of them
    texts = corpus(100, seed=3)
    ds = datasets.Dataset.from_dict({"text": texts})
    blocks = packing.pack(ds, wordpiece, 32, str(tmp_path), "test corpus", num_proc=num_proc)
    cls, sep = wordpiece.cls_token_id, wordpiece.sep_token_id
    stream = [t for text in texts for t in [*wordpiece(text, add_special_tokens=False)["input_ids"], sep]]
    assert len(blocks) == len(stream) // 30
    ids = np.stack(blocks["input_ids"])
    assert ids.shape == (len(blocks), 32)
    assert (ids[:, 0] == cls).all() and (ids[:, -1] == sep).all()
    assert ids[:, 1:-1].ravel().tolist() == stream[: len(blocks) * 30]


def test_packing_with_word_starts(bpe, tmp_path: Path) -> None:
    import datasets

    texts = corpus(50, seed=4)
    blocks = packing.pack(datasets.Dataset.from_dict({"text": texts}), bpe, 24, str(tmp_path), "test corpus",
                          with_word_starts=True)
    flags = np.stack(blocks["word_starts"]).ravel().tolist()
    expected = []
    for text in texts:
        enc = bpe(text, add_special_tokens=False)
        expected += [*packing.word_starts(enc[0], len(enc["input_ids"])), 1]
    assert flags == expected[: len(flags)]  # BPE has no [CLS]/[SEP] template: blocks are the bare stream


# ----------------------------------------------------------------------------- the sparse head
def tiny_mlm(arch: str, tokenizer) -> TextModel:
    return TextModel("masked_lm", tokenizer=tokenizer, arch=arch, hidden_size=32, num_layers=2, num_heads=2,
                     intermediate_size=64, max_position_embeddings=80, dropout=0.0)


@pytest.mark.parametrize("arch", sorted(mlm_fast_path.LAYOUTS))
@pytest.mark.parametrize("fixed_count", [False, True])
def test_sparse_head_matches_full_vocab_head(wordpiece, arch: str, fixed_count: bool) -> None:
    torch.manual_seed(0)
    model = tiny_mlm(arch, wordpiece)
    batch = MaskingCollator(wordpiece, fixed_count=fixed_count, seed=0)(examples(wordpiece, 8))

    full = model.net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["mlm_labels"]).loss
    full_grads = torch.autograd.grad(full, list(model.net.parameters()), allow_unused=True)
    model.sparse_mlm = True
    assert mlm_fast_path.sparse_last_layer(model.net, batch) is not None  # the last layer: predicted rows only
    logits, targets = model(batch).logits, masked_targets(batch)
    assert logits.shape[0] < batch["input_ids"].numel() / 4  # only the predicted rows
    sparse = F.cross_entropy(logits, targets, ignore_index=-100)
    sparse_grads = torch.autograd.grad(sparse, list(model.net.parameters()), allow_unused=True)

    features = model(batch, project=False)  # training: the vocabulary projection fused with the loss
    assert features.logits is None
    projection = model.vocab_projection
    fused, predictions = linear_cross_entropy(features.features, projection.weight, projection.bias, targets)
    assert torch.equal(predictions, logits.argmax(-1))
    fused_grads = torch.autograd.grad(fused, list(model.net.parameters()), allow_unused=True)

    for loss, grads in ((sparse, sparse_grads), (fused, fused_grads)):
        assert torch.allclose(full, loss, atol=1e-6)
        for (name, _), a, b in zip(model.net.named_parameters(), full_grads, grads, strict=True):
            assert (a is None) == (b is None), name
            if a is not None:
                assert torch.allclose(a, b, atol=1e-6, rtol=1e-4), name


def test_architectures_outside_the_table_take_the_plain_path(wordpiece) -> None:
    """xlm-roberta is not in `LAYOUTS`: its head runs on the predicted rows after the whole encoder, and it
    gives logits even when asked not to project; the loss is the full-vocabulary one."""
    torch.manual_seed(0)
    model = tiny_mlm("xlm-roberta", wordpiece)
    batch = MaskingCollator(wordpiece, seed=0)(examples(wordpiece, 8))
    full = model.net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["mlm_labels"]).loss
    model.sparse_mlm = True
    assert mlm_fast_path.layout(model.net) is None and mlm_fast_path.sparse_last_layer(model.net, batch) is None
    out = model(batch, project=False)
    assert out.logits is not None and not mlm_fast_path.splits_head(model.net)
    assert torch.allclose(F.cross_entropy(out.logits, masked_targets(batch)), full, atol=1e-6)


def test_unknown_mlm_head_layout_is_a_clear_error(wordpiece) -> None:
    model = tiny_mlm("distilbert", wordpiece)  # its head is three loose modules, not one
    with pytest.raises(TunelabError, match="task.sparse_head=false"):
        _ = model.mlm_head


# ----------------------------------------------------------------------------- end to end
def mlm_cfg(make_cfg, train: Path, *extra: str):
    return make_cfg("task=mlm", "data=text_files", f"data.train_file={train}", "optimized_metric=val/perplexity",
                    *extra)


MLM_FAST = [*FAST, "task=mlm", "model.hidden_size=64", "model.intermediate_size=256", "data.batch_size=16",
            "trainer.limit_train_batches=60", "trainer.val_check_interval=5", "trainer.limit_val_batches=4",
            "optimizer.lr=2e-3", "optimized_metric=val/perplexity"]


@pytest.fixture(scope="module")
def mlm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real `python train.py task=mlm` run on the embedded unlabelled reviews."""
    cwd = tmp_path_factory.mktemp("mlm")
    proc = run_cli(*MLM_FAST, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return (cwd / "logs" / "mlm" / "latest").resolve()


def _scalars(run_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_mlm_run_lowers_validation_perplexity(mlm_run: Path) -> None:
    acc = _scalars(mlm_run)
    perplexity = [e.value for e in acc.Scalars("val/perplexity")]
    print(perplexity)
    assert len(perplexity) >= 3
    assert perplexity[-1] < 0.3 * perplexity[0], perplexity
    metrics = json.loads((mlm_run / "metrics.json").read_text())["metrics"]
    assert {"val/loss", "val/acc", "val/perplexity", "test/perplexity", "test/acc", "train/loss"} <= set(metrics)
    assert np.isclose(metrics["val/perplexity"], np.exp(metrics["val/loss"]), rtol=1e-4)


def test_throughput_counts_tokens(mlm_run: Path) -> None:
    acc = _scalars(mlm_run)
    tokens, samples = (acc.Scalars(f"train/device/{name}_per_sec")[-1].value for name in ("items", "samples"))
    assert tokens == pytest.approx(128 * samples, rel=1e-3)  # every packed block is 128 tokens


def test_tensorboard_shows_masked_sentences_with_top3(mlm_run: Path) -> None:
    acc = _scalars(mlm_run)
    assert "val/predictions/text_summary" in acc.Tags()["tensors"]
    text = acc.Tensors("val/predictions/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "top-3 predictions" in text and "**[MASK]**" in text
    first_row = next(line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit())
    assert first_row.count("(0.") + first_row.count("(1.") == 3, first_row


def test_export_fills_masks_in_plain_transformers(mlm_run: Path) -> None:
    model_dir = mlm_run / "model"
    fill = pipeline("fill-mask", model=str(model_dir), top_k=3)
    out = fill("the kettle is [MASK] and easy to clean.")
    assert len(out) == 3 and all("[MASK]" not in o["sequence"] for o in out)
    net = AutoModelForMaskedLM.from_pretrained(model_dir).eval()
    enc = fill.tokenizer("the kettle is [MASK] and easy to clean.", return_tensors="pt")
    with torch.no_grad():
        logits = net(**enc).logits[0, enc["input_ids"][0] == fill.tokenizer.mask_token_id][0]
    assert out[0]["token"] == int(logits.argmax())


def test_finetune_starts_from_the_mlm_model(mlm_run: Path, make_cfg) -> None:
    latest = mlm_run.parent.parent / "latest" / "model"  # logs/mlm/latest/model, as a user writes it
    cfg = make_cfg("task=finetune", "model=hf", f"model.pretrained={latest}", "train=false", "optimized_metric=null")
    run(cfg)
    pretrained = AutoModelForMaskedLM.from_pretrained(latest).bert.state_dict()
    classifier = AutoModelForSequenceClassification.from_pretrained(Path(cfg.paths.output_dir) / "model")
    encoder = classifier.bert.state_dict()
    assert set(pretrained) <= set(encoder)
    assert all(torch.equal(pretrained[k], encoder[k]) for k in pretrained)
    assert (Path(cfg.paths.output_dir) / "model" / "tokenizer.json").is_file()


def test_transfer_recipe_chains_pretraining_into_fine_tuning(tmp_path: Path) -> None:
    """The recipe's three steps, cut to a few batches: pretrain, continue that model, fine-tune on 256 reviews a class."""
    from hydra.utils import instantiate

    pretrain = compose_cfg([*FAST, "experiment=reviews_mlm_pretrain", "model.num_layers=1"], tmp_path / "mlm")
    assert pretrain.model.hidden_size == 256 and not pretrain.data.pack
    run(pretrain)
    first = Path(pretrain.paths.output_dir) / "model"
    resume = compose_cfg([*FAST, "experiment=reviews_mlm_pretrain", "model=hf", f"model.pretrained={first}"],
                         tmp_path / "mlm_continued")
    run(resume)
    model_dir = Path(resume.paths.output_dir) / "model"
    assert AutoTokenizer.from_pretrained(model_dir).vocab == AutoTokenizer.from_pretrained(first).vocab
    weights = [AutoModelForMaskedLM.from_pretrained(d).bert.embeddings.word_embeddings.weight for d in (first, model_dir)]
    change = (weights[1] - weights[0]).abs().max()
    assert 0 < change < 0.01  # started from step 1's weights (a fresh init differs by ~0.1), then trained
    finetune = compose_cfg([*FAST, "experiment=reviews_finetune_small", "model=hf", f"model.pretrained={model_dir}",
                            "seed=2"], tmp_path / "finetune")
    run(finetune)
    metrics = json.loads((Path(finetune.paths.output_dir) / "metrics.json").read_text())["metrics"]
    assert 0 <= metrics["test/acc"] <= 1
    dm = instantiate(finetune.data)
    dm.setup("fit")
    assert np.bincount(dm.datasets["train"]["labels"]).tolist() == [256, 256]
    assert dm.tokenizer.vocab == AutoTokenizer.from_pretrained(model_dir).vocab  # the pretrained model's own


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(corpus(800)) + "\n")
    return path


@pytest.mark.parametrize("extra", [
    ["data.collator.fixed_count=true", "data.collator.whole_word=true"],
    ["task.sparse_head=false", "data.pack=false"],
])
def test_mlm_variants_run(make_cfg, corpus_file: Path, extra: list[str]) -> None:
    cfg = mlm_cfg(make_cfg, corpus_file, "model.hidden_size=32", "data.vocab_size=200", *extra)
    run(cfg)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())["metrics"]
    assert np.isfinite(metrics["val/perplexity"]) and 0 <= metrics["test/acc"] <= 1


@pytest.mark.slow
def test_mlm_compiles_with_fixed_count(make_cfg, corpus_file: Path) -> None:
    """`compile=true` traces the stock logits and dropout (the fused loss and CPU dropout step aside)."""
    cfg = mlm_cfg(make_cfg, corpus_file, "model.hidden_size=32", "data.vocab_size=200", "compile=true",
                  "data.collator.fixed_count=true", "trainer.limit_train_batches=4")
    run(cfg)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())["metrics"]
    assert np.isfinite(metrics["val/perplexity"]) and np.isfinite(metrics["test/perplexity"])


def test_validation_masks_repeat_training_masks_do_not(make_cfg, corpus_file: Path) -> None:
    from hydra.utils import instantiate

    dm = instantiate(mlm_cfg(make_cfg, corpus_file, "data.vocab_size=200").data)
    dm.setup("fit")
    assert all(len(ids) == 128 for ids in dm.datasets["train"][:5]["input_ids"])  # packed blocks
    first, again = next(iter(dm.val_dataloader())), next(iter(dm.val_dataloader()))
    assert torch.equal(first["mlm_labels"], again["mlm_labels"])
    block = [dm.datasets["train"][0]] * 4
    train_collate = dm.train_dataloader().collate_fn
    assert not torch.equal(train_collate(block)["mlm_labels"], train_collate(block)["mlm_labels"])


# ----------------------------------------------------------------------------- bad input
def test_empty_corpus(make_cfg, tmp_path: Path) -> None:
    path = tmp_path / "empty.txt"
    path.write_text("\n  \n\n")
    expect_error(mlm_cfg(make_cfg, path), str(path), "holds no records")


def test_corpus_shorter_than_one_block(make_cfg, tmp_path: Path) -> None:
    path = tmp_path / "short.txt"
    path.write_text("\n".join(corpus(6)) + "\n")
    expect_error(mlm_cfg(make_cfg, path, "data.max_length=512"), str(path), "fewer than one block of data.max_length=512")


def test_undecodable_bytes_named_or_replaced(make_cfg, tmp_path: Path) -> None:
    path = tmp_path / "bad.txt"
    lines = [line.encode() for line in corpus(300)]
    lines[4] = b"caf\xe9 au lait " + lines[4]
    path.write_bytes(b"\n".join(lines) + b"\n")
    expect_error(mlm_cfg(make_cfg, path), f"{path}:5", "not valid UTF-8", "data.encoding_errors=replace")
    from hydra.utils import instantiate

    dm = instantiate(mlm_cfg(make_cfg, path, "data.encoding_errors=replace").data)
    dm.setup("fit")
    assert len(dm.datasets["train"]) > 0


@pytest.mark.parametrize("value", ["0", "1.0", "-0.1", "1.5"])
def test_mask_prob_outside_0_1(make_cfg, tmp_path: Path, value: str) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(corpus(300)) + "\n")
    expect_error(mlm_cfg(make_cfg, path, f"data.collator.mask_prob={value}"), "data.collator.mask_prob",
                 "strictly between 0 and 1")


def test_continuing_a_checkpoint_with_a_tokenizer_it_does_not_fit(make_cfg, tmp_path: Path, tiny_hf_dir: Path) -> None:
    other = tmp_path / "other"
    texts = corpus(300)
    bigger = train_wordpiece(texts, vocab_size=400)
    BertForMaskedLM(BertConfig(vocab_size=len(bigger), hidden_size=16, num_hidden_layers=1, num_attention_heads=1,
                               intermediate_size=32)).save_pretrained(other)
    bigger.save_pretrained(other)
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(texts) + "\n")
    expect_error(mlm_cfg(make_cfg, path, "model=hf", f"model.pretrained={tiny_hf_dir}", f"data.tokenizer={other}"),
                 f"the tokenizer has {len(bigger)} tokens", "embeddings have")


def test_pack_refuses_labelled_data(make_cfg, tmp_path: Path) -> None:
    path = tmp_path / "labelled.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "label": "a"}) for t in corpus(50)) + "\n")
    expect_error(make_cfg("data=text_files", f"data.train_file={path}", "+data.pack=true"),
                 "data.pack=true", "data.label_field=null")


def test_limit_train_per_class(make_cfg, tmp_path: Path) -> None:
    from hydra.utils import instantiate

    path = tmp_path / "labelled.jsonl"
    rows = [{"text": t, "label": lab} for t, lab in zip(corpus(300), ["a", "b", "c"] * 100, strict=True)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    limited = instantiate(make_cfg("data=text_files", f"data.train_file={path}", "data.limit_train_per_class=7").data)
    full = instantiate(make_cfg("data=text_files", f"data.train_file={path}").data)
    limited.setup("fit")
    full.setup("fit")
    assert sorted(limited.datasets["train"]["labels"]) == [0] * 7 + [1] * 7 + [2] * 7
    for split in ("val", "test"):  # the held-out splits are untouched
        texts = [dm.tokenizer.batch_decode(list(dm.datasets[split]["input_ids"]), skip_special_tokens=True)
                 for dm in (limited, full)]
        assert texts[0] == texts[1]


@pytest.mark.slow  # in make test-all: the fast suite keeps one run of this kind
def test_mlm_under_ddp_cpu(tmp_path: Path, corpus_file: Path) -> None:
    proc = run_cli("trainer=ddp_cpu", *FAST, "task=mlm", "data=text_files", f"data.train_file={corpus_file}",
                   "model.hidden_size=32", "model.intermediate_size=64", "data.vocab_size=200", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = check_one_ddp_run(tmp_path / "logs", "mlm")
    assert np.isclose(metrics["test/perplexity"], np.exp(metrics["test/loss"]), rtol=1e-4)


def test_mlm_optuna_search_minimises_the_validation_loss(tmp_path: Path, corpus_file: Path) -> None:
    value = check_one_trial_search("mlm_optuna", "mlm", *FAST, "data=text_files", f"data.train_file={corpus_file}",
                                   "model.hidden_size=32", "model.intermediate_size=64", "data.vocab_size=200",
                                   cwd=tmp_path)
    [job] = (tmp_path / "logs" / "mlm" / "multiruns").glob("*/0")
    assert value == pytest.approx(json.loads((job / "metrics.json").read_text())["metrics"]["val/loss_best"])
