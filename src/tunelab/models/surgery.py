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


# ----------------------------------------------------------------------------- structured pruning
# encoders whose layers are laid out as BERT's: layer.attention.self.{query,key,value}, layer.attention.output.dense,
# layer.intermediate.dense, layer.output.dense
BERT_LIKE = ("bert", "roberta", "xlm-roberta", "camembert", "electra", "data2vec-text")


def encoder_layers(net: nn.Module) -> nn.ModuleList:
    """The transformer layers of a BERT-like `transformers` model (fails naming the architecture otherwise)."""
    model_type = getattr(getattr(net, "config", None), "model_type", None)
    encoder = getattr(getattr(net, "base_model", None), "encoder", None)
    if model_type not in BERT_LIKE or not isinstance(getattr(encoder, "layer", None), nn.ModuleList):
        raise TunelabError(f"structured pruning needs a BERT-like encoder (model_type in {list(BERT_LIKE)}); this "
                           f"model is {model_type!r} (use prune=unstructured for other architectures)")
    return encoder.layer


def slice_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A smaller copy of `linear` keeping rows (dim 0, outputs) or columns (dim 1, inputs) `index`."""
    weight = linear.weight.detach().index_select(dim, index).clone()
    bias = linear.bias.detach()[index].clone() if linear.bias is not None and dim == 0 else (
        linear.bias.detach().clone() if linear.bias is not None else None)
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new.train(linear.training)


def keep_heads(layer: nn.Module, heads: list[int]) -> None:
    """Slice one layer's attention to the heads in `heads` (at least one): query/key/value rows, output columns."""
    attn = layer.attention.self
    if not heads:
        raise TunelabError("structured pruning keeps at least one attention head per layer")
    d = attn.attention_head_size
    index = torch.cat([torch.arange(h * d, (h + 1) * d) for h in sorted(heads)])
    for name in ("query", "key", "value"):
        setattr(attn, name, slice_linear(getattr(attn, name), index, 0))
    layer.attention.output.dense = slice_linear(layer.attention.output.dense, index, 1)
    attn.num_attention_heads, attn.all_head_size = len(heads), len(heads) * d


def keep_neurons(layer: nn.Module, neurons: list[int]) -> None:
    """Slice one layer's feed-forward block to the intermediate neurons in `neurons`."""
    index = torch.tensor(sorted(neurons), dtype=torch.long)
    layer.intermediate.dense = slice_linear(layer.intermediate.dense, index, 0)
    layer.output.dense = slice_linear(layer.output.dense, index, 1)


def keep_layers(net: nn.Module, layers: list[int]) -> None:
    """Keep the transformer layers `layers` (in order) and say so in the config."""
    encoder = net.base_model.encoder
    encoder.layer = nn.ModuleList([encoder_layers(net)[i] for i in sorted(layers)])
    net.config.num_hidden_layers = len(layers)


def layout(net: nn.Module) -> list[dict[str, int]]:
    """Per-layer shapes: heads and feed-forward width of every transformer layer."""
    return [{"heads": int(layer.attention.self.num_attention_heads), "ffn": int(layer.intermediate.dense.out_features)}
            for layer in encoder_layers(net)]


def apply_layout(net: nn.Module, shapes: list[dict[str, int]]) -> None:
    """Give a freshly built model the per-layer shapes of a pruned one, before its weights are loaded."""
    if len(shapes) != len(encoder_layers(net)):
        keep_layers(net, list(range(len(shapes))))
    for layer, shape in zip(encoder_layers(net), shapes, strict=True):
        keep_heads(layer, list(range(int(shape["heads"]))))
        keep_neurons(layer, list(range(int(shape["ffn"]))))


def standard_config(net: nn.Module) -> bool:
    """Write the shapes into the config where it can hold them (one FFN width); whether a plain
    `transformers` model of that config has exactly these shapes (no head was removed)."""
    shapes = layout(net)
    widths = {s["ffn"] for s in shapes}
    if len(widths) == 1:
        net.config.intermediate_size = widths.pop()
    full = net.config.num_attention_heads
    return len({s["ffn"] for s in shapes}) == 1 and all(s["heads"] == full for s in shapes)


def fit_shapes(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Resize the convolutions, batch norms and linear layers of `module` to the tensors of `state` (a channel-
    pruned CNN's weights), so that `load_state_dict` fits without `ignore_mismatched_sizes`."""
    for name, child in list(module.named_modules()):
        weight = state.get(f"{name}.weight")
        if weight is None or tuple(weight.shape) == tuple(getattr(child, "weight", torch.empty(0)).shape):
            continue
        if isinstance(child, nn.Conv2d):
            child.in_channels, child.out_channels = weight.shape[1] * child.groups, weight.shape[0]
        elif isinstance(child, nn.BatchNorm2d):
            child.num_features = weight.shape[0]
            for buffer in ("running_mean", "running_var"):
                setattr(child, buffer, torch.zeros(weight.shape[0]))
        elif isinstance(child, nn.Linear):
            child.out_features, child.in_features = weight.shape
        else:
            continue
        child.weight = nn.Parameter(torch.empty_like(weight))
        if getattr(child, "bias", None) is not None:
            child.bias = nn.Parameter(torch.empty(weight.shape[0]))
