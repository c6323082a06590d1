"""What a run changes in its process, done explicitly when it starts: importing tunelab changes nothing global.

`configure(cfg)` is the first call of `tunelab.train.run`; the `runtime:` keys of conf/train.yaml switch its
parts (all on by default):

- the config resolvers (`run_dir`, `output_subdir`, `embedded`, `cwd`), always: Hydra needs them while it
  composes, so the entry points (`train.py`, `tunelab.config.compose_config`) register them first; this
  repeats it for any other caller.
- `runtime.ddp_launcher`: Lightning's subprocess DDP launchers start ranks 1..N-1 with this job's own command
  (`tunelab.runs.distributed.hydra_child_command`: right inside sweeps, and the ranks die with their parent).
  Off, Lightning's own command is used from then on in this process (a launcher once patched stays patched).
- `runtime.cpu_dropout`: text models built from then on in this process draw dropout masks with
  `tunelab.models.dropout` (cheap on CPU, the same distribution); off, they keep `nn.Dropout` and `sdpa`.

Code that builds models without `run()` (tests, benchmarks, notebooks) gets the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from tunelab.errors import TunelabError


@dataclass
class Settings:
    ddp_launcher: bool = True
    cpu_dropout: bool = True


settings = Settings()  # what `configure` last set; read when a model is built


def configure(cfg: Any) -> Settings:
    """Apply `cfg.runtime` to this process (each key checked) and return the settings in force."""
    from tunelab.config import register_resolvers
    from tunelab.runs import distributed

    given = dict(cfg.get("runtime") or {})
    names = [f.name for f in fields(Settings)]
    for key, value in given.items():
        if key not in names:
            raise TunelabError(f"runtime.{key}: unknown key (valid keys: {names})")
        if not isinstance(value, bool):
            raise TunelabError(f"runtime.{key}={value!r}: expected true or false")
    for name in names:
        setattr(settings, name, given.get(name, getattr(Settings, name)))
    register_resolvers()
    if settings.ddp_launcher:
        distributed.install()
    return settings
