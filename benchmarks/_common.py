"""What both benchmark scripts share: progress on stderr and a process's own peak RSS."""

from __future__ import annotations

import contextlib
import resource
import sys


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM ...) in MB; None where there is no such file."""
    with contextlib.suppress(OSError):
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith(f"{field}:")) / 1024
    return None


def peak_rss_mb() -> float:
    """This process's peak RSS. On Linux ru_maxrss survives execve, so a child spawned by a big parent
    reports at least the parent's RSS; VmHWM belongs to the process's own address space."""
    peak = status_mb("VmHWM")
    if peak is not None:
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux (bytes on macOS)


def reset_peak_rss() -> bool:
    """Start this process's VmHWM again from its current RSS (Linux: `5` to /proc/self/clear_refs), so the next
    peak_rss_mb() is the peak since now; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def cpu_description() -> str:
    """The CPU's model name and the flags that decide these figures (avx2, avx512f, avx512_bf16, amx_bf16)."""
    name, flags = "unknown CPU", set()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and name == "unknown CPU":
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    shown = [flag for flag in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if flag in flags]
    return f"{name} ({', '.join(shown) or 'none of avx2/avx512f/avx512_bf16/amx_bf16'})"
