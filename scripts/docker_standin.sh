#!/usr/bin/env bash
# Makes a Docker engine and Compose usable on a Debian machine with no image registry:
#   1. installs docker-compose from Debian when it is missing (needs root),
#   2. when no engine answers: installs docker.io if docker or dockerd is missing, and
#      starts dockerd (needs root); an engine that already answers is used as it is, and
#      nothing that could conflict with its client (docker-ce-cli) is installed,
#   3. when `python:3.11-slim` is not present: pulls it, or where no registry answers,
#      builds a stand-in from the machine's own apt mirror (read from its apt sources,
#      with debootstrap, as root), trusting the machine's CA bundle, with uv preinstalled.
# A package apt cannot install is reported, never fatal by itself.
# Exit codes: 0 an engine and the base image are ready (docker-compose too, when it could
# be had); 3 no engine or base image can be had here (not root / not Debian / apt refused).
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
is_root() { [ "$(id -u)" = 0 ]; }

# need COMMAND...: installs the TOOLS packages of the missing ones; fails (after saying why)
# when any of them is still missing.
need() {
  local wanted=() command entry
  for command in "$@"; do
    command -v "$command" >/dev/null 2>&1 && continue
    for entry in "${TOOLS[@]}"; do
      [ "${entry%%:*}" = "$command" ] && wanted+=("${entry#*:}")
    done
  done
  [ ${#wanted[@]} -eq 0 ] && return 0
  local packages
  packages=$(printf '%s\n' "${wanted[@]}" | sort -u | paste -sd ' ')
  if ! is_root || ! command -v apt-get >/dev/null 2>&1; then
    log "missing $packages: installing it needs root on Debian"
    return 1
  fi
  log "installing $packages"
  # shellcheck disable=SC2086  # one word per package
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $packages; } \
    >/tmp/textgen-apt.log 2>&1; then
    log "apt-get could not install $packages: $(tail -3 /tmp/textgen-apt.log | tr '\n' ' ')"
    return 1
  fi
  for command in "$@"; do command -v "$command" >/dev/null 2>&1 || return 1; done
}

need docker-compose || log "docker-compose stays missing: the cluster tests cannot run"

if ! engine_up; then
  is_root || { log "no Docker engine answers, and starting one needs root"; exit 3; }
  need docker dockerd || { log "no Docker engine can be had: docker.io is not installed"; exit 3; }
  log "starting dockerd"
  (setsid dockerd >/tmp/textgen-dockerd.log 2>&1 &)
  for _ in $(seq 60); do engine_up && break; sleep 1; done
  engine_up || { log "dockerd did not start: $(tail -5 /tmp/textgen-dockerd.log)"; exit 3; }
fi

if docker image inspect "$IMAGE" >/dev/null 2>&1; then
  log "$IMAGE is present"
  exit 0
fi
if timeout 120 docker pull -q "$IMAGE" >/dev/null 2>&1; then
  log "$IMAGE pulled"
  exit 0
fi

# No registry: the stand-in, from the Debian mirror this machine already uses.
is_root || { log "no registry answers for $IMAGE, and building a stand-in needs root"; exit 3; }
mirror=$({ cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources \
  /etc/apt/sources.list.d/*.list 2>/dev/null || true; } |
  sed -nE 's#^(URIs:|deb)[[:space:]]+(https?://[^ ]+/debian)/?([[:space:]].*)?$#\2#p' | head -1)
[ -n "$mirror" ] || { log "no registry answers for $IMAGE, and no Debian mirror is in the apt sources"; exit 3; }
need debootstrap || { log "no registry answers for $IMAGE, and debootstrap cannot be installed"; exit 3; }

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
