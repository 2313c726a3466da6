"""Native CPU kernels (textgen/csrc), compiled on first use and cached.

`row_decode()` builds `csrc/row_decode.cpp` (one-row decode steps, bfloat16 and int8)
with torch's extension builder (a C++ compiler and ninja) into torch's extension cache
(`TORCH_EXTENSIONS_DIR`, default ~/.cache/torch_extensions), once per machine and torch
version and again when the source changes; later processes load
the cached library in well under a second. Where the CPU lacks AVX-512 BF16 and VNNI
or the build fails (no compiler: the slim container image), it says why once and
returns False, and the runner keeps oneDNN's and fbgemm's kernels.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "row_decode.cpp"
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni", "fma")
CFLAGS = [
    "-O3",
    *("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vnni", "-mfma"),
    "-fopenmp",
]


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux), or an empty set where they can't be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def why_not_row_decode() -> str | None:
    """Why `row_decode` can't be built here, or None when it can be tried."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"the CPU is {platform.machine()}, not x86-64"
    missing = [flag for flag in CPU_FLAGS if flag not in cpu_flags()]
    if missing:
        return f"the CPU lacks {', '.join(missing)}"
    if shutil.which("c++") is None:
        return "no C++ compiler (c++) on PATH"
    if shutil.which("ninja") is None and ninja_dir() is None:
        return "no ninja on PATH and the ninja package is not installed"
    return None


def ninja_dir() -> str | None:
    """The directory of the `ninja` package's binary (requirements.txt), if installed."""
    try:
        import ninja
    except ImportError:
        return None
    return ninja.BIN_DIR


@functools.cache
def row_decode() -> bool:
    """Loads `torch.ops.textgen_row` (one-row decode kernels); False where it can't."""
    reason = why_not_row_decode()
    if reason is None:
        try:
            from torch.utils.cpp_extension import load

            if shutil.which("ninja") is None:  # a venv's python run without its bin/ on PATH
                os.environ["PATH"] = f"{ninja_dir()}{os.pathsep}{os.environ.get('PATH', '')}"
            load(
                "textgen_row",
                [str(SOURCE)],
                extra_cflags=CFLAGS,
                extra_ldflags=["-fopenmp"],
                is_python_module=False,
            )
            return True
        except Exception as exc:  # a failed build must not stop the service
            reason = f"building {SOURCE.name} failed: {str(exc).splitlines()[0]}"
    logger.warning("one-row decode uses oneDNN (bfloat16) and fbgemm (int8): %s", reason)
    return False
