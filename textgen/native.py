"""Native CPU kernels (textgen/csrc), compiled on first use and cached.

`row_decode()` builds `csrc/row_decode.cpp` (one-row decode steps, bfloat16 and int8)
with torch's extension builder (a C++ compiler and ninja) into torch's extension cache
(`TORCH_EXTENSIONS_DIR`, default ~/.cache/torch_extensions), once per machine, torch
version and source text (`build_directory`); later processes load
the cached library in well under a second. Where the CPU lacks AVX-512 BF16 and VNNI
or the build fails (no compiler: the slim container image), it says why once and
returns False, and the runner keeps oneDNN's and fbgemm's kernels.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
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
    """The directory of the `ninja` package's binary (requirements.txt), if it has one."""
    try:
        import ninja
    except ImportError:
        return None
    return ninja.BIN_DIR or None  # "" when the package found no binary


def build_directory() -> Path:
    """Where the library is built: under torch's extension root, one directory per Python
    and torch version, source text and flags, so an upgraded torch or an edited source
    never loads a library built for another."""
    import torch.utils.cpp_extension as cpp

    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS).encode()).hexdigest()[:16]
    version = torch_version().replace("+", "_")
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp.get_default_build_root()
    return Path(root) / f"textgen_row-{python}-{version}-{digest}"


def torch_version() -> str:
    import torch

    return torch.__version__


@contextlib.contextmanager
def exclusive(directory: Path, timeout: float) -> Iterator[None]:
    """Holds `directory/textgen.lock` (flock: released when this process dies, however it
    dies), waiting at most `timeout` seconds. Holding it, this process is the only one
    building or loading here (a build runs in the child that holds it, `build`), so
    torch's own lock file, which a killed build leaves behind and torch would wait on
    forever, is stale and is removed."""
    import fcntl  # POSIX: `why_not_row_decode` required /proc/cpuinfo (Linux)

    directory.mkdir(parents=True, exist_ok=True)
    with (directory / "textgen.lock").open("w") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"another process held {directory / 'textgen.lock'} for {timeout:g} s"
                    ) from None
                time.sleep(0.1)
        try:
            (directory / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build(directory: Path, timeout: float) -> None:
    """Brings `directory`'s library up to date in a child process (`python -m
    textgen.native SOURCE DIRECTORY TIMEOUT`) that holds the directory's lock while
    torch's builder runs: a builder survives this process being killed, so no one else
    builds beside it, and the compiler finds ninja through the child's PATH, this
    process's left as it is. Raises with the compiler's errors when it fails, and kills
    the whole build when it takes over `timeout` seconds."""
    env = dict(os.environ)
    if shutil.which("ninja") is None:  # a venv's python run without its bin/ on PATH
        env["PATH"] = os.pathsep.join(p for p in (ninja_dir(), env.get("PATH")) if p)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(SOURCE.parent.parent.parent), env.get("PYTHONPATH")) if p
    )
    child = subprocess.Popen(
        [sys.executable, "-m", "textgen.native", str(SOURCE), str(directory), str(timeout)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own group: killed whole on timeout
    )
    try:
        output, _ = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        raise TimeoutError(f"the build took over {timeout:g} s") from None
    if child.returncode != 0:
        lines = [line.strip() for line in output.splitlines() if line.strip()]
        words = [line for line in lines if ": error" in line][:2] or lines[-3:]
        raise RuntimeError(" / ".join(words) or f"the build exited {child.returncode}")


@functools.cache
def row_decode(timeout: float = 300.0) -> bool:
    """Loads `torch.ops.textgen_row` (one-row decode kernels); False where it can't.
    `timeout`: the longest wait for the build, another process's included. The answer
    holds for the life of the process (a worker that timed out retries at its restart)."""
    reason = why_not_row_decode()
    if reason is None:
        try:
            import torch

            directory = build_directory()
            build(directory, timeout)
            with exclusive(directory, timeout):  # nobody rewrites it while it loads
                torch.ops.load_library(str(directory / "textgen_row.so"))
            return True
        except Exception as exc:  # a failed build must not stop the service
            first_line = (str(exc).splitlines() or [repr(exc)])[0]
            reason = f"building {SOURCE.name} failed: {first_line}"
    logger.warning("one-row decode uses oneDNN (bfloat16) and fbgemm (int8): %s", reason)
    return False


def _build_here(source: Path, directory: Path, timeout: float) -> None:
    """The child of `build`: under the directory's lock, torch's builder (ninja) brings
    the library up to date; a no-op when it is."""
    from torch.utils.cpp_extension import load

    with exclusive(directory, timeout):
        load(
            "textgen_row",
            [str(source)],
            extra_cflags=CFLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
            is_python_module=False,
        )


if __name__ == "__main__":
    _build_here(Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]))
