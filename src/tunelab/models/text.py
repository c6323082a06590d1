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

from tunelab.contracts import ATTENTION_MASK, INPUT_IDS, MLM_LABELS, Output
from tunelab.errors import TunelabError
from tunelab.folders import check_pretrained, own_tokenizer
from tunelab.models import mlm_fast_path
from tunelab.models.dropout import ATTENTION, register, use_cpu_dropout
from tunelab.runtime import settings

HEADS = {"classifier": AutoModelForSequenceClassification, "masked_lm": AutoModelForMaskedLM}
HEAD_NAMES = ("classifier", "score", "logits_proj")  # what sequence-classification models call their head
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
        net: PreTrainedModel | None = None,
        problem_type: str | None = None,
    ) -> None:
        """`problem_type`: what `config.json` says the outputs are (`tunelab.problems`: single-label,
        regression, multi-label), so a plain `pipeline` decodes them as trained."""
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
            if problem_type:
                kwargs["problem_type"] = problem_type
        # whether the head starts untrained (built here, or absent from the checkpoint), not loaded
        self.fresh_head = net is None
        if net is not None:  # built elsewhere, e.g. with pruned layer shapes no config can express
            self.net = net
        elif pretrained:
            source = check_pretrained(str(pretrained))
            self.net, self.fresh_head = self._load(HEADS[head], source, kwargs, ignore_mismatched_sizes,
                                                   trust_remote_code)
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
            if pretrained and net is None:
                self._check_tokenizer(tokenizer, source, trust_remote_code)
        if settings.cpu_dropout:  # runtime.cpu_dropout
            use_cpu_dropout(self.net)
        if gradient_checkpointing:
            self.net.gradient_checkpointing_enable()
        self._features: torch.Tensor | None = None
        # masked LM: when true (and the batch has `mlm_labels`), `forward` runs the head on the predicted
        # positions only; the MLM task turns it on
        self.sparse_mlm = False
        if head == "classifier":
            self.classifier.register_forward_pre_hook(self._keep_features)

    def __setstate__(self, state: dict) -> None:
        """Unpickled in another process (e.g. a `ddp_spawn` rank): register the CPU attention there too."""
        super().__setstate__(state)
        if self.net.config._attn_implementation == ATTENTION:
            register()

    @staticmethod
    def _load(cls: Any, source: str, kwargs: dict, ignore_mismatched_sizes: bool,
              trust_remote_code: bool) -> tuple[PreTrainedModel, bool]:
        """`from_pretrained`, back in training mode (it returns the model in eval mode, and Lightning keeps each
        submodule's mode, so fine-tuning would otherwise run without dropout), and whether the head is new."""
        try:
            net, info = cls.from_pretrained(source, ignore_mismatched_sizes=ignore_mismatched_sizes,
                                            trust_remote_code=trust_remote_code, output_loading_info=True, **kwargs)
            new = [k if isinstance(k, str) else k[0] for k in [*info.get("missing_keys", []),
                                                               *info.get("mismatched_keys", [])]]
            return net.train(), any(part in HEAD_NAMES for key in new for part in key.split("."))
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
        for name in HEAD_NAMES:
            if isinstance(getattr(self.net, name, None), nn.Module):
                return getattr(self.net, name)
        raise TunelabError(f"{type(self.net).__name__} has no classifier module named classifier/score")

    @property
    def mlm_head(self) -> nn.Module:
        """The masked-LM head (see `mlm_fast_path.mlm_head`)."""
        return mlm_fast_path.mlm_head(self.net)

    @property
    def vocab_projection(self) -> nn.Module:
        """The masked-LM head's last module: hidden states to vocabulary logits (the output embeddings)."""
        return self.net.get_output_embeddings()

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
        where the head allows it (and not while compiling). The predicted rows take `mlm_fast_path`."""
        if self.sparse_mlm and MLM_LABELS in batch and not (output_hidden_states or output_attentions):
            rows = mlm_fast_path.predicted_rows(self.net, batch, self.training)
            if not project and not torch.compiler.is_compiling() and mlm_fast_path.splits_head(self.net):
                return Output(None, mlm_fast_path.head_features(self.net, rows))
            return Output(self.mlm_head(rows.unsqueeze(0)).squeeze(0), rows)
        out = self.net(input_ids=batch[INPUT_IDS], attention_mask=batch.get(ATTENTION_MASK),
                       output_hidden_states=output_hidden_states, output_attentions=output_attentions)
        features, self._features = self._features, None
        return Output(out.logits, features, out.hidden_states if output_hidden_states else None,
                      out.attentions if output_attentions else None)
