"""The masked-LM fast path: compute the predicted rows only, never the batch × length × vocabulary logits.

`TextModel` with `sparse_mlm` takes it. Which parts an architecture gets is declared, not probed:

- any masked LM whose head is one module holding the output embeddings (`mlm_head`): the whole encoder, then
  the head on the predicted rows alone;
- an architecture in `LAYOUTS` (keyed by `config.model_type`), as transformers builds it: besides, the last
  encoder layer computes queries, attention output and feed-forward for the predicted rows only
  (`sparse_last_rows`), and the head can stop before its vocabulary projection (`head_features`), which the
  training loss then fuses with the cross-entropy. Not while compiling, nor under FSDP (whose wrappers
  replace the layer modules), nor with relative positions or other attention than SDPA: those take the plain
  path above.

Adding an architecture to `LAYOUTS` declares that its layers are BERT-style (`attention.self` with query, key
and value, `attention.output`, `intermediate`, `output`) and that its head's output is its vocabulary
projection's output; `tests/test_mlm.py` checks both against the stock forward pass for every entry.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from tunelab.contracts import ATTENTION_MASK, IGNORE_INDEX, INPUT_IDS, MLM_LABELS, MLM_POSITIONS, at_predicted
from tunelab.errors import TunelabError
from tunelab.models.dropout import ATTENTION, scaled_dot_product_attention


@dataclass(frozen=True)
class Layout:
    """Where a masked LM keeps the parts the fast path runs, as `get_submodule` paths."""

    layer: str  # the encoder layer's class, `module.Class`: anything else there (a wrapper) takes the plain path
    layers: str  # the encoder layers (an `nn.ModuleList`), from the base model
    head: str  # the masked-LM head, from the `*ForMaskedLM` model
    decoder: str  # the head's vocabulary projection, from the head: its output is the head's output

    def layer_class(self) -> type:
        module, _, name = self.layer.rpartition(".")
        return getattr(importlib.import_module(module), name)


LAYOUTS = {
    "bert": Layout("transformers.models.bert.modeling_bert.BertLayer", "encoder.layer", "cls", "predictions.decoder"),
    "roberta": Layout("transformers.models.roberta.modeling_roberta.RobertaLayer", "encoder.layer", "lm_head",
                      "decoder"),
}


def layout(net: PreTrainedModel) -> Layout | None:
    """`net`'s entry in `LAYOUTS`, when `net` has the parts it names and the declared decoder is the model's
    output embeddings; None otherwise (the plain path)."""
    found = LAYOUTS.get(getattr(net.config, "model_type", None))
    if found is None:
        return None
    try:
        decoder = net.get_submodule(found.head).get_submodule(found.decoder)
    except AttributeError:
        return None
    return found if decoder is net.get_output_embeddings() else None


def mlm_head(net: PreTrainedModel) -> nn.Module:
    """The masked-LM head: the module `LAYOUTS` names, or else the one module besides the encoder (and dropout)
    that holds the output embeddings, e.g. BERT's `cls` or RoBERTa's `lm_head`. It maps hidden states to
    vocabulary logits position by position, so it can run on the masked positions alone."""
    found = layout(net)
    if found is not None:
        return net.get_submodule(found.head)
    decoder = net.get_output_embeddings()
    others = [(name, m) for name, m in net.named_children() if m is not net.base_model and not isinstance(m, nn.Dropout)]
    if decoder is not None and len(others) == 1 and any(m is decoder for m in others[0][1].modules()):
        return others[0][1]
    names = [name for name, _ in others]
    raise TunelabError(
        f"{type(net).__name__}: cannot tell which of its modules {names} form the masked-LM head (expected "
        "one module holding the output embeddings next to the encoder); set task.sparse_head=false to compute "
        "the full-vocabulary logits instead"
    )


def splits_head(net: PreTrainedModel) -> bool:
    """Whether the head can stop before its vocabulary projection: an architecture in `LAYOUTS` whose projection
    is a whole (unsharded) linear layer."""
    decoder = net.get_output_embeddings()
    weight = getattr(decoder, "weight", None)
    return (layout(net) is not None and isinstance(decoder, nn.Linear) and type(weight.data) is torch.Tensor
            and weight.shape == (decoder.out_features, decoder.in_features))


def head_features(net: PreTrainedModel, rows: torch.Tensor) -> torch.Tensor:
    """The MLM head's output without its vocabulary projection (BERT's and RoBERTa's transform: dense,
    activation, layer norm), by running the head with that module as an identity. Only where `splits_head`."""
    found, head = layout(net), mlm_head(net)
    path, _, name = found.decoder.rpartition(".")
    parent = head.get_submodule(path)
    decoder = getattr(parent, name)
    setattr(parent, name, nn.Identity())
    try:
        return head(rows.unsqueeze(0)).squeeze(0)
    finally:
        setattr(parent, name, decoder)


def predicted_rows(net: PreTrainedModel, batch: dict[str, torch.Tensor], training: bool) -> torch.Tensor:
    """Final hidden states of the predicted rows (`at_predicted`), in `masked_targets` order."""
    mask = batch.get(ATTENTION_MASK)
    if mask is not None and not torch.compiler.is_compiling() and bool(mask.all()):
        mask = None  # full packed blocks: SDPA's fastest kernels
    last = sparse_last_layer(net, batch)
    return full_encoder_rows(net, batch, mask) if last is None else sparse_last_rows(net, batch, mask, last, training)


def full_encoder_rows(net: PreTrainedModel, batch: dict[str, torch.Tensor], mask: torch.Tensor | None) -> torch.Tensor:
    """Final hidden states of the predicted rows, in `masked_targets` order, after the whole encoder."""
    return at_predicted(net.base_model(input_ids=batch[INPUT_IDS], attention_mask=mask)[0], batch)


def sparse_last_layer(net: PreTrainedModel, batch: dict[str, torch.Tensor]) -> nn.Module | None:
    """The last encoder layer when `LAYOUTS` declares it and it is the class declared there, under SDPA
    attention, so that only the predicted rows need its queries and feed-forward; None (run the whole encoder)
    otherwise, e.g. when compiling, under FSDP (whose wrappers replace the layer) or with relative position
    embeddings."""
    found, config = layout(net), net.config
    try:
        layers = net.base_model.get_submodule(found.layers) if found is not None else None
    except AttributeError:
        layers = None
    if (torch.compiler.is_compiling() or not isinstance(layers, nn.ModuleList) or len(layers) < 1
            or type(layers[-1]) is not found.layer_class() or config.is_decoder
            or config._attn_implementation not in ("sdpa", ATTENTION)
            or getattr(config, "position_embedding_type", "absolute") != "absolute"
            or not bool((batch[MLM_LABELS] != IGNORE_INDEX).any())):
        return None
    return layers[-1]


def sparse_last_rows(net: PreTrainedModel, batch: dict[str, torch.Tensor], mask: torch.Tensor | None,
                     last: nn.Module, training: bool) -> torch.Tensor:
    """Final hidden states of the predicted rows, in `masked_targets` order. Every layer but the last runs
    on all positions; the last computes keys and values for all of them but queries, attention output
    and feed-forward for the predicted rows only (the same numbers, about 15% of that layer's work)."""
    base, ids = net.base_model, batch[INPUT_IDS]
    key_mask = None if mask is None else mask.bool()[:, None, None, :]
    hidden = base.embeddings(input_ids=ids)
    for layer in base.get_submodule(layout(net).layers)[:-1]:
        hidden = layer(hidden, key_mask)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    positions, keep = batch.get(MLM_POSITIONS), None
    if positions is None:  # each row's predicted positions first, padded to the row with the most
        chosen = batch[MLM_LABELS] != IGNORE_INDEX
        counts = chosen.sum(1)
        positions = torch.argsort((~chosen).to(torch.int8), dim=1, stable=True)[:, : int(counts.max())]
        keep = (torch.arange(positions.shape[1], device=ids.device)[None] < counts[:, None]).flatten()
    attention, (b, _, h) = last.attention.self, hidden.shape
    heads, size = attention.num_attention_heads, attention.attention_head_size

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.view(b, -1, heads, size).transpose(1, 2)

    queries = hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, h))
    context = scaled_dot_product_attention(
        split(attention.query(queries)), split(attention.key(hidden)), split(attention.value(hidden)),
        key_mask, attention.dropout.p if training else 0.0, attention.scaling,
    ).transpose(1, 2).reshape(b, -1, heads * size)
    attended = last.attention.output(context, queries)
    rows = last.output(last.intermediate(attended), attended).flatten(0, 1)
    return rows if keep is None else rows[keep]
