# Tally's image: the five services and the `tally` command (clients/cli), from uv.lock.
#   docker build --build-arg SERVICE=wallet -t tally-wallet .   # runs the wallet by default
#   docker build -t tally .                                     # TALLY_SERVICE set where it runs
# SERVICE (optional): usage-meter | wallet | recharge | rebilling | notifier. It only sets the
# default TALLY_SERVICE: every image holds all five services, because `tally migrate` imports
# each service to apply its migrations (clients/cli depends on all five), so the five builds
# share every layer but the last.
#
# What a container runs (deploy/entrypoint.sh):
#   no arguments                the service TALLY_SERVICE names
#   --migrate [--status]        that service's migrations, applied (or shown), then exit
#   tally migrate [--status]    every service's migrations; `tally token ...` a development
#                               token; any other command as it is given (python, sh)
#
# Build with BuildKit (Docker 23+ uses it by default) for the cache mounts.
#
# The base is pinned by tag and digest: Python 3.11.17 on Debian 13 (trixie), the newest 3.11
# patch release found. The digest is the multi-platform index digest recorded for
# python:3.11.17-slim-trixie in public build files and reports of October 2026 (from
# `docker buildx imagetools inspect python:3.11.17-slim-trixie`; linux/amd64 manifest
# sha256:922f47525757de33aff59f24cdfc85f412ac4a06aa8af7c7e9028d584b7bcdeb, created 2026-10-01).
# It was NOT pulled or inspected where this file was written (no Docker engine, no registry
# access there): inspect it before you rely on it, and move tag and digest together, on purpose.
FROM python:3.11.17-slim-trixie@sha256:45037981b62b34b44602584fccbc4d884d5f7dc92c7ee86bb38a698a79fe1e51 AS base

FROM base AS build
# uv from PyPI at the version `make` installs (Makefile UV_VERSION), checked against PyPI's
# sha256 of its Linux x86_64 and aarch64 wheels. It is not copied from ghcr.io/astral-sh/uv:
# no digest of that image could be found to pin it by. uv stays in this stage.
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
RUN echo "uv==0.13.8" \
        "--hash=sha256:e18a57b8b352eb7c8feb317b9f6f533c8f0ad9673fd6cf34bbe3cf1a9f6a8984" \
        "--hash=sha256:0b3e8b1a4f5e405e31e2ff33de8af4744831e9f7338539671efbd8c3c94e791d" \
        > /tmp/uv-requirements.txt && \
    pip install --no-deps --require-hashes -r /tmp/uv-requirements.txt && \
    rm /tmp/uv-requirements.txt
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PYTHON_DOWNLOADS=never
WORKDIR /app
# Dependencies first (their own cached layer): the lock and the pyproject.toml of every
# workspace package the image installs (the devstack is not one of them).
COPY pyproject.toml uv.lock ./
COPY shared/pyproject.toml shared/pyproject.toml
COPY services/usage-meter/pyproject.toml services/usage-meter/pyproject.toml
COPY services/wallet/pyproject.toml services/wallet/pyproject.toml
COPY services/recharge/pyproject.toml services/recharge/pyproject.toml
COPY services/rebilling/pyproject.toml services/rebilling/pyproject.toml
COPY services/notifier/pyproject.toml services/notifier/pyproject.toml
COPY clients/python/pyproject.toml clients/python/pyproject.toml
COPY clients/cli/pyproject.toml clients/cli/pyproject.toml
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-install-workspace \
        --package tally-usage-meter --package tally-wallet --package tally-recharge \
        --package tally-rebilling --package tally-notifier --package tally-cli
# Then the code of those packages, installed as wheels (not editable: the source tree is not
# in the runtime image).
COPY shared shared
COPY services services
COPY clients/python clients/python
COPY clients/cli clients/cli
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable \
        --package tally-usage-meter --package tally-wallet --package tally-recharge \
        --package tally-rebilling --package tally-notifier --package tally-cli

FROM base AS runtime
RUN groupadd --system --gid 10001 tally && \
    useradd --system --uid 10001 --gid tally --no-create-home tally
# Owned by root: the service's user reads the environment, it does not change it.
COPY --from=build /app/.venv /app/.venv
COPY deploy/entrypoint.sh /app/entrypoint.sh
ARG SERVICE=""
RUN case "$SERVICE" in \
        "" | usage-meter | wallet | recharge | rebilling | notifier) ;; \
        *) echo "SERVICE=$SERVICE: one of usage-meter, wallet, recharge, rebilling, notifier" >&2; exit 1 ;; \
    esac
ENV PATH=/app/.venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    TALLY_HOST=0.0.0.0 TALLY_SERVICE=${SERVICE}
USER 10001:10001
EXPOSE 8001 8002 8003 8004 8005
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
    CMD ["python", "-c", "import os,urllib.request as u;s=os.environ['TALLY_SERVICE'].upper().replace('-','_');p={'USAGE_METER':8001,'WALLET':8002,'RECHARGE':8003,'REBILLING':8004,'NOTIFIER':8005}[s];u.urlopen(f'http://127.0.0.1:{os.environ.get(\"TALLY_PORT_\"+s,p)}/healthz',timeout=2)"]
ENTRYPOINT ["/bin/sh", "/app/entrypoint.sh"]
