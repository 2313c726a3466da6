#!/usr/bin/env bash
# Makes a Docker engine and Compose usable on a Debian machine with no image registry:
#   1. installs the Docker tools below from Debian when any is missing (needs root),
#   2. starts dockerd when no engine answers,
#   3. builds a stand-in for `python:3.11-slim` from the machine's own apt mirror
#      (read from its apt sources), trusting the machine's CA bundle, with uv
#      preinstalled, and tags it `python:3.11-slim` so BentoML's generated
#      Dockerfile finds it locally. Reused when it already exists.
# Exit codes: 0 an engine is ready (the tools that could be installed are); 3 no Docker
# engine can be had here (not root / not Debian).
set -euo pipefail

IMAGE="python:3.11-slim"
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
export DOCKER_BUILDKIT=0

log() { echo "[docker-standin] $*" >&2; }

# Each command the container and cluster tests run, with the Debian package that installs
# it (tests/test_tools.py reads this table: every command a test runs has an installer).
TOOLS=(
  docker:docker.io
  dockerd:docker.io
  debootstrap:debootstrap
  docker-compose:docker-compose
)

engine_up() { docker info >/dev/null 2>&1; }

missing=()
for tool in "${TOOLS[@]}"; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || missing+=("${tool#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  packages=$(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing $packages"
    apt-get update -qq
    # shellcheck disable=SC2086  # one word per package
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $packages >/dev/null
  else
    # Not fatal by itself: an engine that already runs still serves the container tests.
    log "missing $packages and cannot install them here (needs root on Debian)"
  fi
fi

if ! engine_up; then
  if [ "$(id -u)" != 0 ]; then
    log "dockerd is installed but not running, and starting it needs root"
    exit 3
  fi
  log "starting dockerd"
  (setsid dockerd >/tmp/textgen-dockerd.log 2>&1 &)
  for _ in $(seq 60); do engine_up && break; sleep 1; done
  engine_up || { log "dockerd did not start: $(tail -5 /tmp/textgen-dockerd.log)"; exit 3; }
fi

if docker image inspect "$IMAGE" >/dev/null 2>&1; then
  log "$IMAGE is present"
  exit 0
fi

# The Debian mirror this machine already uses, from its apt sources.
mirror=$({ cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources \
  /etc/apt/sources.list.d/*.list 2>/dev/null || true; } |
  sed -nE 's#^(URIs:|deb)[[:space:]]+(https?://[^ ]+/debian)/?([[:space:]].*)?$#\2#p' | head -1)
[ -n "$mirror" ] || { log "no Debian mirror found in the apt sources"; exit 3; }
command -v debootstrap >/dev/null || { log "debootstrap is missing"; exit 3; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
log "debootstrap bookworm from the machine's mirror"
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
  bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
  || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
rm -rf "$work/rootfs/var/cache/apt/archives/"*.deb
tar -C "$work/rootfs" -c . | docker import - textgen/standin-rootfs:bookworm >/dev/null

mkdir -p "$work/ctx"
cp "$CA_BUNDLE" "$work/ctx/ca-certificates.crt"
cat >"$work/ctx/Dockerfile" <<'DOCKERFILE'
FROM textgen/standin-rootfs:bookworm
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt \
    UV_NATIVE_TLS=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    UV_BREAK_SYSTEM_PACKAGES=1 \
    LANG=C.UTF-8
RUN ln -sf /usr/bin/python3 /usr/bin/python && python -m pip install --no-cache-dir -q uv
CMD ["python3"]
DOCKERFILE
log "building $IMAGE stand-in"
docker build -q -t "$IMAGE" "$work/ctx" >/dev/null
docker image rm textgen/standin-rootfs:bookworm >/dev/null 2>&1 || true
log "$IMAGE stand-in ready"
