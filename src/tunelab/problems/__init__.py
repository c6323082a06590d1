"""Problem types behind one interface (`Problem`), found by name.

`conf/problem/<name>.yaml` builds one for a training run; `from_card` rebuilds a trained model's from its card
(or, for a plain Hugging Face folder, from `problem_type` in its config.json). A new problem type is a module
with a class that implements `Problem`, a `register` call or an entry in `BUILT_IN`, and a config file.
"""

from __future__ import annotations

import importlib
from typing import Any

from tunelab.errors import TunelabError
from tunelab.problems.base import Problem

BUILT_IN = {
    "classification": "tunelab.problems.classification:Classification",
    "regression": "tunelab.problems.regression:Regression",
    "multi_label": "tunelab.problems.multi_label:MultiLabel",
}
HF_PROBLEM_TYPES = {"single_label_classification": "classification", "regression": "regression",
                    "multi_label_classification": "multi_label"}
_registered: dict[str, type] = {}

__all__ = ["Problem", "by_name", "from_card", "names", "register"]


def register(cls: type) -> type:
    """Make a problem class (with a `name`) known to `by_name` and `from_card`; usable as a decorator."""
    _registered[cls.name] = cls
    return cls


def names() -> list[str]:
    return sorted({*BUILT_IN, *_registered})


def by_name(name: str, module: str | None = None) -> type:
    """The problem class called `name`: built in, registered, or registered by importing `module` (an installed
    module a card names for a problem defined outside this package; nothing is read from the model folder)."""
    if name not in _registered and name not in BUILT_IN and module:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise TunelabError(f"problem {name!r}: its module {module!r} does not import ({e})") from None
    if name in _registered:
        return _registered[name]
    if name not in BUILT_IN:
        raise TunelabError(f"problem {name!r} is not known (expected one of {', '.join(names())})")
    module, attr = BUILT_IN[name].split(":")
    return getattr(importlib.import_module(module), attr)


def from_card(card: dict[str, Any], outputs: list[str] | None, hf_problem_type: str | None = None) -> Problem:
    """The problem of a saved model: its card's `problem` (cards written before problems had one are
    classifiers), else the `problem_type` of a plain transformers config."""
    fields = card.get("problem") if isinstance(card.get("problem"), dict) else {}
    name = fields.get("name") or HF_PROBLEM_TYPES.get(hf_problem_type or "", "classification")
    return by_name(name, fields.get("module")).from_card(fields, list(outputs or []))


def card_of(problem: Problem) -> dict[str, Any]:
    """The problem's card fields, with the module that registers it when it is not built in."""
    fields = dict(problem.card())
    if fields.get("name") not in BUILT_IN:
        fields["module"] = type(problem).__module__
    return fields
