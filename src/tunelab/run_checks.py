"""Every value of a training run's config with an obvious domain, checked before any work starts.

`RULES` is the table (one rule per key, `tunelab.checks` applies it; the `data.*` rules are `checks.DATA`,
shared with predict), `CROSS` holds the few checks that relate two values, some of which ask the model or
task code (`tunelab.models.text`, `tunelab.tasks.prompt`): so this module sits on the run side, beside
`tunelab.train`, which calls `check_values`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from omegaconf import DictConfig, ListConfig, OmegaConf

from tunelab.checks import (
    BOOL,
    COUNT,
    DATA,
    FRACTION,
    NON_NEGATIVE,
    OPTIONAL_COUNT,
    POSITIVE,
    PROBABILITY,
    Lazy,
    Rule,
    check,
    choice,
    integer,
    is_int,
    is_number,
    number,
    paths,
    show,
    value_at,
)
from tunelab.errors import TunelabError


def _batch_limit(v: Any) -> bool:
    return (is_int(v) and v >= 0) or (isinstance(v, float) and 0.0 <= v <= 1.0)


BATCH_LIMIT = Rule(_batch_limit, "a number of batches >= 0 or a fraction in [0.0, 1.0]", is_number, null=True)
VAL_INTERVAL = Rule(lambda v: (is_int(v) and v >= 1) or (isinstance(v, float) and 0.0 < v <= 1.0),
                    "a number of batches >= 1 or a fraction of the epoch in (0.0, 1.0]", is_number, null=True)


def _devices(v: Any) -> bool:
    if is_int(v):
        return v >= 1 or v == -1
    if isinstance(v, str):
        return v == "auto" or bool(re.fullmatch(r"\s*(-1|[1-9]\d*|\d+(\s*,\s*\d+)*\s*,?)\s*", v))
    return isinstance(v, ListConfig | list) and len(v) > 0 and all(is_int(x) and x >= 0 for x in v)


DEVICES = Rule(_devices, "a number of devices >= 1, -1 (all), 'auto' or a list of device ids")


def _literals(annotation: Any) -> list[Any]:
    """The values of every `Literal[...]` inside an annotation (Lightning's precision type)."""
    if get_origin(annotation) is Literal:
        return list(get_args(annotation))
    return [v for arg in get_args(annotation) for v in _literals(arg)]


def _precisions() -> Rule:
    from typing import get_type_hints

    from lightning.pytorch import Trainer

    return choice(*_literals(get_type_hints(Trainer.__init__)["precision"]))


def _accelerators() -> Rule:
    from lightning.pytorch.accelerators import AcceleratorRegistry

    return choice("auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators()))


def _strategies() -> Rule:
    from lightning.pytorch.strategies import StrategyRegistry

    names = ("auto", *StrategyRegistry.available_strategies())
    expected = f"one of {', '.join(names)} (or a strategy config)"
    return Rule(lambda v: not isinstance(v, str) or v in names, expected)


def _schedules() -> Rule:
    from transformers import SchedulerType

    return choice(*(t.value for t in SchedulerType))


RULES: tuple[tuple[str, Rule | Lazy], ...] = (
    ("seed", integer(0, 2**32 - 1)),  # Lightning draws a random seed outside this range
    ("train", BOOL),
    ("test", BOOL),
    ("compile", BOOL),
    *DATA,
    # model
    ("model.hidden_size", COUNT),
    ("model.num_layers", COUNT),
    ("model.num_heads", COUNT),
    ("model.intermediate_size", COUNT),
    ("model.max_position_embeddings", COUNT),
    ("model.vocab_size", OPTIONAL_COUNT),
    ("model.dropout", PROBABILITY),
    ("model.drop_rate", PROBABILITY),
    ("model.gradient_checkpointing", BOOL),
    ("model.ignore_mismatched_sizes", BOOL),
    ("model.trust_remote_code", BOOL),
    # task
    ("problem.label_smoothing", PROBABILITY),
    # tuning (conf/tuning)
    ("tuning.method", choice("full", "head", "top_k", "bitfit", "lora")),
    ("tuning.k", OPTIONAL_COUNT),
    ("tuning.layer_decay", number(0, 1, above=True, null=True)),
    ("tuning.backbone_lr_mult", NON_NEGATIVE),
    ("tuning.rank", COUNT),
    ("tuning.alpha", POSITIVE),
    ("tuning.dropout", PROBABILITY),
    ("tuning.lr.scratch", POSITIVE),
    ("tuning.lr.pretrained", POSITIVE),
    ("task.adapt", BOOL),
    ("task.domain_weight", NON_NEGATIVE),
    ("task.gamma", NON_NEGATIVE),
    ("task.lambda_max", NON_NEGATIVE),
    ("task.bottleneck_dim", OPTIONAL_COUNT),
    ("task.discriminator_dropout", PROBABILITY),
    ("task.discriminator_batch_norm", BOOL),
    ("task.embed_samples", integer(0)),
    ("task.alpha", number(0, 1)),
    ("task.temperature", POSITIVE),
    ("task.hidden_weight", NON_NEGATIVE),
    ("task.attention_weight", NON_NEGATIVE),
    ("task.hidden_loss", choice("mse", "cosine")),
    ("task.init_from_teacher", BOOL),
    ("task.cache_teacher", BOOL),
    ("task.latency_repeats", COUNT),
    ("task.sparse_head", BOOL),
    ("task.num_examples", integer(0)),
    ("teacher.trust_remote_code", BOOL),
    # optimizer and schedule
    ("optimizer.lr", POSITIVE),
    ("optimizer.weight_decay", NON_NEGATIVE),
    ("optimizer.eps", POSITIVE),
    ("optimizer.momentum", number(0, 1, below=True)),
    ("scheduler.name", Lazy(_schedules)),
    ("scheduler.warmup_ratio", FRACTION),
    ("scheduler.alpha", NON_NEGATIVE),
    ("scheduler.beta", NON_NEGATIVE),
    # trainer (max_epochs and max_steps: `_epochs`)
    ("trainer.min_epochs", integer(0, null=True)),
    ("trainer.accumulate_grad_batches", COUNT),
    ("trainer.devices", DEVICES),
    ("trainer.num_nodes", COUNT),
    ("trainer.accelerator", Lazy(_accelerators)),
    ("trainer.strategy", Lazy(_strategies)),
    ("trainer.precision", Lazy(_precisions)),
    ("trainer.gradient_clip_val", number(0, null=True)),
    ("trainer.val_check_interval", VAL_INTERVAL),
    ("trainer.check_val_every_n_epoch", OPTIONAL_COUNT),
    ("trainer.log_every_n_steps", integer(0)),
    ("trainer.limit_train_batches", BATCH_LIMIT),
    ("trainer.limit_val_batches", BATCH_LIMIT),
    ("trainer.limit_test_batches", BATCH_LIMIT),
    ("trainer.deterministic", Rule(lambda v: isinstance(v, bool) or v == "warn", "true, false or 'warn'")),
    ("trainer.enable_progress_bar", BOOL),
    ("trainer.sync_batchnorm", BOOL),
    # monitoring and callbacks
    ("monitor.mode", choice("min", "max")),
    ("callbacks.model_checkpoint.save_top_k", integer(-1)),
    ("callbacks.model_checkpoint.every_n_train_steps", integer(0, null=True)),
    ("callbacks.early_stopping.patience", integer(0)),
    ("callbacks.early_stopping.min_delta", NON_NEGATIVE),
    ("callbacks.throughput.window_size", integer(2)),
    ("callbacks.lr_monitor.logging_interval", choice("step", "epoch", null=True)),
)


def _epochs(cfg: DictConfig) -> str | None:
    """A run must have a budget that trains at least one step (trainer.max_epochs=0 trains nothing)."""
    trainer = cfg.get("trainer")
    if not isinstance(trainer, DictConfig):
        return None
    max_epochs, max_steps = trainer.get("max_epochs"), trainer.get("max_steps", -1)
    if not (is_int(max_steps) and (max_steps >= 1 or max_steps == -1)):
        return (f"trainer.max_steps={show(max_steps)} (expected an integer >= 1, or -1 to train for "
                "trainer.max_epochs)")
    by_steps = max_epochs == -1 and max_steps >= 1
    if max_epochs is None or (is_int(max_epochs) and (max_epochs >= 1 or by_steps)):
        return None
    return (f"trainer.max_epochs={show(max_epochs)} (expected an integer >= 1, or -1 with "
            "trainer.max_steps >= 1 to train by steps)")


def _heads(cfg: DictConfig) -> str | None:
    """A from-scratch transformer splits its width evenly across attention heads."""
    model = cfg.get("model")
    if not isinstance(model, DictConfig) or model.get("pretrained") or "num_heads" not in model:
        return None
    width, heads = model.get("hidden_size"), model.get("num_heads")
    if is_int(width) and is_int(heads) and heads > 0 and width % heads:
        return (f"model.hidden_size={width} is not a multiple of model.num_heads={heads} (expected a width "
                "that splits evenly across the attention heads)")
    return None


def _positions(cfg: DictConfig) -> str | None:
    """Sequences longer than the model has position embeddings fail only once training reaches them."""
    from tunelab.models.text import TextModel, local_config, max_tokens

    model = cfg.get("model")
    if not isinstance(model, DictConfig) or model.get("_target_") != f"{TextModel.__module__}.TextModel":
        return None
    if model.get("pretrained"):
        config = local_config(str(model.pretrained))
        limit = max_tokens(config) if config is not None else None
        source = f"the {limit} positions of model.pretrained={model.pretrained}"
    else:
        limit = model.get("max_position_embeddings", 512)
        source = f"model.max_position_embeddings={limit}"
    if not is_int(limit):
        return None
    for key in paths(cfg, "data.max_length"):
        length = value_at(cfg, key)
        if is_int(length) and length > limit:
            return f"{key}={length} exceeds {source} (expected {key} <= {limit})"
    return None


def _prompt(cfg: DictConfig) -> str | None:
    """task=prompt: templates with both slots and a backbone with a masked-LM head (tunelab.tasks.prompt)."""
    task = cfg.get("task")
    if not isinstance(task, DictConfig) or not str(task.get("_target_", "")).endswith("prompt.PromptTask"):
        return None
    from tunelab.tasks.prompt import check_config

    return check_config(cfg)


def _teacher(cfg: DictConfig) -> str | None:
    """A missing teacher folder, named by the key the user set (the data reads its tokenizer from there first)."""
    from tunelab.folders import is_local

    path = OmegaConf.select(cfg, "teacher.path", default=None)
    if not isinstance(path, str) or not is_local(path) or Path(path).expanduser().exists():
        return None
    return (f"teacher.path: directory not found: {Path(path).expanduser()} (expected a run folder, a model folder "
            "or a hub name; make a teacher with `python train.py task=finetune`)")


CROSS: tuple[Callable[[DictConfig], str | None], ...] = (_epochs, _heads, _positions, _prompt, _teacher)


def check_values(cfg: DictConfig) -> None:
    """Raise a TunelabError naming the first value outside its domain, before anything is built."""
    check(cfg, RULES)
    for cross_check in CROSS:
        if problem := cross_check(cfg):
            raise TunelabError(problem)
