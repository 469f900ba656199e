#!/usr/bin/env bash
# Builds the cybedefend-bridge image without a Docker engine: Debian's buildah (runtime runc) on a
# Debian base made with debootstrap, because base images cannot be pulled on these machines.
# With a registry at hand, `docker build .` (default BASE_IMAGE python:3.11-slim-bookworm) is enough.
#
# Usage: scripts/build-image.sh [IMAGE_TAG]     (default: localhost/cybedefend-bridge:<version>)
# Env:   BASE_IMAGE   use this base instead of building one (must have python3 >= 3.11 with venv)
#        BRIDGE_IMAGE_BASE_DIR  where the debootstrap tree is made (default: .tools/image-base)
#        BRIDGE_SKIP_APT=1      do not apt-get install buildah/debootstrap/runc/podman
#        BRIDGE_IMAGE_LAYERS=0  keep no intermediate layer images (the image test sets it, so that
#                               removing the image it built leaves nothing behind)
# Needs root (debootstrap, buildah's storage). Prints the image name on its last line.
# CI runs it through tests/deploy/test_deploy_image.py (.ci/install-tools.sh has installed the tools):
# The Dockerfile installs requirements.lock / requirements-build.lock with --require-hashes;
# about 100 s from nothing (the debootstrap base is most of it), ~15 s with the base cached.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VERSION=$(python3 -c "import re,pathlib;print(re.search(r'^version = \"([^\"]+)\"', pathlib.Path('pyproject.toml').read_text(), re.M).group(1))")
IMAGE=${1:-localhost/cybedefend-bridge:$VERSION}
DEFAULT_BASE=localhost/cybedefend-bridge-base:bookworm
BASE_IMAGE=${BASE_IMAGE:-}
BASE_DIR=${BRIDGE_IMAGE_BASE_DIR:-$ROOT/.tools/image-base}
log() { echo "[build-image] $*" >&2; }

need=()
for t in buildah:buildah debootstrap:debootstrap runc:runc podman:podman; do
  command -v "${t%%:*}" >/dev/null 2>&1 || need+=("${t##*:}")
done
if [ "${#need[@]}" -gt 0 ]; then
  if [ "${BRIDGE_SKIP_APT:-0}" = 1 ]; then log "missing: ${need[*]}"; exit 1; fi
  log "apt-get install ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if [ -z "$BASE_IMAGE" ]; then
  BASE_IMAGE=$DEFAULT_BASE
  if ! buildah inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
    log "making $BASE_IMAGE with debootstrap (about a minute)"
    rm -rf "$BASE_DIR"
    mkdir -p "$BASE_DIR"
    # minbase + python3 and venv: what the official slim image offers the Dockerfile.
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
      bookworm "$BASE_DIR/rootfs" http://deb.debian.org/debian >"$BASE_DIR/debootstrap.log" 2>&1 \
      || { tail -20 "$BASE_DIR/debootstrap.log" >&2; exit 1; }
    rm -rf "$BASE_DIR"/rootfs/var/cache/apt/archives/*.deb "$BASE_DIR"/rootfs/var/lib/apt/lists/* \
      "$BASE_DIR"/rootfs/usr/share/doc "$BASE_DIR"/rootfs/usr/share/man "$BASE_DIR"/rootfs/usr/share/locale
    tar -C "$BASE_DIR/rootfs" -cf "$BASE_DIR/rootfs.tar" .
    ctr=$(buildah from scratch)
    buildah add "$ctr" "$BASE_DIR/rootfs.tar" / >/dev/null
    buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd '["python3"]' "$ctr"
    buildah commit -q "$ctr" "$BASE_IMAGE" >/dev/null
    buildah rm "$ctr" >/dev/null
    rm -rf "$BASE_DIR"
  fi
fi

# A TLS-intercepting proxy's CA (as on these machines) reaches pip as a build secret, never a layer.
secret=()
CA=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
if [ -s "$CA" ]; then secret=(--secret "id=pip_ca,src=$CA"); fi

log "building $IMAGE from $BASE_IMAGE"
buildah bud --runtime runc --format docker --layers="$([ "${BRIDGE_IMAGE_LAYERS:-1}" = 0 ] && echo false || echo true)" \
  --build-arg "BASE_IMAGE=$BASE_IMAGE" \
  --build-arg "VERSION=$VERSION" \
  --build-arg "REVISION=$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
  --build-arg "CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
  "${secret[@]}" \
  -t "$IMAGE" -f Dockerfile . >&2
echo "$IMAGE"
