"""Where training runs and in what precision: the device, and bfloat16 only where it is native."""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext

import torch


def select_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# What "auto" means when set (fp32 or bf16): the test suite runs once with fp32, as on a CPU
# without bfloat16 (AVX2 only), so that both kinds of machine stay covered.
AUTO_PRECISION_ENV = "CIFAR10_AUTO_PRECISION"


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The reduced precision to compute in, None for float32. "auto" takes bfloat16 where the
    device computes it natively (CUDA; a CPU with AVX512-BF16 or AMX, where fastnet trains ~1.7x
    faster: benchmarks/RESULTS.md) and float32 elsewhere (emulated bfloat16 is slower)."""
    if precision == "auto":
        precision = os.environ.get(AUTO_PRECISION_ENV, "auto")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    native = (
        getattr(torch.cpu, name, lambda: False)()
        for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )
    return torch.bfloat16 if device.type == "cpu" and any(native) else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    if dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)
