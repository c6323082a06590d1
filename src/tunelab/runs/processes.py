"""Whether a process still runs: how leftovers of killed processes (temporary files, half-made links,
caches being built) are told from the work of live ones."""

from __future__ import annotations

import os


def alive(pid: int | str) -> bool:
    """POSIX: whether process `pid` exists on this machine (possibly owned by another user)."""
    if isinstance(pid, str) and not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def other_alive(pid: int | str) -> bool:
    """`alive`, but this process does not count: a leftover named by our own pid is one of a dead process
    whose pid was reused, since this process has not written it yet."""
    return str(pid) != str(os.getpid()) and alive(pid)
