"""Which attention heads, feed-forward neurons and layers a text classifier needs, measured on labelled data.

Gradient-based importance after Michel et al. (2019), "Are Sixteen Heads Really Better than One?": a gate
of 1 multiplies each head's output (the attention context before the output projection), each
feed-forward neuron (the input of the second FFN projection) and each layer's residual update; the
importance of a gate is the mean |dL/dgate| over the batches. transformers 5 has no `head_mask` any more,
so the gates are forward pre-hooks. The same hooks with 0/1 gates mask heads and neurons, which is how the
tests check that slicing a model gives the masked model's logits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from tunelab.contracts import LABELS
from tunelab.models.surgery import encoder_layers


@dataclass
class Gates:
    """One gate per head, per FFN neuron and per layer (each a list over layers)."""

    heads: list[torch.Tensor]
    ffn: list[torch.Tensor]
    layers: torch.Tensor

    @classmethod
    def ones(cls, net: nn.Module, requires_grad: bool = False) -> Gates:
        layers = encoder_layers(net)
        make = lambda n: torch.ones(n, requires_grad=requires_grad)  # noqa: E731
        return cls([make(layer.attention.self.num_attention_heads) for layer in layers],
                   [make(layer.intermediate.dense.out_features) for layer in layers], make(len(layers)))


@contextmanager
def gated(net: nn.Module, gates: Gates) -> Iterator[Gates]:
    """Run `net` with its heads, neurons and layer updates multiplied by `gates`."""
    handles = []
    for i, layer in enumerate(encoder_layers(net)):
        d = layer.attention.self.attention_head_size

        def heads(module: nn.Module, args: tuple, g: torch.Tensor = gates.heads[i], d: int = d) -> tuple:
            x = args[0]
            return ((x.view(*x.shape[:-1], -1, d) * g.to(x.dtype).view(-1, 1)).view_as(x), *args[1:])

        def ffn(module: nn.Module, args: tuple, g: torch.Tensor = gates.ffn[i]) -> tuple:
            return (args[0] * g.to(args[0].dtype), *args[1:])

        def residual(module: nn.Module, args: tuple, kwargs: dict, out: tuple | torch.Tensor,
                     i: int = i) -> tuple | torch.Tensor:
            x = args[0] if args else kwargs["hidden_states"]
            hidden = out[0] if isinstance(out, tuple) else out
            mixed = x + gates.layers[i].to(hidden.dtype) * (hidden - x)
            return (mixed, *out[1:]) if isinstance(out, tuple) else mixed

        handles += [layer.attention.output.dense.register_forward_pre_hook(heads),
                    layer.output.dense.register_forward_pre_hook(ffn), layer.register_forward_hook(residual, with_kwargs=True)]
    try:
        yield gates
    finally:
        for handle in handles:
            handle.remove()


def importance(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]],
               loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Gates:
    """Mean |gradient| of the problem's loss (`loss_fn(outputs, labels)`) on labelled `batches` w.r.t. each gate;
    heads normalised per layer (L2), as Michel et al. do, so that layers compare. `model` is a TextModel; it is
    left unchanged."""
    net = model.net
    gates = Gates.ones(net, requires_grad=True)
    scores = Gates([torch.zeros_like(g) for g in gates.heads], [torch.zeros_like(g) for g in gates.ffn],
                   torch.zeros_like(gates.layers))
    mode, n = model.training, 0
    model.eval()
    try:
        with gated(net, gates):
            for batch in batches:
                loss = loss_fn(model(batch).logits, batch[LABELS])
                grads = torch.autograd.grad(loss, [*gates.heads, *gates.ffn, gates.layers])
                k = len(gates.heads)
                for total, grad in zip([*scores.heads, *scores.ffn], grads[:2 * k], strict=True):
                    total += grad.abs()
                scores.layers += grads[-1].abs()
                n += 1
    finally:
        model.train(mode)
    n = max(n, 1)
    heads = [s / n / (s / n).norm().clamp_min(1e-12) for s in scores.heads]
    return Gates(heads, [s / n for s in scores.ffn], scores.layers / n)


def least_important_heads(scores: list[torch.Tensor], count: int) -> dict[int, list[int]]:
    """The `count` heads with the lowest (layer-normalised) importance across all layers, never a layer's
    last head: {layer: [heads to remove]}."""
    ranked = sorted((float(s), layer, h) for layer, layer_scores in enumerate(scores)
                    for h, s in enumerate(layer_scores))
    left = {layer: len(s) for layer, s in enumerate(scores)}
    remove: dict[int, list[int]] = {}
    for _, layer, h in ranked:
        if sum(len(v) for v in remove.values()) >= count:
            break
        if left[layer] > 1:
            remove.setdefault(layer, []).append(h)
            left[layer] -= 1
    return remove


def least_important(scores: torch.Tensor, count: int) -> list[int]:
    """Indices of the `count` lowest scores."""
    return sorted(torch.argsort(scores)[:count].tolist())
