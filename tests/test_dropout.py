"""The CPU dropout: nn.Dropout's distribution and scaling, SDPA's attention, nothing changed on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForMaskedLM

from tunelab import artifacts
from tunelab.data.tokenizer import train_wordpiece
from tunelab.models.dropout import ATTENTION, Dropout, dropout, keep_mask, scaled_dot_product_attention
from tunelab.models.text import TextModel


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_mask_keeps_1_minus_p(p: float) -> None:
    torch.manual_seed(0)
    mask = keep_mask(torch.Size([1000, 1001]), p, torch.device("cpu"))  # not a multiple of the lanes
    assert mask.shape == (1000, 1001) and mask.dtype == torch.bool
    assert abs(mask.float().mean().item() - (1 - p)) < 0.002
    halves = mask.view(-1)[:500_000].float().mean(), mask.view(-1)[500_000:].float().mean()
    assert abs(halves[0] - halves[1]) < 0.004  # no drift along the tensor (lanes are used in order)


def test_dropout_zeroes_and_rescales_seeded_and_fresh() -> None:
    x = torch.randn(64, 256, requires_grad=True)
    torch.manual_seed(1)
    y = dropout(x, 0.2)
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] / 0.8)
    y.sum().backward()
    assert torch.allclose(x.grad, kept.float() / 0.8)  # gradient flows through the kept entries only
    torch.manual_seed(1)
    assert torch.equal(dropout(x, 0.2), y)  # the default generator: seed_everything reproduces a run
    assert not torch.equal(dropout(x, 0.2), y)  # a new mask each call
    assert torch.equal(dropout(x, 0.2, training=False), x) and torch.equal(dropout(x, 0.0), x)
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    module = Dropout(0.2).eval()
    assert torch.equal(module(x), x)


@pytest.mark.parametrize("kind", ["none", "bool", "additive"])
def test_attention_is_sdpa_with_dropout_on_the_weights(kind: str) -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8) for _ in range(3))
    keys = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])[:, None, None, :]
    mask = {"none": None, "bool": keys, "additive": torch.where(keys, 0.0, -1e4)}[kind]
    stock = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.allclose(scaled_dot_product_attention(q, k, v, mask), stock, atol=1e-6)  # p=0: stock SDPA

    torch.manual_seed(3)
    out = scaled_dot_product_attention(q, k, v, mask, p=0.3, scale=0.5)
    torch.manual_seed(3)
    keep = keep_mask(torch.Size([2, 3, 5, 5]), 0.3, q.device)
    scores = q @ k.transpose(-1, -2) * 0.5 + (0 if mask is None else torch.where(keys, 0.0, -1e4))
    expected = (scores.softmax(-1) * keep / 0.7) @ v
    assert torch.allclose(out, expected, atol=1e-5)


def test_text_models_use_it_and_save_stock_files(tmp_path: Path) -> None:
    tokenizer = train_wordpiece([f"word{i} and more words here" for i in range(200)], vocab_size=100)
    model = TextModel("masked_lm", tokenizer=tokenizer, hidden_size=32, num_layers=2, num_heads=2,
                      intermediate_size=64, max_position_embeddings=64, dropout=0.5)
    assert model.net.config._attn_implementation == ATTENTION
    assert not any(type(m) is nn.Dropout for m in model.net.modules())
    batch = {"input_ids": torch.randint(5, 100, (4, 16)), "attention_mask": torch.ones(4, 16, dtype=torch.long)}
    batch["attention_mask"][1, 10:] = 0
    model.train()
    assert not torch.equal(model(batch).logits, model(batch).logits)  # dropout is on in training
    model.eval()
    with torch.no_grad():
        ours = model(batch).logits
    artifacts.save(tmp_path / "model", model, tokenizer=tokenizer)
    assert ATTENTION not in (tmp_path / "model" / "config.json").read_text()
    json.loads((tmp_path / "model" / "config.json").read_text())
    stock = AutoModelForMaskedLM.from_pretrained(tmp_path / "model").eval()
    with torch.no_grad():
        theirs = stock(**batch).logits
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_training_attention_reads_the_models_padding_mask(monkeypatch) -> None:
    """Training takes the CPU attention with the masks transformers builds; keeping everything (and p ~ 0) it
    must give what the stock attention gives in eval mode, padding included."""
    import tunelab.models.dropout as cpu_dropout

    tokenizer = train_wordpiece([f"word{i} and more words here" for i in range(200)], vocab_size=100)
    model = TextModel("masked_lm", tokenizer=tokenizer, hidden_size=32, num_layers=2, num_heads=2,
                      intermediate_size=64, max_position_embeddings=64, dropout=1e-6)
    batch = {"input_ids": torch.randint(5, 100, (3, 12)), "attention_mask": torch.ones(3, 12, dtype=torch.long)}
    batch["attention_mask"][0, 7:] = 0
    calls = []

    def keep_all(shape, p, device):
        calls.append(tuple(shape))
        return torch.ones(shape, dtype=torch.bool, device=device)

    monkeypatch.setattr(cpu_dropout, "keep_mask", keep_all)
    with torch.no_grad():
        trained = model.train()(batch).logits
        stock = model.eval()(batch).logits
    assert (3, 2, 12, 12) in calls  # the attention weights went through the CPU path
    keep = batch["attention_mask"].bool()
    assert torch.allclose(trained[keep], stock[keep], atol=1e-4)
