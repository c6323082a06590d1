"""Every config value with an obvious domain, checked before any work starts.

`config.validate` checks that each key exists; this checks what the values are. A batch size of `abc`,
`0` or `-4`, a negative learning rate or a fraction above one would otherwise fail with a traceback deep
in PyTorch or Lightning, or only after data was read and training began. `RULES` is the table: one rule
per key, applied where the key is present (a `data.*` rule also to `data.source.*` and `data.target.*`
of a domain pair). `CROSS` holds the few checks that relate two values.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from omegaconf import DictConfig, ListConfig, OmegaConf

from tunelab.errors import TunelabError

SIDES = ("source", "target")  # the two DataModules of a domain pair


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


@dataclass(frozen=True)
class Rule:
    """`ok(value)` or the message says `expected`; `kind` names the value type asked for, so that a value of
    another type (a string where a count belongs) says what it got."""

    ok: Callable[[Any], bool]
    expected: str
    kind: Callable[[Any], bool] = lambda v: True
    null: bool = False

    def error(self, key: str, value: Any) -> str | None:
        if (value is None and self.null) or (value is not None and self.kind(value) and self.ok(value)):
            return None
        got = "" if value is None or self.kind(value) else f", got {_type_name(value)}"
        return f"{key}={_show(value)} (expected {self.expected}{' or null' if self.null else ''}{got})"


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, ListConfig | list):
        return "a list"
    if isinstance(value, DictConfig | dict):
        return "a mapping"
    return f"a {type(value).__name__}"


def _show(value: Any) -> str:
    """The value as it was written on the command line: null, true, 'abc', [1, 2]."""
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value)
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return repr(value)


def integer(low: int, high: int | None = None, *, null: bool = False) -> Rule:
    expected = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
    return Rule(lambda v: v >= low and (high is None or v <= high), expected, _int, null)


def number(low: float, high: float | None = None, *, above: bool = False, below: bool = False,
           null: bool = False) -> Rule:
    """A number in an interval; `above`/`below` exclude its ends."""
    if high is None:
        expected = f"a number {'>' if above else '>='} {low}"
    else:
        expected = f"a number in {'(' if above else '['}{low}, {high}{')' if below else ']'}"

    def ok(v: Any) -> bool:
        return (v > low if above else v >= low) and (high is None or (v < high if below else v <= high))

    return Rule(ok, expected, _num, null)


def choice(*values: Any, null: bool = False) -> Rule:
    """One of `values`; booleans never pass for numbers (True == 1)."""
    def ok(v: Any) -> bool:
        return any(v == c and isinstance(v, bool) == isinstance(c, bool) for c in values)

    return Rule(ok, f"one of {', '.join(map(repr, values))}", null=null)


@dataclass(frozen=True)
class Lazy:
    """A rule whose choices come from a library, looked up only when its key is present."""

    make: Callable[[], Rule]

    def error(self, key: str, value: Any) -> str | None:
        return self.make().error(key, value)


BOOL = Rule(lambda v: True, "true or false", lambda v: isinstance(v, bool))
PROBABILITY = number(0, 1, below=True)  # dropout, label smoothing: 1 would drop or smooth everything
FRACTION = number(0, 1, below=True)  # of the training file held out: 1 would leave no training data
POSITIVE = number(0, above=True)
NON_NEGATIVE = number(0)
COUNT = integer(1)
OPTIONAL_COUNT = integer(1, null=True)


def _batch_limit(v: Any) -> bool:
    return (_int(v) and v >= 0) or (isinstance(v, float) and 0.0 <= v <= 1.0)


BATCH_LIMIT = Rule(_batch_limit, "a number of batches >= 0 or a fraction in [0.0, 1.0]", _num, null=True)
VAL_INTERVAL = Rule(lambda v: (_int(v) and v >= 1) or (isinstance(v, float) and 0.0 < v <= 1.0),
                    "a number of batches >= 1 or a fraction of the epoch in (0.0, 1.0]", _num, null=True)


def _devices(v: Any) -> bool:
    if _int(v):
        return v >= 1 or v == -1
    if isinstance(v, str):
        return v == "auto" or bool(re.fullmatch(r"\s*(-1|[1-9]\d*|\d+(\s*,\s*\d+)*\s*,?)\s*", v))
    return isinstance(v, ListConfig | list) and len(v) > 0 and all(_int(x) and x >= 0 for x in v)


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
    # data (text and images; domain pairs: each side)
    ("data.batch_size", COUNT),
    ("data.eval_batch_size", OPTIONAL_COUNT),
    ("data.num_workers", integer(0)),
    ("data.val_fraction", FRACTION),
    ("data.test_fraction", FRACTION),
    ("data.seed", integer(0, 2**32 - 1)),
    ("data.limit_train", OPTIONAL_COUNT),
    ("data.limit_train_per_class", OPTIONAL_COUNT),
    ("data.limit_val_per_class", OPTIONAL_COUNT),
    ("data.limit_unlabelled", OPTIONAL_COUNT),
    ("data.labels", Rule(lambda v: len(set(v)) >= 2, "a list of at least two distinct labels",
                         lambda v: isinstance(v, ListConfig | list), null=True)),
    ("data.max_length", integer(2)),  # room for the special tokens around the text
    ("data.vocab_size", COUNT),
    ("data.max_record_bytes", COUNT),
    ("data.max_file_bytes", COUNT),
    ("data.num_proc", OPTIONAL_COUNT),
    ("data.pack", BOOL),
    ("data.trust_remote_code", BOOL),
    ("data.encoding_errors", choice("strict", "replace", "ignore")),
    ("data.image_size", OPTIONAL_COUNT),
    ("data.verify_images", BOOL),
    ("data.mode", choice("max_size_cycle", "min_size")),
    ("data.share_tokenizer", BOOL),
    ("data.collator.whole_word", BOOL),
    ("data.collator.fixed_count", BOOL),
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

_ABSENT = object()


def _value(cfg: DictConfig, path: str) -> Any:
    """The value at `path`, or `_ABSENT` when the key is not there or still `???` (check_required's job)."""
    parent_path, _, leaf = path.rpartition(".")
    parent = OmegaConf.select(cfg, parent_path, default=None) if parent_path else cfg
    if not isinstance(parent, DictConfig) or leaf not in parent:
        return _ABSENT
    return parent[leaf]


def _paths(cfg: DictConfig, key: str) -> Iterator[str]:
    """`key`, and for a data key each side of a domain pair."""
    yield key
    if key.startswith("data."):
        for side in SIDES:
            yield f"data.{side}.{key.removeprefix('data.')}"


def _epochs(cfg: DictConfig) -> str | None:
    """A run must have a budget that trains at least one step (trainer.max_epochs=0 trains nothing)."""
    trainer = cfg.get("trainer")
    if not isinstance(trainer, DictConfig):
        return None
    max_epochs, max_steps = trainer.get("max_epochs"), trainer.get("max_steps", -1)
    if not (_int(max_steps) and (max_steps >= 1 or max_steps == -1)):
        return (f"trainer.max_steps={_show(max_steps)} (expected an integer >= 1, or -1 to train for "
                "trainer.max_epochs)")
    by_steps = max_epochs == -1 and max_steps >= 1
    if max_epochs is None or (_int(max_epochs) and (max_epochs >= 1 or by_steps)):
        return None
    return (f"trainer.max_epochs={_show(max_epochs)} (expected an integer >= 1, or -1 with "
            "trainer.max_steps >= 1 to train by steps)")


def _heads(cfg: DictConfig) -> str | None:
    """A from-scratch transformer splits its width evenly across attention heads."""
    model = cfg.get("model")
    if not isinstance(model, DictConfig) or model.get("pretrained") or "num_heads" not in model:
        return None
    width, heads = model.get("hidden_size"), model.get("num_heads")
    if _int(width) and _int(heads) and heads > 0 and width % heads:
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
    if not _int(limit):
        return None
    for key in _paths(cfg, "data.max_length"):
        length = _value(cfg, key)
        if _int(length) and length > limit:
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
    for key, rule in RULES:
        for path in _paths(cfg, key):
            value = _value(cfg, path)
            if value is not _ABSENT and (problem := rule.error(path, value)):
                raise TunelabError(problem)
    for check in CROSS:
        if problem := check(cfg):
            raise TunelabError(problem)

