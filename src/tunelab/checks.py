"""Config values checked against rules before any work starts: the rule engine, and the rules of `data.*`.

`tunelab.config.validate` checks that each key exists; rules check what the values are. A batch size of `abc`,
`0` or `-4`, a negative rate or a fraction above one would otherwise fail with a traceback deep in PyTorch or
Lightning, or only after data was read. A table is `(key, Rule)` pairs, applied where the key is present
(`check`); a `data.*` rule also applies to `data.source.*` and `data.target.*` of a domain pair. Training's
table and its cross checks are `tunelab.run_checks`; predict and serve use this module for their own keys
and `DATA`, so the tools after training never import training code through it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from tunelab.errors import TunelabError

SIDES = ("source", "target")  # the two DataModules of a domain pair


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
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
        return f"{key}={show(value)} (expected {self.expected}{' or null' if self.null else ''}{got})"


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


def show(value: Any) -> str:
    """The value as it was written on the command line: null, true, 'abc', [1, 2]."""
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value)
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return repr(value)


def integer(low: int, high: int | None = None, *, null: bool = False) -> Rule:
    expected = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
    return Rule(lambda v: v >= low and (high is None or v <= high), expected, is_int, null)


def number(low: float, high: float | None = None, *, above: bool = False, below: bool = False,
           null: bool = False) -> Rule:
    """A number in an interval; `above`/`below` exclude its ends."""
    if high is None:
        expected = f"a number {'>' if above else '>='} {low}"
    else:
        expected = f"a number in {'(' if above else '['}{low}, {high}{')' if below else ']'}"

    def ok(v: Any) -> bool:
        return (v > low if above else v >= low) and (high is None or (v < high if below else v <= high))

    return Rule(ok, expected, is_number, null)


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

# data (text and images; domain pairs: each side): training's keys, and predict's field options and caps
DATA: tuple[tuple[str, Rule | Lazy], ...] = (
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
)

ABSENT = object()


def value_at(cfg: DictConfig, path: str) -> Any:
    """The value at `path`, or `ABSENT` when the key is not there or still `???` (check_required's job)."""
    parent_path, _, leaf = path.rpartition(".")
    parent = OmegaConf.select(cfg, parent_path, default=None) if parent_path else cfg
    if not isinstance(parent, DictConfig) or leaf not in parent:
        return ABSENT
    return parent[leaf]


def paths(cfg: DictConfig, key: str) -> Iterator[str]:
    """`key`, and for a data key each side of a domain pair."""
    yield key
    if key.startswith("data."):
        for side in SIDES:
            yield f"data.{side}.{key.removeprefix('data.')}"


def check(cfg: DictConfig, rules: tuple[tuple[str, Rule | Lazy], ...]) -> None:
    """Raise a TunelabError naming the first value of `rules` outside its domain."""
    for key, rule in rules:
        for path in paths(cfg, key):
            value = value_at(cfg, path)
            if value is not ABSENT and (problem := rule.error(path, value)):
                raise TunelabError(problem)
