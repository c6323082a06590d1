"""Subprocess DDP under Hydra, in single runs and in sweeps.

Lightning starts ranks 1..N-1 by re-running the script with `sys.argv` plus `hydra.run.dir=...`.
Inside a sweep (`-m`) that is wrong twice over: the argv still holds `-m` and the sweep lists, so
every rank would start its own sweep, and `hydra.run.dir` is not the job's folder. We rebuild the
child command from what this job actually is: its own overrides (one value each), its output
folder, and the config it was composed from. The same command is right for single runs.

The children must also die with their parent. Lightning's launcher only watches them from the
parent's side, so a parent killed with SIGKILL (or by the OOM killer) leaves its ranks running,
reparented to init, holding memory and waiting minutes on a rendezvous that never comes. The child
command therefore carries the parent's pid, and every launched child starts `guard_parent` as soon
as its job starts (see `isolated_job`).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

import torch.distributed as dist
from lightning.fabric.strategies.launchers import subprocess_script as fabric_launcher
from lightning.pytorch.strategies.launchers import subprocess_script as trainer_launcher
from torch import nn

from tunelab.errors import TunelabError
from tunelab.runs import processes

log = logging.getLogger("tunelab")

# set in each launched child (through Hydra's `hydra.job.env_set`) to the pid of the process that launched it
PARENT_PID_ENV = "TUNELAB_PARENT_PID"

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
    """The command and cwd that start rank `local_rank` of the current Hydra job.

    The parent's pid travels in the command as `hydra.job.env_set.TUNELAB_PARENT_PID`: Lightning copies
    `os.environ` for a child before it asks for the command, so the command is the only thing we choose
    per child. Hydra puts the variable into the child's environment when the child's job starts.
    """
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
        f"++hydra.job.env_set.{PARENT_PID_ENV}={os.getpid()}",
    ]
    return command, get_original_cwd()


def install() -> None:
    """Make Lightning's subprocess launchers (Trainer and Fabric) start children with `hydra_child_command`."""
    for module in (fabric_launcher, trainer_launcher):
        if not hasattr(module, "_hydra_subprocess_cmd"):
            raise RuntimeError(f"{module.__name__} no longer has _hydra_subprocess_cmd; update tunelab.runs.distributed")
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


_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_guarded: int | None = None  # the parent pid this process already watches


def _set_pdeathsig() -> bool:
    """Linux: have the kernel SIGKILL this process the moment its parent exits. False elsewhere or on failure."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _die(parent_pid: int) -> None:
    """Leave at once: no atexit handlers, no waiting on collectives whose other ranks are gone."""
    with suppress(OSError):  # stderr may be a pipe nobody reads any more
        os.write(2, f"tunelab: parent process {parent_pid} is gone; rank process {os.getpid()} exits\n".encode())
    os._exit(1)


def _windows_waiter(parent_pid: int) -> Callable[[], None] | None:
    """Windows: a function that blocks until the parent exits, or None when it is already gone."""
    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
    kernel32.OpenProcess.restype = ctypes.c_void_p
    kernel32.OpenProcess.argtypes = [ctypes.c_uint32, ctypes.c_int, ctypes.c_uint32]
    kernel32.WaitForSingleObject.restype = ctypes.c_uint32
    kernel32.WaitForSingleObject.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    synchronize, infinite, wait_object_0 = 0x00100000, 0xFFFFFFFF, 0
    handle = kernel32.OpenProcess(synchronize, False, parent_pid)  # held open: the pid cannot be reused
    if not handle or kernel32.WaitForSingleObject(handle, 0) == wait_object_0:
        return None
    return lambda: kernel32.WaitForSingleObject(handle, infinite)


def guard_parent(parent_pid: int, *, pdeathsig: bool = True, interval: float = 0.5) -> None:
    """End this process when `parent_pid` (the process that launched it) ends, on every platform.

    Linux: PR_SET_PDEATHSIG makes the kernel SIGKILL us when the parent exits. It only covers a parent
    that is still alive when it is set, so right after setting it we check that our parent is still
    `parent_pid`; if it is not, the parent died while this process was starting and we exit now. (The
    kernel ties it to the parent's thread that started us; Lightning launches from the main thread.)

    Everywhere (the only mechanism on macOS, and a second one on Linux): a daemon thread that checks
    every `interval` seconds whether the parent is still there, and exits the process with `os._exit`
    when it is not. On POSIX an orphan is reparented, so `os.getppid()` stops being `parent_pid`; when
    the process was not started directly by `parent_pid` (a wrapper in between) the thread checks that
    pid itself. On Windows the thread waits on a handle to the parent process.

    Only this process exits: its process group is the parent's (and may hold a shell pipeline), so it
    is left alone. PyTorch DataLoader workers watch their own parent and follow within seconds.
    Calling it again for the same parent does nothing.
    """
    global _guarded
    if _guarded == parent_pid:
        return
    if sys.platform == "win32":
        wait = _windows_waiter(parent_pid)
        if wait is None:
            _die(parent_pid)

        def watch() -> None:
            wait()
            _die(parent_pid)
    else:
        if pdeathsig:
            _set_pdeathsig()
        direct = os.getppid() == parent_pid  # read after PR_SET_PDEATHSIG: no gap for the parent to die in
        if not direct and not processes.alive(parent_pid):
            _die(parent_pid)

        def watch() -> None:
            while (os.getppid() == parent_pid) if direct else processes.alive(parent_pid):
                time.sleep(interval)
            _die(parent_pid)

    threading.Thread(target=watch, name="tunelab-parent-watch", daemon=True).start()
    _guarded = parent_pid


def launched_parent_pid() -> int | None:
    """The pid of the process that launched this one as a DDP rank, or None when this is not such a rank.

    Set only by `hydra_child_command` (for ranks 1..N-1 of Lightning's subprocess launcher), never in the
    launching process itself, in sweeps' jobs or in non-DDP runs; LOCAL_RANK is checked as well.
    """
    value = os.environ.get(PARENT_PID_ENV, "")
    if not value.isdigit() or os.environ.get("LOCAL_RANK", "0") == "0" or int(value) == os.getpid():
        return None
    return int(value)


def _guard_if_launched() -> None:
    parent = launched_parent_pid()
    if parent is None:
        return
    guard_parent(parent)
    from hydra.core.hydra_config import HydraConfig

    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    log.info("rank %s started by process %d, watching it; overrides: %s",
             os.environ["LOCAL_RANK"], parent, " ".join(overrides))


@contextmanager
def isolated_job() -> Iterator[None]:
    """Run one job of `train.py`: a launched DDP rank dies with its parent, and a job leaves nothing behind.

    In a rank that Lightning's subprocess launcher started (ranks 1..N-1, through `hydra_child_command`),
    start `guard_parent` first, before any work: without it, a parent killed with SIGKILL leaves the rank
    running for minutes. The launching process, sweeps and non-DDP runs are not affected.

    Afterwards, undo what a DDP job leaves behind, so the next job of a sweep starts its own process
    group: Lightning sets LOCAL_RANK / WORLD_SIZE / MASTER_PORT in the parent's environment and keeps
    the process group; the next sweep job would then believe its ranks already exist.
    """
    saved = dict(os.environ)
    try:
        _guard_if_launched()
        yield
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved)
