"""Structured pruning of transformer encoders: heads, feed-forward neurons and whole layers, sliced for real.

The least important heads (ranked across layers), the least important neurons of every layer (the same
fraction in each, so the FFN width stays uniform) and optionally the least important layers are cut out of
the weight matrices (`tunelab.models.surgery`): the model gets smaller and faster, not just sparser. The
per-layer shapes go into the artifact (`tunelab.artifacts.pruned`); a model whose heads were all kept
still fits a standard config (fewer layers, one FFN width) and loads in plain `transformers`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from tunelab.compress import heads as importance_of
from tunelab.errors import TunelabError
from tunelab.models import surgery
from tunelab.problems.classification import Classification


@dataclass
class Plan:
    """What to remove: {layer: [heads]}, {layer: [neurons]}, [layers] (indices of the model it was made for)."""

    heads: dict[int, list[int]] = field(default_factory=dict)
    ffn: dict[int, list[int]] = field(default_factory=dict)
    layers: list[int] = field(default_factory=list)


def check_explicit_heads(net: nn.Module, remove: dict) -> dict[int, list[int]]:
    """`prune.remove_heads={layer: [heads]}`: every layer and head must exist, and one head per layer stays."""
    layers = surgery.encoder_layers(net)
    plan: dict[int, list[int]] = {}
    for key, value in dict(remove).items():
        layer, heads = int(key), sorted({int(h) for h in value})
        if not 0 <= layer < len(layers):
            raise TunelabError(f"prune.remove_heads: the model has no layer {layer} (layers 0..{len(layers) - 1})")
        n = layers[layer].attention.self.num_attention_heads
        if len(heads) >= n or any(not 0 <= h < n for h in heads):
            raise TunelabError(f"prune.remove_heads: layer {layer} has {n} heads (0..{n - 1}); removing {heads} "
                               "is more than it has (expected at most n-1 of its heads: one stays)")
        plan[layer] = heads
    return plan


def make_plan(model: nn.Module, batches: Iterable[dict], heads: float, ffn: float, layers: int,
              remove_heads: dict | None = None, loss: Callable | None = None) -> Plan:
    """Rank by gradient importance of `loss` (the problem's; cross-entropy by default) on `batches`
    (validation data) and pick what to remove."""
    net = model.net
    scores = importance_of.importance(model, batches, loss or Classification().loss)
    total = sum(len(s) for s in scores.heads)
    plan = Plan(check_explicit_heads(net, remove_heads) if remove_heads else
                importance_of.least_important_heads(scores.heads, round(heads * total)))
    for i, s in enumerate(scores.ffn):
        if round(ffn * len(s)):
            plan.ffn[i] = importance_of.least_important(s, min(round(ffn * len(s)), len(s) - 1))
    if layers:
        plan.layers = importance_of.least_important(scores.layers, layers)
    return plan


def apply(net: nn.Module, plan: Plan) -> None:
    """Slice `net` in place: heads and neurons first (indices refer to the unpruned layers), then layers."""
    layers = surgery.encoder_layers(net)
    for i, layer in enumerate(layers):
        if plan.heads.get(i):
            n = layer.attention.self.num_attention_heads
            surgery.keep_heads(layer, [h for h in range(n) if h not in plan.heads[i]])
        if plan.ffn.get(i):
            width = layer.intermediate.dense.out_features
            surgery.keep_neurons(layer, [j for j in range(width) if j not in plan.ffn[i]])
    if plan.layers:
        surgery.keep_layers(net, [i for i in range(len(layers)) if i not in plan.layers])
    surgery.standard_config(net)


def prune(model: nn.Module, batches: Callable[[], Iterable[dict]], heads: float, ffn: float, layers: int,
          iterations: int = 1, remove_heads: dict | None = None,
          recover: Callable[[nn.Module, int], nn.Module] | None = None,
          loss: Callable | None = None) -> tuple[nn.Module, list[Plan]]:
    """A pruned copy of `model` (a TextModel). With `iterations` > 1: remove an equal share of the target
    each round, re-ranking on the smaller model and recovering (`recover(model, round)`) in between."""
    pruned = copy.deepcopy(model)
    start = surgery.layout(pruned.net)
    plans = []
    for k in range(1, iterations + 1):
        done = surgery.layout(pruned.net)
        head_goal = round(heads * sum(s["heads"] for s in start) * k / iterations)
        head_share = (head_goal - (sum(s["heads"] for s in start) - sum(s["heads"] for s in done))) / max(
            1, sum(s["heads"] for s in done))
        ffn_goal = 1 - (1 - ffn) ** (1 / iterations)  # the same fraction of what is left, every round
        layer_goal = round(layers * k / iterations) - (len(start) - len(done))
        with torch.enable_grad():
            plan = make_plan(pruned, batches(), max(head_share, 0.0), ffn_goal if ffn else 0.0,
                             max(layer_goal, 0), remove_heads if k == 1 else None, loss)
        apply(pruned.net, plan)
        plans.append(plan)
        if recover is not None and k < iterations:
            pruned = recover(pruned, k)
    return pruned, plans
