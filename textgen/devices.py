"""Which device and dtype the engine runs on."""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30  # blocks up to this come from a heap (`keep_large_blocks`)
TRIM_THRESHOLD = 1 << 27  # free memory at a heap's top kept, not given back to the system


def resolve_device(setting: str) -> torch.device:
    """auto: CUDA when visible (BentoML sets CUDA_VISIBLE_DEVICES), else MPS, else CPU."""
    if setting != "auto":
        device = torch.device(setting)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"TEXTGEN_DEVICE={setting} but CUDA is not available")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    """auto: float16 on CUDA and MPS, bfloat16 on CPUs with native bf16, else float32."""
    if setting != "auto":
        return getattr(torch, setting)
    if device.type in ("cuda", "mps"):
        return torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def resolve_int8(quantize: str, dtype: str, device: torch.device) -> bool:
    """Whether the projections run in dynamic int8. auto: on the CPU unless TEXTGEN_DTYPE
    names a precision (bench/RESULTS.md: faster than bfloat16 at every concurrency, at a
    fidelity cost the README states)."""
    if quantize == "auto":
        return device.type == "cpu" and dtype == "auto"
    return quantize == "int8"


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX on x86, the bf16 feature on Arm (Linux /proc/cpuinfo)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16", "bf16"))


def keep_large_blocks() -> bool:
    """Makes glibc serve large blocks from its heaps and keep freed ones for reuse, for the
    whole process. Returns whether it could (glibc only).

    glibc maps each block above its mmap threshold anew (the threshold adapts, but never
    past 32 MiB): every page of it faults on first write and freeing it unmaps it. A step
    on the CPU makes temporaries of (rows, V) float32, past that ceiling from about 170
    rows (the sampler's (B, V) work), so each step would map, fault and unmap them again.
    With the mmap threshold at MMAP_THRESHOLD, and the trim threshold at TRIM_THRESHOLD
    so that a freed block at the top of the heap is not given back at once, a freed block
    is reused as it is. A thread other than the main one allocates from an arena whose
    heaps glibc caps at 64 MiB: there, and so on the engine thread, larger blocks are
    still mapped per use ((rows, V) float32 past about 330 rows)."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (raises AttributeError off glibc: musl, macOS)
    except (OSError, AttributeError, TypeError):  # TypeError: CDLL(None) on Windows
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    refused = [
        name
        for name, param, value in (
            ("M_MMAP_THRESHOLD", M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            ("M_TRIM_THRESHOLD", M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        )
        if mallopt(param, value) != 1
    ]
    if refused:
        logger.warning("glibc refused mallopt(%s): large blocks may stay mapped per use", refused)
    return not refused
