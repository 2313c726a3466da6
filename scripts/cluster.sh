#!/usr/bin/env bash
# `make cluster`: N replicas of the textgen image behind HAProxy (deploy/docker-compose.yml).
# Builds what is missing: the model (as `make serve` imports it), the bento, the image.
#   TEXTGEN_REPLICAS (3)  TEXTGEN_PORT (3000)  TEXTGEN_STATS_PORT (8404)  TEXTGEN_MODEL
#   REBUILD=1: build a new bento and image from the current checkout.
# `scripts/cluster.sh down` stops and removes the cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
export DOCKER_BUILDKIT=0
COMPOSE=(docker-compose -f deploy/docker-compose.yml -p textgen)

if [ "${1:-up}" = down ]; then
  "${COMPOSE[@]}" down -t 30
  exit 0
fi

# No Compose, no engine or (offline) no python:3.11-slim base: the stand-in script provides
# them (as root on Debian).
if ! command -v docker-compose >/dev/null || ! docker info >/dev/null 2>&1 \
  || ! docker image inspect python:3.11-slim >/dev/null 2>&1; then
  scripts/docker_standin.sh || [ $? = 3 ]
fi
command -v docker-compose >/dev/null || {
  echo "docker-compose is missing and could not be installed (as root: apt-get install docker-compose)" >&2
  exit 1
}

model="${TEXTGEN_MODEL:-gpt2:latest}"
if ! bentoml models get "$model" >/dev/null 2>&1; then
  python download_model.py || python download_model.py --random-init
fi
if [ -n "${REBUILD:-}" ] || ! bentoml get textgen:latest >/dev/null 2>&1; then
  TEXTGEN_MODEL="$model" bentoml build
fi
version=$(bentoml get textgen:latest -o json | python -c 'import json,sys; print(json.load(sys.stdin)["version"])')
export TEXTGEN_IMAGE="textgen:$version"
if ! docker image inspect "$TEXTGEN_IMAGE" >/dev/null 2>&1; then
  bentoml containerize "textgen:$version" -t "$TEXTGEN_IMAGE"
fi

# Replicas share this machine's cores: torch threads per replica = cores / replicas.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / ${TEXTGEN_REPLICAS:-3} > 0 ? $(nproc) / ${TEXTGEN_REPLICAS:-3} : 1 ))}"
"${COMPOSE[@]}" up -d --build
port="${TEXTGEN_PORT:-3000}"
echo "waiting for the replicas to pass their health checks..."
for _ in $(seq 300); do
  curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
  sleep 1
done
curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null || { "${COMPOSE[@]}" ps; exit 1; }
stats="http://localhost:${TEXTGEN_STATS_PORT:-8404}"
cat <<MSG
textgen ($TEXTGEN_IMAGE, ${TEXTGEN_REPLICAS:-3} replicas behind HAProxy) is up:
  service:        http://localhost:$port
  balancer stats: $stats/stats  (Prometheus: $stats/metrics)
Stop it with: make cluster-down
MSG
