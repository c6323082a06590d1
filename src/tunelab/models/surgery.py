"""Layer surgery: naming a model's layers, pairing them across two models, copying layers between them.

Layers are named as `tunelab.contracts.Layer`: a hidden-state index (0: embeddings, i: after transformer
layer i) or "features", the pooled vector the head sees. Distillation pairs student and teacher layers with
`resolve_layer_map` and starts a student from the teacher's layers with `init_from`; structured pruning
reuses the same naming and copying.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tunelab.contracts import Layer, Output
from tunelab.errors import TunelabError

if TYPE_CHECKING:
    from tunelab.models.teacher import Teacher

LAYER_INDEX = re.compile(r"(\.layers?\.)(\d+)\.")


def num_layers(model: nn.Module) -> int:
    """Hidden states 0..n exist for text models; image models expose only `features`."""
    return int(model.net.config.num_hidden_layers) if getattr(model, "modality", "") == "text" else 0


def parse_layer(value: Any) -> Layer:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return value if isinstance(value, str) else int(value)


def resolve_layer_map(layer_map: dict[Any, Any] | None, student: nn.Module, teacher: Teacher) -> dict[Layer, Layer]:
    """{student layer: teacher layer}; by default each student layer is paired with the teacher layer at the
    same relative depth (text), or the pooled features (images). Names that do not exist fail here."""
    s_n, t_n = num_layers(student), teacher.num_layers()
    if layer_map is None:
        if s_n == 0 or t_n == 0:
            return {"features": "features"}
        return {s: s * t_n // s_n for s in range(1, s_n + 1)}
    resolved = {parse_layer(s): parse_layer(t) for s, t in dict(layer_map).items()}
    for side, n, names in (("student", s_n, resolved.keys()), ("teacher", t_n, resolved.values())):
        valid = f"hidden states 0..{n} and 'features'" if n else "'features' only, the pooled vector"
        for name in names:
            if name != "features" and not (isinstance(name, int) and 0 <= name <= n):
                raise TunelabError(f"task.layer_map: the {side} has no layer {name!r} (valid: {valid})")
    if not resolved:
        raise TunelabError("task.layer_map is empty (expected {student layer: teacher layer}, e.g. {2: 4})")
    for s, t in resolved.items():
        if (s == "features") != (t == "features"):
            raise TunelabError(f"task.layer_map: {s!r}: {t!r} pairs the pooled 'features' with a per-token hidden "
                               "state (expected 'features' to map to 'features', and layer numbers to layer numbers)")
    return resolved


def attention_pairs(layer_map: dict[Layer, Layer]) -> list[tuple[int, int]]:
    """Attention maps exist for transformer layers 1..n (hidden state i comes out of layer i)."""
    return [(s, t) for s, t in layer_map.items() if isinstance(s, int) and isinstance(t, int) and s > 0 and t > 0]


def outputs_by_layer(out: Output, layers: set[Layer], attention_layers: list[int]) -> dict[Any, torch.Tensor]:
    """Logits plus the requested hidden states/features and attention maps, keyed by layer name."""
    res: dict[Any, torch.Tensor] = {"logits": out.logits}
    for layer in layers:
        res[layer] = out.features if layer == "features" else out.hidden_states[layer]
    for layer in attention_layers:
        res[("attention", layer)] = out.attentions[layer - 1]
    return res


def projection(student_width: int, teacher_width: int) -> nn.Module:
    """A learned map into the teacher's width (identity when the widths already agree)."""
    return nn.Identity() if student_width == teacher_width else nn.Linear(student_width, teacher_width)


def init_from(student: nn.Module, teacher: Teacher, layers: list[int] | None) -> list[int]:
    """Copy the teacher into the student, layer `layers[i]` into student layer i (default: every other layer,
    as DistilBERT does). Needs the same architecture and widths; fails naming what differs."""
    if teacher.modality != "text" or getattr(student, "modality", "") != "text":
        raise TunelabError("task.init_from_teacher copies transformer layers: text teachers and students only")
    s_cfg, t_cfg = student.net.config, teacher.net.net.config
    keys = ("model_type", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size",
            "max_position_embeddings")
    differ = [f"{k} {getattr(s_cfg, k, None)} vs {getattr(t_cfg, k, None)}" for k in keys
              if getattr(s_cfg, k, None) != getattr(t_cfg, k, None)]
    if differ:
        raise TunelabError(
            f"task.init_from_teacher: the student differs from the teacher in {', '.join(differ)} (student vs "
            f"teacher; copying layers needs the teacher's architecture and widths with fewer layers, e.g. "
            f"model.hidden_size={t_cfg.hidden_size} model.num_heads={t_cfg.num_attention_heads} "
            f"model.intermediate_size={t_cfg.intermediate_size} model.max_position_embeddings="
            f"{t_cfg.max_position_embeddings} model.num_layers={max(1, t_cfg.num_hidden_layers // 2)})"
        )
    s_n, t_n = s_cfg.num_hidden_layers, t_cfg.num_hidden_layers
    layers = list(layers) if layers is not None else [i * t_n // s_n for i in range(s_n)]
    if len(layers) != s_n or not all(0 <= t < t_n for t in layers):
        raise TunelabError(f"task.init_layers={layers}: expected {s_n} teacher layer indices in 0..{t_n - 1}, one per "
                           "student layer")
    source = teacher.net.net.state_dict()
    state = {}
    for key, value in student.net.state_dict().items():
        src = LAYER_INDEX.sub(lambda m: f"{m.group(1)}{layers[int(m.group(2))]}.", key, count=1)
        if src not in source or source[src].shape != value.shape:
            raise TunelabError(f"task.init_from_teacher: the teacher has no {src} shaped {tuple(value.shape)}")
        state[key] = source[src].detach().clone()
    student.net.load_state_dict(state)
    return layers


