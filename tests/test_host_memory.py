"""Large host blocks come from the heap on the CPU (`devices.keep_large_blocks`).

glibc maps every block above its mmap threshold (never past 32 MiB) anew and unmaps it
when freed, so a (256, V) float32 temporary would be faulted in and unmapped every step.
(Past 64 MiB a thread's blocks stay mapped whatever the threshold: glibc's cap on a
thread arena's heaps, which `keep_large_blocks` states.)
Each case runs in its own process: the setting is process-wide and sticky.
"""

from __future__ import annotations

import ctypes
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from textgen.config import Settings

ROOT = Path(__file__).resolve().parent.parent

# Prints how many bytes glibc holds in mappings of their own while a (256, 50257)
# float32 tensor (51 MB) is alive, minus before it: the block's size when it was mapped,
# about 0 when it came from a heap. Allocated on a thread of its own, as the engine's are.
PROBE = """
import ctypes, os, sys, threading
import torch
from textgen.config import Settings
from textgen.engine import Engine, ModelInfo
from textgen.models import gpt2_tokenizer, random_gpt2

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
how = sys.argv[1]
if how.startswith("engine"):
    settings = Settings(dtype="float32", device="cpu", max_batch_size=2,
                        heap_large_blocks=how == "engine-default")
    info = ModelInfo("gpt2", "gpt2:test", "random:test", True, 1024)
    Engine(random_gpt2(tiny=True), gpt2_tokenizer(), info, settings).shutdown()
elif how == "keep":
    from textgen.devices import keep_large_blocks
    assert keep_large_blocks()
def allocate():
    before = libc.mallinfo2().hblkhd
    block = torch.empty(256, 50257)
    block.fill_(1.0)
    print(libc.mallinfo2().hblkhd - before)

thread = threading.Thread(target=allocate)
thread.start()
thread.join()
"""
BLOCK_BYTES = 256 * 50257 * 4


def glibc() -> bool:
    try:
        return platform.system() == "Linux" and hasattr(ctypes.CDLL(None), "mallinfo2")
    except OSError:
        return False


def mapped_while_alive(how: str) -> int:
    env = {  # glibc's own defaults, whatever this process was started with
        k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES" and not k.startswith("MALLOC_")
    }
    env.pop("TEXTGEN_HEAP_LARGE_BLOCKS", None)
    done = subprocess.run(
        [sys.executable, "-c", PROBE, how],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not glibc(), reason="glibc's mallopt and mallinfo2")
@pytest.mark.parametrize(
    ("how", "from_heap"),
    [
        ("plain", False),  # glibc's own behaviour: the premise
        ("keep", True),
        ("engine-default", True),  # an Engine on the CPU keeps them by default
        ("engine-off", False),  # TEXTGEN_HEAP_LARGE_BLOCKS=false
    ],
)
def test_a_step_sized_block_comes_from_the_heap_when_kept(how: str, from_heap: bool) -> None:
    mapped = mapped_while_alive(how)
    if from_heap:
        assert mapped < 1 << 20
    else:
        assert mapped >= BLOCK_BYTES


def test_heap_large_blocks_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEXTGEN_HEAP_LARGE_BLOCKS", raising=False)
    assert Settings.from_env().heap_large_blocks is True
    monkeypatch.setenv("TEXTGEN_HEAP_LARGE_BLOCKS", "false")
    assert Settings.from_env().heap_large_blocks is False
