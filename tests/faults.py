"""Fault injection for the resume tests: a callback, added from the command line, that SIGKILLs its own
process at a chosen point of a run (`+callbacks.kill._target_=faults.KillAt +callbacks.kill.at=...`)."""

from __future__ import annotations

import os
import signal
from typing import Any

from lightning import Callback


class KillAt(Callback):
    """Kill the process (SIGKILL: no clean-up, no exception handlers) at hook `at`, once `step` training steps
    have run. `at` is one of train_batch_end, validation_end, save_checkpoint, test_start, test_end."""

    def __init__(self, at: str, step: int = 0) -> None:
        self.at, self.step = at, step

    def _maybe(self, hook: str, trainer: Any) -> None:
        if hook == self.at and trainer.global_step >= self.step and not trainer.sanity_checking:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        self._maybe("train_batch_end", trainer)

    def on_validation_end(self, trainer: Any, *args: Any) -> None:
        self._maybe("validation_end", trainer)

    def on_save_checkpoint(self, trainer: Any, *args: Any) -> None:
        self._maybe("save_checkpoint", trainer)

    def on_test_start(self, trainer: Any, *args: Any) -> None:
        self._maybe("test_start", trainer)

    def on_test_end(self, trainer: Any, *args: Any) -> None:
        self._maybe("test_end", trainer)
