"""Bad input on the command line of every entry point: one `error: ...` line and exit code 2.

Hydra reports a config it cannot compose (an unknown option or key, an override it cannot parse) over
several lines with exit code 1, the same as a crash. `report_bad_input` gives those the one line and exit
code 2 of every other bad input; what the task function raises keeps Hydra's reporting.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Callable
from typing import Any

from hydra.errors import (
    ConfigCompositionException,
    MissingConfigException,
    OverrideParseException,
    SearchPathException,
)
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from tunelab.errors import TunelabError

COMPOSITION_ERRORS = (ConfigCompositionException, OverrideParseException, SearchPathException)


def raised_in(error: BaseException, function: Callable) -> bool:
    """Whether `function` is on the error's traceback, i.e. the error came from running it."""
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code is function.__code__:
            return True
        tb = tb.tb_next
    return False


def bad_input(error: BaseException) -> TunelabError | Exception | None:
    """The composition error, or the TunelabError behind `error` (e.g. raised by a resolver)."""
    if isinstance(error, COMPOSITION_ERRORS):
        return error
    while error is not None and not isinstance(error, TunelabError):
        error = error.__cause__ or error.__context__
    return error


def unknown_key(error: OmegaConfBaseException) -> tuple[str, list[str]]:
    """`Key 'lrr' is not in struct` with the closest valid key, and the keys that do exist there."""
    head = str(error).splitlines()[0]
    parent = getattr(error, "parent_node", None)
    if not isinstance(parent, DictConfig):
        return head, []
    valid = sorted(k for k in parent if isinstance(k, str) and not k.startswith("_"))
    close = difflib.get_close_matches(str(getattr(error, "key", "")), valid, n=1)
    return head + (f"; did you mean {close[0]!r}?" if close else ""), valid


def one_line(error: Exception) -> str:
    """Hydra's message on one line, keeping what it names and the choices it lists."""
    if isinstance(error, TunelabError):
        return str(error)
    if isinstance(error, OverrideParseException):
        lines = [line for line in error.message.splitlines() if line and not line.startswith(("See ", "Error "))]
        return (f"cannot parse override {error.override!r}: {' '.join(lines)} (expected key=value in Hydra's "
                "override grammar, https://hydra.cc/docs/advanced/override_grammar/basic/)")
    lines = []
    for line in str(error).splitlines():
        if line.startswith(("Available options", "Config search path")):
            break
        if line.strip():
            lines.append(line.strip())
    if isinstance(error.__cause__, OmegaConfBaseException):  # an override of a key that does not exist
        what, valid = unknown_key(error.__cause__)
        notes = ([f"valid keys: {valid}"] if valid else []) + [line[:1].lower() + line[1:] for line in lines[1:]]
        return f"{lines[0].rstrip('.')}: {what}" + (f" ({'; '.join(notes)})" if notes else "")
    text = " ".join(lines)
    if isinstance(error, MissingConfigException) and error.options:
        group = (error.missing_cfg_file or "").rpartition("/")[0]
        text += f" (available options in {group!r}: {', '.join(error.options)})"
    return text


def report_bad_input(task: Callable) -> None:
    """Catch composition errors (and TunelabErrors from resolvers) before Hydra's own report.

    Hydra runs everything through `run_and_report`, which prints any exception and exits 1; it has no
    public hook for composition errors. Wrapping the function it is handed keeps Hydra's reporting for
    everything else, including every error the task function raises (a crash stays a crash).
    """
    from hydra._internal import utils

    report = utils.run_and_report

    def run_and_report(func: Callable[[], Any]) -> Any:
        def guarded() -> Any:
            try:
                return func()
            except Exception as e:
                found = None if raised_in(e, task) else bad_input(e)
                if found is None:
                    raise
                print(f"error: {one_line(found)}", file=sys.stderr)
                sys.exit(2)

        return report(guarded)

    utils.run_and_report = run_and_report

