"""glibc's malloc made to keep the memory a CPU run frees, for its next step (the `keep_freed_memory` setting).

A GKD step on a CPU allocates and frees the same large tensors every step: the tied embedding's [V, H] gradient
(113 MB in fp32 for the builtin's 49,152 x 576), the chunked loss's [64, V] tiles (12.6 MB each, a dozen per
chunk), the layers' gradients. By default glibc serves a block above its mmap threshold (128 KB, raised as blocks
are freed, to 32 MB at most) with a fresh mapping that is unmapped when freed, and it hands the top of its heap
back to the kernel once more than its trim threshold is free there. Each step's blocks are then new pages that the
kernel faults in and zeroes one 4 KB page at a time: in a profiled step on a 2-core Zen 4 CPU, zeroing the [V, H]
gradient took 118-138 ms where pages already in memory take 3, and each elementwise pass over a loss tile 16-22 ms
instead of 3-8. With both thresholds raised, such blocks come from the heap and go back to it, and the next step
reuses them: the step ran 9-15 % faster (benchmarks/README.md) at the same peak RSS, since what is kept is what the
step reuses.

The setting is process-wide (malloc has one set of thresholds), so the trainer applies it for a CPU run only.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
MMAP_THRESHOLD = 256 << 20  # floor: above the builtin's 113 MB [V, H] gradient
INT_MAX = 2**31 - 1  # mallopt takes an int


def thresholds(largest_tensor_bytes: int) -> tuple[int, int]:
    """(mmap threshold, trim threshold) for a run whose largest repeated block is `largest_tensor_bytes` (the
    biggest parameter's gradient): blocks up to twice that come from the heap, and up to four times the mmap
    threshold may stay free at its top."""
    mmap = min(max(MMAP_THRESHOLD, 2 * largest_tensor_bytes), INT_MAX)
    return mmap, min(4 * mmap, INT_MAX)


def keep_freed_memory(largest_tensor_bytes: int = 0) -> bool:
    """Raise this process's malloc thresholds (`thresholds`); False where the C library is not glibc (macOS, musl)
    or refuses them, which leaves malloc as it was."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc's own symbol: musl's mallopt accepts nothing
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mmap, trim = thresholds(largest_tensor_bytes)
    return bool(mallopt(M_MMAP_THRESHOLD, mmap)) and bool(mallopt(M_TRIM_THRESHOLD, trim))
