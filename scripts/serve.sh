#!/usr/bin/env bash
# Imports GPT-2 into the model store (random weights when the hub is unreachable),
# then serves it. Run through `make serve`, which prepares the virtualenv.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! python download_model.py; then
  cat >&2 <<'MSG'

!!! ======================================================================= !!!
!!!  The Hugging Face Hub is unreachable: serving GPT-2 with RANDOM WEIGHTS. !!!
!!!  Generated text is MEANINGLESS until real weights are imported:         !!!
!!!    python download_model.py            (on a machine with internet)     !!!
!!!    python download_model.py --from-dir PATH   (a local model directory) !!!
!!! ======================================================================= !!!

MSG
  python download_model.py --random-init
fi
exec bentoml serve service:TextGeneration --port "${PORT:-3000}"
