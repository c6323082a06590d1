"""Subprocess DDP under Hydra, in single runs and in sweeps.

Lightning starts ranks 1..N-1 by re-running the script with `sys.argv` plus `hydra.run.dir=...`.
Inside a sweep (`-m`) that is wrong twice over: the argv still holds `-m` and the sweep lists, so
every rank would start its own sweep, and `hydra.run.dir` is not the job's folder. We rebuild the
child command from what this job actually is: its own overrides (one value each), its output
folder, and the config it was composed from. The same command is right for single runs.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch.distributed as dist
from lightning.fabric.strategies.launchers import subprocess_script as fabric_launcher
from lightning.pytorch.strategies.launchers import subprocess_script as trainer_launcher
from torch import nn

from tunelab.errors import TunelabError

# argv flags that choose the primary config; kept for the children, everything else is rebuilt
_CONFIG_FLAGS = ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd")


def _config_args(argv: Sequence[str]) -> list[str]:
    out: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg.split("=", 1)[0] in _CONFIG_FLAGS:
            out.append(arg)
            if "=" not in arg:
                out.append(next(it, ""))
    return out


def hydra_child_command(local_rank: int) -> tuple[list[str], str]:
    """The command and cwd that start rank `local_rank` of the current Hydra job."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd, to_absolute_path

    import __main__

    hydra_cfg = HydraConfig.get()
    if __main__.__spec__ is None:
        command = [sys.executable, to_absolute_path(sys.argv[0])]
    else:
        command = [sys.executable, "-m", __main__.__spec__.name]
    command += _config_args(sys.argv[1:])
    command += list(hydra_cfg.overrides.task)
    command += [
        f"hydra.run.dir=\"{hydra_cfg.runtime.output_dir}\"",
        f"hydra.job.name=ddp_rank_{local_rank}",
        "hydra.output_subdir=null",
    ]
    return command, get_original_cwd()


def install() -> None:
    """Make Lightning's subprocess launchers (Trainer and Fabric) start children with `hydra_child_command`."""
    for module in (fabric_launcher, trainer_launcher):
        if not hasattr(module, "_hydra_subprocess_cmd"):
            raise RuntimeError(f"{module.__name__} no longer has _hydra_subprocess_cmd; update tunelab.distributed")
        module._hydra_subprocess_cmd = hydra_child_command


def _is_block(module: nn.Module) -> bool:
    """Transformer layers and timm/ResNet blocks: the units FSDP shards and checkpoints."""
    name = type(module).__name__
    return name.endswith(("Layer", "Block", "Bottleneck")) and any(True for _ in module.children())


def block_classes() -> Callable[..., bool]:
    """An FSDP auto-wrap policy that wraps every transformer layer / timm block, whatever the model."""

    def policy(module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
        return recurse or _is_block(module)

    return policy


def deepspeed_strategy(stage: int = 2, offload_optimizer: bool = False, **kwargs: Any) -> Any:
    """Lightning's DeepSpeedStrategy, or a clear message when the optional package is missing."""
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise TunelabError(
            "trainer=deepspeed needs the deepspeed package (install it with: pip install -e '.[deepspeed]'), "
            "or use trainer=fsdp, which needs nothing extra"
        ) from None
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return DeepSpeedStrategy(stage=stage, offload_optimizer=offload_optimizer, **kwargs)


@contextmanager
def isolated_job() -> Iterator[None]:
    """Undo what one DDP job leaves behind, so the next job of a sweep starts its own process group.

    Lightning sets LOCAL_RANK / WORLD_SIZE / MASTER_PORT in the parent's environment and keeps the
    process group; the next sweep job would then believe its ranks already exist.
    """
    saved = dict(os.environ)
    try:
        yield
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved)
