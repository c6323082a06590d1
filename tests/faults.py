"""Fault injection for the resume tests: a callback, added from the command line, that SIGKILLs its own
process at a chosen point of a run (`+callbacks.kill._target_=faults.KillAt +callbacks.kill.at=...`)."""

from __future__ import annotations

import io
import os
import signal
import sys
from pathlib import Path
from typing import Any

from lightning import Callback

# moments found by audit events (`sys.addaudithook`): the event and the name it makes (a symlink's: a part)
AUDITED = {"export": ("os.rename", "model"), "latest": ("os.symlink", "latest"), "latest_rename": ("os.rename", "latest")}


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KillAt(Callback):
    """Kill the process (SIGKILL: no clean-up, no exception handlers) at `at`, once `step` training steps
    have run. `at` is a hook: train_batch_end, validation_batch_end, validation_end, save_checkpoint (the
    checkpoint is assembled, nothing of it written yet), test_start, test_end; or a moment of a write:
    checkpoint_write (half of `last.ckpt`'s bytes are in its file, the rest never comes), export (the
    exported model is complete in its temporary folder, about to be renamed to `model/`), latest (the run
    is marked finished; the link that repoints `logs/<task>/latest` at it is about to be made), latest_rename
    (that link is made under a temporary name, about to be renamed to `latest`)."""

    def __init__(self, at: str, step: int = 0) -> None:
        self.at, self.step = at, step
        self._trainer: Any = None

    def _maybe(self, hook: str, trainer: Any) -> None:
        if hook == self.at and trainer.global_step >= self.step and not trainer.sanity_checking:
            die()

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self._trainer is not None:
            return
        self._trainer = trainer
        if self.at in AUDITED:  # the audit event comes just before the operation
            sys.addaudithook(self._audit)
        if self.at == "checkpoint_write":
            import torch

            save = torch.save

            def half_then_die(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
                if not isinstance(f, (str, os.PathLike)) or "last.ckpt" not in Path(f).name:
                    return save(obj, f, *args, **kwargs)
                buffer = io.BytesIO()
                save(obj, buffer, *args, **kwargs)
                Path(f).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                self._maybe("checkpoint_write", trainer)
                Path(f).write_bytes(buffer.getvalue())  # not this step: complete the write after all

            torch.save = half_then_die

    def _audit(self, event: str, args: tuple) -> None:
        kind, name = AUDITED[self.at]
        if event != kind:
            return
        made = Path(os.fsdecode(args[1])).name
        if made == name or (kind == "os.symlink" and name in made):
            self._maybe(self.at, self._trainer)

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        self._maybe("train_batch_end", trainer)

    def on_validation_batch_end(self, trainer: Any, *args: Any) -> None:
        self._maybe("validation_batch_end", trainer)

    def on_validation_end(self, trainer: Any, *args: Any) -> None:
        self._maybe("validation_end", trainer)

    def on_save_checkpoint(self, trainer: Any, *args: Any) -> None:
        self._maybe("save_checkpoint", trainer)

    def on_test_start(self, trainer: Any, *args: Any) -> None:
        self._maybe("test_start", trainer)

    def on_test_end(self, trainer: Any, *args: Any) -> None:
        self._maybe("test_end", trainer)
