"""llama.cpp's server as the benchmark's peer: binaries, GGUF weights, the command line.

    python bench/llama_peer.py MODEL_DIR   # prepares it alone and prints what it made

The binaries come from a prebuilt archive when one runs here (`TEXTGEN_PEERS_DIR`, by
default `../shared/peers` beside the repo), else they are built (CPU, native) from
the llama.cpp source that the PyPI sdist of llama-cpp-python vendors (~13 min on
2 cores; needs cmake, ninja and a C++ compiler). The same sdist's
`convert_hf_to_gguf.py` turns the benchmark's model directory into bf16 and Q8_0
GGUF files. Everything is cached under bench/results/peer/ (ignored by git).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "bench" / "results" / "peer"
SDIST = "llama-cpp-python==0.3.36"  # vendors llama.cpp 0c1e570
PRECISIONS = {"bf16": "bf16", "Q8_0": "q8_0"}  # name in the table -> converter outtype
CMAKE_FLAGS = [
    "-DGGML_NATIVE=ON",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # else the build downloads its web UI
    "-DCMAKE_BUILD_TYPE=Release",
]


class PeerUnavailable(RuntimeError):
    """The peer can't be prepared here; the message says why."""


@dataclass(frozen=True)
class Peer:
    server: Path  # the llama-server binary
    models: dict[str, Path]  # precision name -> GGUF file

    @property
    def env(self) -> dict[str, str]:
        return _library_env(self.server)

    def command(self, precision: str, port: int, slots: int = 32) -> list[str]:
        """llama-server as the benchmark runs it: `slots` parallel sequences of GPT-2's full
        context, continuous batching, 2 threads, no prompt cache (a fair comparison)."""
        return [
            str(self.server),
            "-m",
            str(self.models[precision]),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "-np",
            str(slots),
            "-c",
            str(1024 * slots),
            "-no-kvu",
            "-t",
            "2",
            "-tb",
            "2",
            "-cb",
            "--no-cache-prompt",
            "-cram",
            "0",
        ]


def prepare(model_dir: Path) -> Peer:
    """The peer for the Hugging Face GPT-2 directory `model_dir`; raises PeerUnavailable."""
    CACHE.mkdir(parents=True, exist_ok=True)
    source = _sdist()
    server = _prebuilt() or _build(source)
    models = {name: _convert(source, model_dir, outtype) for name, outtype in PRECISIONS.items()}
    return Peer(server, models)


def _run(cmd: list[str], cwd: Path | None = None, timeout: float = 3600) -> str:
    try:
        out = subprocess.run(
            cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PeerUnavailable(f"{cmd[0]} failed: {exc}") from None
    if out.returncode != 0:
        raise PeerUnavailable(f"{' '.join(cmd[:4])} exited {out.returncode}: {out.stderr[-2000:]}")
    return out.stdout


def _sdist() -> Path:
    """The llama.cpp source tree inside the llama-cpp-python sdist."""
    tree = CACHE / "llama_cpp_python" / "vendor" / "llama.cpp"
    if (tree / "convert_hf_to_gguf.py").is_file():
        return tree
    download = CACHE / "download"
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    _run([*pip, SDIST, "-d", str(download)])
    archive = next(download.glob("llama_cpp_python-*.tar.gz"), None)
    if archive is None:
        raise PeerUnavailable(f"pip download {SDIST} gave no sdist")
    with tarfile.open(archive) as tar:
        tar.extractall(CACHE / "extract", filter="data")
    unpacked = next((CACHE / "extract").glob("llama_cpp_python-*"))
    shutil.rmtree(CACHE / "llama_cpp_python", ignore_errors=True)
    unpacked.rename(CACHE / "llama_cpp_python")
    return tree


def _library_env(server: Path) -> dict[str, str]:
    """A prebuilt server's shared libraries lie beside it, but its RUNPATH names the
    directory it was built in: the loader is told where they are."""
    paths = [str(server.parent), os.environ.get("LD_LIBRARY_PATH", "")]
    return {"LD_LIBRARY_PATH": os.pathsep.join(p for p in paths if p)}


def _works(server: Path) -> bool:
    try:
        run = subprocess.run(
            [str(server), "--version"],
            capture_output=True,
            timeout=30,
            env={**os.environ, **_library_env(server)},
        )
    except OSError:
        return False
    return run.returncode == 0


def _prebuilt() -> Path | None:
    """llama-server from a prebuilt archive, when there is one and it runs on this CPU."""
    peers = Path(os.environ.get("TEXTGEN_PEERS_DIR", ROOT.parent / "shared" / "peers"))
    archive = next(iter(sorted(peers.glob("llama-bin-*.tar.gz"))), None)
    if archive is None:
        return None
    target = CACHE / archive.name.removesuffix(".tar.gz")
    if not target.exists():
        with tarfile.open(archive) as tar:
            tar.extractall(target, filter="data")
    server = next(target.rglob("llama-server"), None)
    return server if server is not None and _works(server) else None


def _build(source: Path) -> Path:
    """Builds llama-server from the sdist's source for this CPU (`-DGGML_NATIVE=ON`)."""
    server = source / "build" / "bin" / "llama-server"
    if server.is_file() and _works(server):
        return server
    missing = [tool for tool in ("cmake", "ninja", "c++") if shutil.which(tool) is None]
    if missing:
        raise PeerUnavailable(f"building llama-server needs {', '.join(missing)}")
    print("# building llama-server from source (~13 min on 2 cores)", flush=True)
    _run(["cmake", "-B", "build", "-G", "Ninja", *CMAKE_FLAGS], cwd=source)
    jobs = str(os.cpu_count() or 2)
    _run(
        ["cmake", "--build", "build", "--target", "llama-server", "llama-quantize", "-j", jobs],
        cwd=source,
        timeout=7200,
    )
    if not _works(server):
        raise PeerUnavailable(f"the built {server} does not run")
    return server


def _convert(source: Path, model_dir: Path, outtype: str) -> Path:
    """`model_dir` as GGUF. transformers 5 no longer writes `n_ctx` into config.json and the
    converter needs it: it gets one (= n_positions) in a copy of the directory."""
    out = CACHE / f"{model_dir.name}-{outtype}.gguf"
    stamp = out.with_suffix(".source")
    fingerprint = str((model_dir / "model.safetensors").stat().st_mtime_ns)
    if out.is_file() and stamp.is_file() and stamp.read_text() == fingerprint:
        return out
    copy = CACHE / f"{model_dir.name}-hf"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(model_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    config.setdefault("n_ctx", config["n_positions"])
    (copy / "config.json").write_text(json.dumps(config))
    convert = [sys.executable, str(source / "convert_hf_to_gguf.py"), str(copy)]
    _run([*convert, "--outtype", outtype, "--outfile", str(out)])
    stamp.write_text(fingerprint)
    return out


if __name__ == "__main__":
    peer = prepare(Path(sys.argv[1]))
    print(peer.server)
    for name, path in peer.models.items():
        print(name, path)
