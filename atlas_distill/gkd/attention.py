"""Which of PyTorch's attention kernels a step uses on a CPU under bf16 autocast.

PyTorch's CPU flash-attention kernel is the faster one forward (the teacher's forward, decoding), but its
backward in bf16 is slow: for one layer of the builtin student at batch 4 x 172 positions, forward and backward
took 20.6 ms with flash against 9.5 ms with the math kernel (which runs softmax in fp32), while in fp32 flash
was the faster (6.8 against 11.6 ms). So the student's training forward and backward (including the forward
that gradient checkpointing recomputes in backward) take the math kernel there, and the teacher's forward,
inside it, flash again. Elsewhere (fp32, GPU) PyTorch's own choice stands.
"""

from __future__ import annotations

from contextlib import nullcontext


def _cpu_bf16(args) -> bool:
    return bool(args.bf16) and args.device.type == "cpu" and args.math_attention


def for_training(args):
    """Around a training step's forward and backward: the math kernel on a CPU under bf16 autocast (unless
    `math_attention` is off)."""
    if not _cpu_bf16(args):
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def for_inference(args):
    """Around a no-grad forward inside `for_training` (the teacher's): flash again where it is available."""
    if not _cpu_bf16(args):
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH], set_priority=True)
