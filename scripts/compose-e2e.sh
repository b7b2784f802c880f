#!/usr/bin/env bash
# `docker compose up`, for real: build the CPU profile's images, bring the stack up with the repository's
# docker-compose.yml, run a real job through the published ports, inject faults, and take it all down again.
#
#   scripts/compose-e2e.sh                 the whole run (engine -> base image -> build -> up -> checks -> down -v)
#   scripts/compose-e2e.sh --cache-check   only: are the caches warm (exit 0) or cold (exit 1)? Seconds, builds nothing
#   scripts/compose-e2e.sh --if-warm       the whole run when the caches are warm, else say so and exit 0 (CI)
#   scripts/compose-e2e.sh --gpu-image     also build the GPU worker image (docker/Dockerfile.cuda; ~6 GB)
#   KEEP=1 scripts/compose-e2e.sh          leave the stack (and an engine this script started) running
#
# What the machine forces, and only that, goes into a compose override file written under $OUT (never in
# docker-compose.yml): where Docker Hub cannot be reached, the base images are local (a Debian bookworm root made
# with debootstrap and `docker import`ed as local/debian:bookworm, kept in the engine as a cache; Debian-built
# stand-ins for redis and postgres: docker/compat/) and torch comes from a CPU wheel on this machine's disk
# (served to the builds on 127.0.0.1, so builds use the host network).
#
# Engine: if none answers, this script installs Debian's docker.io/docker-compose/debootstrap when missing and
# starts dockerd (overlay2, vfs if that fails) with its data in /var/lib/docker, so images and layers are reused
# by the next run. On exit it stops what it started and puts back what the engine changed: the daemon, bridges,
# iptables rules and the forwarding sysctls are as they were found. Needs root for that (as on CI).
# Timings (build, up, job, each fault) go to $OUT/timings.json and timings.md; checks: scripts/compose_e2e.py.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${EXCB_E2E_OUT:-$ROOT/test-artifacts/compose-e2e}
PROJECT=${EXCB_E2E_PROJECT:-excb-e2e}
DATA_ROOT=${EXCB_E2E_DOCKER_DATA_ROOT:-/var/lib/docker}
PUBLIC_BASE=python:3.12-slim-bookworm
LOCAL_BASE=local/debian:bookworm
DEBIAN_MIRROR=${EXCB_E2E_DEBIAN_MIRROR:-http://deb.debian.org/debian}
# "Warm" = the base images and the dependency layers of the CPU images are in the engine, built from the inputs
# they would be built from now (their hash is kept here after each build); code changes rebuild small layers.
STATE_DIR=${EXCB_E2E_STATE_DIR:-/var/lib/excb-compose-e2e}
MODE=run GPU_IMAGE=0
for arg in "$@"; do
  case "$arg" in
    --cache-check) MODE=cache-check ;;
    --if-warm) MODE=if-warm ;;
    --gpu-image) GPU_IMAGE=1 ;;
    *) echo "usage: $0 [--cache-check | --if-warm] [--gpu-image]" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/excb-compose-e2e.XXXXXX)
STARTED_DOCKERD=0 DOCKERD_PID="" WHEEL_PID="" STACK_UP=0
log() { printf '[compose-e2e %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
now() { date +%s.%N; }
TIMINGS="$OUT/timings-shell.tsv"
: > "$TIMINGS"
record() { printf '%s\t%.1f\n' "$1" "$(echo "$3 - $2" | bc -l)" >> "$TIMINGS"; }

# --- the engine and what it changes on the host ------------------------------------------------------------
snapshot_host() {  # what dockerd changes: links, iptables rules, forwarding sysctls
  ip -o link show | awk -F': ' '{print $2}' | sed 's/@.*//' | sort > "$WORK/links.before"
  iptables-save > "$WORK/iptables.before" 2>/dev/null || true
  ip6tables-save > "$WORK/ip6tables.before" 2>/dev/null || true
  sysctl -n net.ipv4.ip_forward > "$WORK/ip_forward.before"
  sysctl -n net.ipv6.conf.all.forwarding > "$WORK/ip6_forward.before"
}

restore_tables() {  # $1 = iptables | ip6tables; every table that exists now goes back to its saved content
  local fam=$1 snap="$WORK/$1.before" restore="$WORK/$1.restore"
  : > "$restore"
  for table in $("$fam-save" 2>/dev/null | sed -n 's/^\*//p'); do
    if grep -q "^\*$table\$" "$snap"; then
      awk -v t="*$table" '$0==t{on=1} on{print} on&&$0=="COMMIT"{exit}' "$snap" >> "$restore"
    else
      echo "*$table" >> "$restore"
      case "$table" in
        filter) chains="INPUT FORWARD OUTPUT" ;;
        nat) chains="PREROUTING INPUT OUTPUT POSTROUTING" ;;
        mangle) chains="PREROUTING INPUT FORWARD OUTPUT POSTROUTING" ;;
        raw) chains="PREROUTING OUTPUT" ;;
        *) chains="" ;;
      esac
      for c in $chains; do echo ":$c ACCEPT [0:0]" >> "$restore"; done
      echo "COMMIT" >> "$restore"
    fi
  done
  if [ -s "$restore" ]; then "$fam-restore" < "$restore"; fi
}

restore_host() {
  local link
  while read -r link; do  # bridges and veths the engine made and left
    grep -qx "$link" "$WORK/links.before" || { log "deleting link $link"; ip link delete "$link" 2>/dev/null || true; }
  done < <(ip -o link show | awk -F': ' '{print $2}' | sed 's/@.*//' | sort)
  restore_tables iptables || log "WARNING: iptables could not be restored"
  restore_tables ip6tables || log "WARNING: ip6tables could not be restored"
  sysctl -qw net.ipv4.ip_forward="$(cat "$WORK/ip_forward.before")"
  sysctl -qw net.ipv6.conf.all.forwarding="$(cat "$WORK/ip6_forward.before")"
}

ensure_packages() {
  local need=()
  command -v dockerd >/dev/null || need+=(docker.io)
  command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 || need+=(docker-compose)
  command -v debootstrap >/dev/null || need+=(debootstrap)
  command -v bc >/dev/null || need+=(bc)
  if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]} (Debian packages)"
    # the packages' scripts must not start a daemon this script would then not know about
    local policy=/usr/sbin/policy-rc.d made_policy=0
    if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"; made_policy=1; fi
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    [ "$made_policy" = 0 ] || rm -f "$policy"
  fi
}

start_engine() {
  if docker info >/dev/null 2>&1; then log "using the Docker engine that answers"; return; fi
  [ "$(id -u)" = 0 ] || { echo "no Docker engine answers, and starting one needs root" >&2; exit 1; }
  snapshot_host
  local driver t0
  for driver in ${EXCB_E2E_STORAGE_DRIVER:-overlay2 vfs}; do
    log "starting dockerd (storage driver $driver, data in $DATA_ROOT)"
    t0=$(now)
    dockerd --storage-driver "$driver" --data-root "$DATA_ROOT" --pidfile "$WORK/dockerd.pid" \
      > "$OUT/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    STARTED_DOCKERD=1
    for _ in $(seq 1 60); do
      docker info >/dev/null 2>&1 && break
      kill -0 "$DOCKERD_PID" 2>/dev/null || break
      sleep 1
    done
    if docker info >/dev/null 2>&1; then record engine_start "$t0" "$(now)"; return; fi
    log "dockerd did not come up with $driver (see $OUT/dockerd.log)"
    stop_engine
  done
  exit 1
}

stop_engine() {
  [ -n "$DOCKERD_PID" ] || return 0
  kill -TERM "$DOCKERD_PID" 2>/dev/null || true
  for _ in $(seq 1 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 1; done
  kill -KILL "$DOCKERD_PID" 2>/dev/null || true
  wait "$DOCKERD_PID" 2>/dev/null || true
  DOCKERD_PID=""
}

cleanup() {
  local rc=$?
  set +e
  if [ "${KEEP:-0}" = 1 ]; then
    log "KEEP=1: leaving the stack running (and dockerd, pid ${DOCKERD_PID:-not started here}); override: $OUT/override.yml"
  else
    if [ "$STACK_UP" = 1 ]; then log "docker compose down -v"; compose down -v --remove-orphans >/dev/null 2>&1; fi
    [ -z "$WHEEL_PID" ] || kill "$WHEEL_PID" 2>/dev/null
    if [ "$STARTED_DOCKERD" = 1 ]; then
      log "stopping the dockerd this script started and restoring links, iptables and sysctls"
      stop_engine
      restore_host
    fi
  fi
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- base images ---------------------------------------------------------------------------------------------
can_pull() { timeout 60 docker pull -q "$1" >/dev/null 2>&1; }

host_ca_sha() { sha256sum /etc/ssl/certs/ca-certificates.crt 2>/dev/null | cut -c1-64; }

make_local_base() {  # a Debian bookworm root from the Debian mirror, trusting what this host trusts (TLS proxies)
  local want have
  want=$(host_ca_sha)
  have=$(docker image inspect -f '{{index .Config.Labels "org.excb.host-ca-sha256"}}' "$LOCAL_BASE" 2>/dev/null || true)
  if [ -n "$have" ] && [ "$have" = "$want" ]; then log "$LOCAL_BASE is cached"; return; fi
  log "making $LOCAL_BASE with debootstrap ($DEBIAN_MIRROR)"
  local t0 dir="$WORK/rootfs"
  t0=$(now)
  debootstrap --variant=minbase bookworm "$dir" "$DEBIAN_MIRROR" > "$OUT/debootstrap.log" 2>&1
  rm -f "$dir"/var/cache/apt/archives/*.deb
  # pip in the build stage verifies PyPI against this host's CA bundle (the distribution's ca-certificates
  # rewrites /etc/ssl/certs, so the bundle lives beside it)
  mkdir -p "$dir/etc/ssl"
  cp /etc/ssl/certs/ca-certificates.crt "$dir/etc/ssl/host-ca-bundle.crt"
  printf '[global]\ncert = /etc/ssl/host-ca-bundle.crt\n' > "$dir/etc/pip.conf"
  tar -C "$dir" -c . | docker import --change "LABEL org.excb.host-ca-sha256=$want" - "$LOCAL_BASE" >/dev/null
  rm -rf "$dir"
  record base_image "$t0" "$(now)"
}

cpu_torch_wheel() {  # a CPU torch wheel for Debian bookworm's Python (3.11) on this machine's disk, if any
  local d f
  for d in ${PIP_FIND_LINKS:-} /opt/wheels; do
    for f in "$d"/torch-*+cpu-cp311-cp311-manylinux*_x86_64.whl; do
      [ -f "$f" ] && { echo "$f"; return; }
    done
  done
  return 0
}

compose() { "${COMPOSE[@]}" -p "$PROJECT" -f docker-compose.yml ${OVERRIDE:+-f "$OVERRIDE"} --profile cpu "$@"; }

deps_hash() {  # what the base images and the dependency layers are built from (not excb/, services/, README)
  { cat docker/Dockerfile.slim docker/torchvision_no_ops.py docker/compat/* pyproject.toml
    [ -z "$OVERRIDE" ] || cat "$OVERRIDE"
    docker image inspect -f '{{.Id}}' "$LOCAL_BASE" local/redis:compat local/postgres:compat 2>/dev/null || true
  } | sha256sum | cut -c1-64
}

cold() {  # $1 = why: --cache-check exits 1, --if-warm exits 0 without running, a plain run goes on
  case "$MODE" in
    cache-check) log "cache check: cold ($1)"; exit 1 ;;
    if-warm) log "skipped: caches cold ($1); run scripts/compose-e2e.sh by hand (README, Deployment)"; exit 0 ;;
  esac
}

# --- main -----------------------------------------------------------------------------------------------------
if [ "$MODE" != run ] && ! docker info >/dev/null 2>&1; then
  { [ "$(id -u)" = 0 ] && command -v dockerd >/dev/null && [ -d "$DATA_ROOT" ]; } || cold "no Docker engine here"
fi
ensure_packages
start_engine
if docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose); else COMPOSE=(docker-compose); fi
log "compose: ${COMPOSE[*]} ($("${COMPOSE[@]}" version --short 2>/dev/null || true)); engine $(docker version -f '{{.Server.Version}}')"

OVERRIDE=""
if ! docker image inspect "$PUBLIC_BASE" >/dev/null 2>&1 && ! can_pull "$PUBLIC_BASE"; then
  log "$PUBLIC_BASE cannot be pulled: local base images"
  docker image inspect "$LOCAL_BASE" >/dev/null 2>&1 || cold "no $LOCAL_BASE"
  make_local_base
  for svc in redis postgres; do  # built from the local base; cached like any image (same layers -> no work)
    t0=$(now)
    docker build -q --network host -f "docker/compat/$svc.Dockerfile" --build-arg "BASE_IMAGE=$LOCAL_BASE" \
      -t "local/$svc:compat" . > "$OUT/compat-$svc.log" 2>&1 || { tail -20 "$OUT/compat-$svc.log" >&2; exit 1; }
    record "compat_$svc" "$t0" "$(now)"
  done
  TORCH_ARGS=""
  wheel=$(cpu_torch_wheel)
  if timeout 10 python3 -c 'import urllib.request; urllib.request.urlopen("https://download.pytorch.org/whl/cpu/", timeout=8)' 2>/dev/null; then
    log "torch: PyTorch's CPU index"
  elif [ -n "$wheel" ]; then
    # PyTorch's CPU index cannot be reached: the CPU wheel on disk, torchvision from PyPI (its C extension is a
    # CUDA build; TORCHVISION_OPS=optional, see docker/Dockerfile.slim)
    tv=$(basename "$wheel" | sed -E 's/^torch-2\.([0-9]+)\..*/0.\1/'); tv="0.$(( ${tv#0.} + 15 )).0"
    tver=$(basename "$wheel" | cut -d- -f2)
    # a fixed port: the URL is a build argument, and a new one would invalidate the cached torch layer
    port=${EXCB_E2E_WHEEL_PORT:-38765}
    python3 -m http.server "$port" --bind 127.0.0.1 --directory "$(dirname "$wheel")" > "$OUT/wheels-http.log" 2>&1 &
    WHEEL_PID=$!
    log "torch: $tver from $wheel (served on 127.0.0.1:$port), torchvision $tv from PyPI"
    TORCH_ARGS=$(printf '    %s\n' "TORCH_INDEX_URL: https://pypi.org/simple" "TORCH_VERSION: \"$tver\"" \
      "TORCHVISION_VERSION: \"$tv\"" "PIP_FIND_LINKS: http://127.0.0.1:$port/" "TORCHVISION_OPS: optional")
  else
    echo "neither PyTorch's CPU index nor a CPU torch wheel on disk: cannot build a CPU image" >&2; exit 1
  fi
  OVERRIDE="$OUT/override.yml"
  cat > "$OVERRIDE" <<EOF
# Written by scripts/compose-e2e.sh: only what this machine forces (Docker Hub unreachable). Not for users.
x-build: &build
  network: host
  args:
    BASE_IMAGE: $LOCAL_BASE
${TORCH_ARGS:-}
services:
  redis: {image: "local/redis:compat"}
  postgres: {image: "local/postgres:compat"}
  secrets-init: {build: {<<: *build, context: ., dockerfile: docker/Dockerfile.slim, target: api}}
  api: {build: {<<: *build, context: ., dockerfile: docker/Dockerfile.slim, target: api}}
  embed: {build: {<<: *build, context: ., dockerfile: docker/Dockerfile.slim, target: embed}}
  worker-cpu: {build: {<<: *build, context: ., dockerfile: docker/Dockerfile.slim, target: worker-cpu}}
EOF
fi

if [ "$MODE" != run ]; then
  for img in excb/api:local excb/embed:local excb/worker-cpu:local; do
    docker image inspect "$img" >/dev/null 2>&1 || cold "no $img"
  done
  [ "$(cat "$STATE_DIR/deps.sha256" 2>/dev/null)" = "$(deps_hash)" ] || cold "the dependency layers' inputs changed"
  log "caches warm: base images and dependency layers current"
  [ "$MODE" = cache-check ] && exit 0
fi

t0=$(now)
log "building the CPU profile's images (log: $OUT/build.log)"
nice -n 10 "${COMPOSE[@]}" -p "$PROJECT" -f docker-compose.yml ${OVERRIDE:+-f "$OVERRIDE"} --profile cpu build \
  > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log" >&2; exit 1; }
record build_cpu_images "$t0" "$(now)"
mkdir -p "$STATE_DIR" && deps_hash > "$STATE_DIR/deps.sha256"

if [ "$GPU_IMAGE" = 1 ]; then
  t0=$(now)
  log "building the GPU worker image (log: $OUT/build-gpu.log)"
  gpu_args=()
  [ -z "$OVERRIDE" ] || gpu_args=(--network host --build-arg "CUDA_BASE_IMAGE=$LOCAL_BASE")
  nice -n 10 docker build "${gpu_args[@]}" -f docker/Dockerfile.cuda --target worker -t excb/worker:local . \
    > "$OUT/build-gpu.log" 2>&1 || { tail -40 "$OUT/build-gpu.log" >&2; exit 1; }
  record build_gpu_image "$t0" "$(now)"
fi
docker image ls --format '{{.Repository}}:{{.Tag}}\t{{.Size}}' | grep -E '^(excb|local)/' | sort > "$OUT/images.tsv"

# The stack, as users run it, through the published ports (scripts/compose_e2e.py).
mkdir -p "$WORK/data"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
export DATA_DIR="$WORK/data" BIND_ADDR=127.0.0.1 API_PORT=${API_PORT:-$(free_port)}
e1=$(free_port); export EMBED_PORTS="$e1-$((e1 + 3))"
STACK_UP=1
python3 scripts/compose_e2e.py --project "$PROJECT" --out "$OUT" --data-dir "$DATA_DIR" \
  --shell-timings "$TIMINGS" -- "${COMPOSE[@]}" -p "$PROJECT" -f docker-compose.yml ${OVERRIDE:+-f "$OVERRIDE"} \
  --profile cpu
STACK_UP=0
log "passed; timings: $OUT/timings.md"
