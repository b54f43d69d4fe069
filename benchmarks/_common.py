"""What both benchmark scripts share: progress on stderr and a process's own peak RSS."""

from __future__ import annotations

import contextlib
import resource
import sys


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    """This process's peak RSS. On Linux ru_maxrss survives execve, so a child spawned by a big parent
    reports at least the parent's RSS; VmHWM belongs to the process's own address space."""
    with contextlib.suppress(OSError):
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux (bytes on macOS)
