"""Whether this CPU samples faster in bf16: the test behind `generation_dtype: auto`."""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch


@functools.cache
def bf16_cpu() -> bool:
    """Whether this CPU has native bf16 arithmetic. On x86 that is AVX512-BF16 or AMX, read from
    /proc/cpuinfo: oneDNN also claims bf16 on plain AVX512, where it emulates it. On a plain AVX2 CPU a bf16
    matmul ran 6x slower than fp32 here, and a GKD step under bf16 autocast 7x slower."""
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True  # oneDNN's own check (e.g. Arm's BF16 extension)
    try:
        return native_bf16(Path("/proc/cpuinfo").read_text())
    except OSError:
        return True


def native_bf16(cpuinfo: str) -> bool:
    """Whether an x86 /proc/cpuinfo text lists AVX512-BF16 or AMX-BF16 in the flags of every processor."""
    flags = [line.partition(":")[2].split() for line in cpuinfo.splitlines()
             if line.partition(":")[0].strip() == "flags"]
    return bool(flags) and all({"avx512_bf16", "amx_bf16"} & set(each) for each in flags)
