"""The fused vocabulary projection + cross-entropy against `F.linear` + `F.cross_entropy`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tunelab.models.linear_cross_entropy import linear_cross_entropy


def leaves(rows: int, hidden: int = 16, vocab: int = 300) -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.randn(rows, hidden).requires_grad_(), (torch.randn(vocab, hidden) * 0.3).requires_grad_(),
            (torch.randn(vocab) * 0.1).requires_grad_()]


def stock(h, w, b, targets):
    logits = F.linear(h, w, b)
    return F.cross_entropy(logits.float(), targets, ignore_index=-100), logits.argmax(-1)


@pytest.mark.parametrize("bf16", [False, True])
def test_same_loss_gradients_and_predictions(bf16: bool) -> None:
    targets = torch.randint(0, 300, (50,))
    targets[::7] = -100  # ignored rows (fixed-count padding) weigh nothing
    results = []
    for fn, chunk in ((stock, None), (linear_cross_entropy, 16)):  # 16 rows a chunk: the last one is partial
        params = leaves(50)
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss, predictions = fn(*params, targets) if chunk is None else fn(*params, targets, chunk)
        loss.backward()
        results.append((loss.detach(), predictions, [p.grad for p in params]))
    (loss_a, pred_a, grads_a), (loss_b, pred_b, grads_b) = results
    assert loss_b.dtype == torch.float32 and not pred_b.requires_grad
    tolerance = {"atol": 1e-2, "rtol": 2e-2} if bf16 else {"atol": 1e-6, "rtol": 1e-4}
    assert torch.allclose(loss_a, loss_b, **tolerance)
    assert (pred_a == pred_b).float().mean() > (0.95 if bf16 else 0.999)
    for a, b in zip(grads_a, grads_b, strict=True):
        assert a.dtype == b.dtype == torch.float32
        assert torch.allclose(a, b, atol=tolerance["atol"] * a.abs().max(), rtol=tolerance["rtol"])


def test_nothing_to_predict_is_a_zero_loss_with_zero_gradients() -> None:
    h, w, b = leaves(4)
    loss, _ = linear_cross_entropy(h, w, b, torch.full((4,), -100))
    loss.backward()
    assert loss.item() == 0.0 and all(not p.grad.any() for p in (h, w, b))
    empty = torch.zeros(0, 16, requires_grad=True)
    loss, predictions = linear_cross_entropy(empty, w, None, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and predictions.shape == (0,)
