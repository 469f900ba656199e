# syntax=docker/dockerfile:1
# cybedefend-bridge container image.
#
# Two stages from the same base: `build` installs the locked dependencies and the project's wheel
# into /opt/venv; `runtime` copies only that venv. No compiler is installed in either stage (every
# dependency ships a wheel), so none can reach the final image.
#
# Built from lock files with hashes (pip --require-hashes): requirements.lock (runtime, from
# pyproject.toml) and requirements-build.lock (setuptools and wheel, the build backend, installed
# in a throw-away build venv). /opt/venv is made --without-pip and receives packages from the
# build venv's pip, so the image holds no pip, no setuptools and no test double (the double is
# its own distribution, cybedefend_double/, which .dockerignore keeps out of the context).
# Regenerate the locks after changing dependencies (uv, from PyPI):
#   uv pip compile pyproject.toml --generate-hashes --universal --python-version 3.11 --no-header -o requirements.lock
#   uv pip compile requirements-build.in --generate-hashes --universal --python-version 3.11 --no-header -o requirements-build.lock
#
# BASE_IMAGE must provide python3 (>= 3.11) with the venv module at the same path in both stages.
# The default is the official slim image pinned by digest. To bump it (e.g. for a Debian security
# update), resolve the tag's current multi-arch index digest and replace the one below:
#   docker buildx imagetools inspect python:3.11-slim-bookworm --format '{{json .Manifest.Digest}}'
# The release workflow inspects the pinned digest before building, so a wrong one fails there.
# scripts/build-image.sh passes a local debootstrap base instead (no registry on these machines).
#
# PID 1: the bridge itself runs as PID 1, without tini. It installs its own SIGTERM/SIGINT handlers
# (the kernel ignores default-action signals for PID 1 otherwise), drains within
# sync.shutdown_grace_seconds and exits 0; a second signal exits at once. It starts no child
# processes, so there are no zombies to reap.
#
# Read-only root filesystem: the only writable paths are /var/lib/cybedefend-bridge (the ledger;
# mount a volume) and /tmp (mount an emptyDir/tmpfs). Bytecode is compiled at build time.
ARG BASE_IMAGE=python:3.11-slim-bookworm@sha256:2e32f7d302adc1c37428355c1e646897c0c53f4fd60b6a551245fb90ee129f91

FROM ${BASE_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# .dockerignore admits only pyproject.toml, README.md, the lock files and bridge/.
COPY . ./
# A TLS-intercepting proxy's CA can be given as a build secret: --secret id=pip_ca,src=ca.pem
RUN --mount=type=secret,id=pip_ca \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi \
    && python3 -m venv /opt/build \
    && /opt/build/bin/pip install --require-hashes --no-deps --only-binary=:all: -r requirements-build.lock \
    && /opt/build/bin/pip wheel --no-build-isolation --no-deps --wheel-dir /dist . \
    && python3 -m venv --without-pip /opt/venv \
    && /opt/build/bin/pip --python /opt/venv/bin/python install --require-hashes --no-deps --only-binary=:all: -r requirements.lock \
    && /opt/build/bin/pip --python /opt/venv/bin/python install --no-deps --no-index /dist/*.whl \
    && /opt/venv/bin/python -m compileall -q /opt/venv \
    && /opt/venv/bin/cybedefend-bridge --version \
    && ! /opt/venv/bin/python -c "import pip" 2>/dev/null \
    && ! /opt/venv/bin/python -c "import setuptools" 2>/dev/null

FROM ${BASE_IMAGE} AS runtime
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
ARG BASE_IMAGE
LABEL org.opencontainers.image.title="cybedefend-bridge" \
      org.opencontainers.image.description="Registers DockerHub tokens kept in Vault/OpenBao as CybeDefend container-registry credentials." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"
# A numeric, non-root identity (Kubernetes runAsNonRoot can only verify a numeric USER).
RUN useradd --system --no-log-init --uid 10001 --user-group --home-dir /nonexistent \
        --no-create-home --shell /usr/sbin/nologin bridge \
    && mkdir -p /etc/cybedefend-bridge /var/lib/cybedefend-bridge \
    && chown 10001:10001 /var/lib/cybedefend-bridge \
    && chmod 0700 /var/lib/cybedefend-bridge
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    BRIDGE_HEALTHCHECK_URL=http://127.0.0.1:8080/healthz
USER 10001:10001
WORKDIR /var/lib/cybedefend-bridge
EXPOSE 8080
# No HTTP client binary in the image: the venv's python asks /healthz (liveness only: never fails because Vault or
# CybeDefend is down). Kubernetes ignores HEALTHCHECK and uses the chart's probes instead.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['BRIDGE_HEALTHCHECK_URL'], timeout=4)"]
ENTRYPOINT ["cybedefend-bridge"]
CMD ["run", "--config", "/etc/cybedefend-bridge/config.yaml"]
