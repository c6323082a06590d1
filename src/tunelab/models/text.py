"""Text networks from `transformers`: built from a small config, or loaded by directory or hub name.

The network is the ecosystem's own model class (`AutoModelForSequenceClassification`,
`AutoModelForMaskedLM`), so `save_pretrained` exports exactly what was trained and any
`transformers` user loads it by path. Features for domain heads and distillation are read off the
input of the model's own classifier, which is the pooled representation for every architecture.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from tunelab.contracts import IGNORE_INDEX, Output, at_predicted
from tunelab.errors import TunelabError
from tunelab.folders import check_pretrained
from tunelab.models.dropout import ATTENTION, scaled_dot_product_attention, use_cpu_dropout

HEADS = {"classifier": AutoModelForSequenceClassification, "masked_lm": AutoModelForMaskedLM}
# architectures that number positions from pad_token_id + 1 (fairseq's convention): that many fewer fit
OFFSET_POSITIONS = ("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer", "data2vec-text",
                    "roberta-prelayernorm", "xmod", "mpnet", "ibert")


def local_config(source: str) -> dict | None:
    """The config.json of a local model folder; None for a hub name or a folder without a readable one (loading
    the model then says what is wrong)."""
    path = Path(source).expanduser() / "config.json"
    try:
        config = json.loads(path.read_text()) if path.is_file() and path.stat().st_size < 1 << 20 else None
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def max_tokens(config: dict) -> int | None:
    """How many tokens one sequence may have: the model's absolute positions (None: no such limit)."""
    n = config.get("max_position_embeddings", config.get("n_positions"))
    if not isinstance(n, int) or config.get("position_biased_input") is False:  # DeBERTa: relative positions only
        return None
    if config.get("model_type") in OFFSET_POSITIONS:
        n -= int(config.get("pad_token_id") or 0) + 1
    return n


def _same_folder(a: str, b: str) -> bool:
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except (OSError, RuntimeError):
        return a == b


class TextModel(nn.Module):
    """A `transformers` model with a classification or masked-LM head."""

    modality = "text"

    def __init__(
        self,
        head: str = "classifier",
        labels: list[str] | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        *,
        pretrained: str | None = None,
        arch: str = "bert",
        hidden_size: int = 128,
        num_layers: int = 2,
        num_heads: int = 2,
        intermediate_size: int = 512,
        max_position_embeddings: int = 512,
        dropout: float = 0.1,
        ignore_mismatched_sizes: bool = False,
        trust_remote_code: bool = False,
        gradient_checkpointing: bool = False,
        vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise TunelabError(f"unknown head {head!r} (expected one of {sorted(HEADS)})")
        self.head = head
        kwargs: dict[str, Any] = {}
        if head == "classifier":
            if not labels:
                raise TunelabError("a classifier needs labelled data (data.label_field and its labels)")
            kwargs = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                      "label2id": {name: i for i, name in enumerate(labels)}}
        if pretrained:
            source = check_pretrained(str(pretrained))
            self.net = self._load(HEADS[head], source, kwargs, ignore_mismatched_sizes, trust_remote_code)
        else:
            if tokenizer is None:
                raise TunelabError("a from-scratch text model needs a tokenizer to size its vocabulary")
            # vocab_size: more embedding rows than tokens (e.g. BERT's 30522, or a multiple of 64) if asked
            config = AutoConfig.for_model(
                arch, vocab_size=vocab_size or len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
                num_attention_heads=num_heads, intermediate_size=intermediate_size,
                max_position_embeddings=max_position_embeddings, hidden_dropout_prob=dropout,
                attention_probs_dropout_prob=dropout, pad_token_id=tokenizer.pad_token_id, **kwargs,
            )
            self.net = HEADS[head].from_config(config, attn_implementation="sdpa")
        if tokenizer is not None:
            self._check_vocab(tokenizer)
            if pretrained:
                self._check_tokenizer(tokenizer, source, trust_remote_code)
        use_cpu_dropout(self.net)
        if gradient_checkpointing:
            self.net.gradient_checkpointing_enable()
        self._features: torch.Tensor | None = None
        # masked LM: when true (and the batch has `mlm_labels`), `forward` runs the head on the predicted
        # positions only; the MLM task turns it on
        self.sparse_mlm = False
        self._head_split: bool | None = None  # masked LM: whether its head splits before the vocabulary projection
        if head == "classifier":
            self.classifier.register_forward_pre_hook(self._keep_features)

    @staticmethod
    def _load(cls: Any, source: str, kwargs: dict, ignore_mismatched_sizes: bool, trust_remote_code: bool) -> PreTrainedModel:
        """`from_pretrained`, back in training mode: it returns the model in eval mode, and Lightning keeps each
        submodule's mode, so fine-tuning would otherwise run without dropout."""
        try:
            return cls.from_pretrained(source, ignore_mismatched_sizes=ignore_mismatched_sizes,
                                       trust_remote_code=trust_remote_code, **kwargs).train()
        except RuntimeError as e:
            raise TunelabError(
                f"model.pretrained: the checkpoint in {source} does not fit ({str(e).splitlines()[0]}); set "
                "model.ignore_mismatched_sizes=true to re-initialise a head of another size"
            ) from None
        except (OSError, ValueError) as e:
            raise TunelabError(f"model.pretrained: could not load {source!r} ({e})") from None

    def _check_vocab(self, tokenizer: PreTrainedTokenizerBase) -> None:
        rows = self.net.get_input_embeddings().num_embeddings
        if len(tokenizer) > rows:
            raise TunelabError(
                f"the tokenizer has {len(tokenizer)} tokens but the model's embeddings have {rows} rows "
                "(expected the tokenizer saved with the model)"
            )

    def _check_tokenizer(self, tokenizer: PreTrainedTokenizerBase, source: str, trust_remote_code: bool) -> None:
        """A tokenizer from another folder must be the model's own vocabulary: another one that fits the
        embeddings would train and predict on the wrong rows without any error."""
        from tunelab.artifacts import own_tokenizer  # artifacts builds text models: import at call time

        other = getattr(tokenizer, "name_or_path", "") or "(a tokenizer object)"
        if _same_folder(other, source):
            return
        config, own = self.net.config, own_tokenizer(source, trust_remote_code)
        if own is not None:
            if own.get_vocab() == tokenizer.get_vocab() and own.pad_token_id == tokenizer.pad_token_id:
                return
            detail = (f"{len(tokenizer)} tokens, pad id {tokenizer.pad_token_id}, against the model's own tokenizer's "
                      f"{len(own)} tokens, pad id {own.pad_token_id}, with other tokens or ids")
        elif len(tokenizer) == config.vocab_size and tokenizer.pad_token_id == config.pad_token_id:
            return
        else:
            detail = (f"{len(tokenizer)} tokens, pad id {tokenizer.pad_token_id}, against the model's vocab_size="
                      f"{config.vocab_size}, pad_token_id={config.pad_token_id}")
        raise TunelabError(
            f"data.tokenizer={other} does not match model.pretrained={source} ({detail}; expected the tokenizer "
            f"saved with the model, e.g. data.tokenizer={source})"
        )

    @property
    def classifier(self) -> nn.Module:
        for name in ("classifier", "score", "logits_proj"):
            if isinstance(getattr(self.net, name, None), nn.Module):
                return getattr(self.net, name)
        raise TunelabError(f"{type(self.net).__name__} has no classifier module named classifier/score")

    @property
    def mlm_head(self) -> nn.Module:
        """The masked-LM head: the one module besides the encoder (and dropout) that holds the output
        embeddings, e.g. BERT's `cls` or RoBERTa's `lm_head`. It maps hidden states to vocabulary logits
        position by position, so it can run on the masked positions alone."""
        decoder = self.net.get_output_embeddings()
        others = [(name, m) for name, m in self.net.named_children()
                  if m is not self.net.base_model and not isinstance(m, nn.Dropout)]
        if decoder is not None and len(others) == 1 and any(m is decoder for m in others[0][1].modules()):
            return others[0][1]
        names = [name for name, _ in others]
        raise TunelabError(
            f"{type(self.net).__name__}: cannot tell which of its modules {names} form the masked-LM head (expected "
            "one module holding the output embeddings next to the encoder); set task.sparse_head=false to compute "
            "the full-vocabulary logits instead"
        )

    @property
    def vocab_projection(self) -> nn.Module:
        """The masked-LM head's last module: hidden states to vocabulary logits (the output embeddings)."""
        return self.net.get_output_embeddings()

    def _head_features(self, rows: torch.Tensor) -> torch.Tensor:
        """The MLM head's output without its last module, the vocabulary projection (BERT's and RoBERTa's
        transform: dense, activation, layer norm), by running the head with that module as an identity."""
        decoder = self.vocab_projection
        parent, name = next((m, n) for m in self.mlm_head.modules() for n, c in m.named_children() if c is decoder)
        setattr(parent, name, nn.Identity())
        try:
            return self.mlm_head(rows.unsqueeze(0)).squeeze(0)
        finally:
            setattr(parent, name, decoder)

    def _splittable_head(self) -> bool:
        """Whether the head can stop before its vocabulary projection: a whole (unsharded) linear layer whose
        output is the head's output, checked once on two random rows."""
        decoder = self.vocab_projection
        weight = getattr(decoder, "weight", None)
        if (not isinstance(decoder, nn.Linear) or type(weight.data) is not torch.Tensor
                or weight.shape != (decoder.out_features, decoder.in_features)):
            return False
        if self._head_split is None:
            with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
                # its own generator: a draw from the global one would shift a resumed run's random stream
                probe = torch.randn(2, decoder.in_features, generator=torch.Generator().manual_seed(0))
                probe = probe.to(device=weight.device, dtype=weight.dtype)
                self._head_split = torch.allclose(decoder(self._head_features(probe)),
                                                  self.mlm_head(probe.unsqueeze(0)).squeeze(0), atol=1e-5)
        return self._head_split

    def _predicted_rows(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Final hidden states of the predicted rows (`at_predicted`), in `masked_targets` order."""
        mask = batch.get("attention_mask")
        if mask is not None and not torch.compiler.is_compiling() and bool(mask.all()):
            mask = None  # full packed blocks: SDPA's fastest kernels
        last = self._sparse_last_layer(batch)
        return self._full_encoder_rows(batch, mask) if last is None else self._sparse_last_rows(batch, mask, last)

    def _full_encoder_rows(self, batch: dict[str, torch.Tensor], mask: torch.Tensor | None) -> torch.Tensor:
        """Final hidden states of the predicted rows, in `masked_targets` order, after the whole encoder."""
        return at_predicted(self.net.base_model(input_ids=batch["input_ids"], attention_mask=mask)[0], batch)

    def _sparse_last_layer(self, batch: dict[str, torch.Tensor]) -> nn.Module | None:
        """The last encoder layer when it is a plain BERT/RoBERTa layer under SDPA attention, so that only the
        predicted rows need its queries and feed-forward; None (run the whole encoder) otherwise, e.g. when
        compiling, under FSDP (whose wrappers rename the layer class) or with relative position embeddings."""
        config = self.net.config
        layers = getattr(getattr(self.net.base_model, "encoder", None), "layer", None)
        if (torch.compiler.is_compiling() or not isinstance(layers, nn.ModuleList) or len(layers) < 1
                or type(layers[-1]).__name__ not in ("BertLayer", "RobertaLayer") or config.is_decoder
                or config._attn_implementation not in ("sdpa", ATTENTION)
                or getattr(config, "position_embedding_type", "absolute") != "absolute"
                or not bool((batch["mlm_labels"] != IGNORE_INDEX).any())):
            return None
        return layers[-1]

    def _sparse_last_rows(self, batch: dict[str, torch.Tensor], mask: torch.Tensor | None,
                          last: nn.Module) -> torch.Tensor:
        """Final hidden states of the predicted rows, in `masked_targets` order. Every layer but the last runs
        on all positions; the last computes keys and values for all of them but queries, attention output
        and feed-forward for the predicted rows only (the same numbers, about 15% of that layer's work)."""
        base, ids = self.net.base_model, batch["input_ids"]
        key_mask = None if mask is None else mask.bool()[:, None, None, :]
        hidden = base.embeddings(input_ids=ids)
        for layer in base.encoder.layer[:-1]:
            hidden = layer(hidden, key_mask)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        positions, keep = batch.get("mlm_positions"), None
        if positions is None:  # each row's predicted positions first, padded to the row with the most
            chosen = batch["mlm_labels"] != IGNORE_INDEX
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
            key_mask, attention.dropout.p if self.training else 0.0, attention.scaling,
        ).transpose(1, 2).reshape(b, -1, heads * size)
        attended = last.attention.output(context, queries)
        rows = last.output(last.intermediate(attended), attended).flatten(0, 1)
        return rows if keep is None else rows[keep]

    @property
    def feature_size(self) -> int:
        return int(self.net.config.hidden_size)

    def _keep_features(self, module: nn.Module, args: tuple) -> None:
        x = args[0]
        self._features = x[:, 0] if x.dim() == 3 else x

    def forward(self, batch: dict[str, torch.Tensor], output_hidden_states: bool = False,
                output_attentions: bool = False, project: bool = True) -> Output:
        """Logits; with `sparse_mlm` (and `mlm_labels` in the batch) those of the predicted rows only, in
        `masked_targets` order, never the batch × length × vocabulary tensor. `project=False` returns no
        logits but the head's output before its vocabulary projection, for a loss fused with that projection,
        where the head allows it (and not while compiling)."""
        if self.sparse_mlm and "mlm_labels" in batch and not (output_hidden_states or output_attentions):
            rows = self._predicted_rows(batch)
            if not project and not torch.compiler.is_compiling() and self._splittable_head():
                return Output(None, self._head_features(rows))
            return Output(self.mlm_head(rows.unsqueeze(0)).squeeze(0), rows)
        out = self.net(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                       output_hidden_states=output_hidden_states, output_attentions=output_attentions)
        features, self._features = self._features, None
        return Output(out.logits, features, out.hidden_states if output_hidden_states else None,
                      out.attentions if output_attentions else None)
