# syntax=docker/dockerfile:1
# One image per service, from the lock file:
#   docker build --build-arg SERVICE=wallet -t tally-wallet .
# SERVICE: usage-meter | wallet | recharge | rebilling | notifier
ARG PYTHON=3.11.7

FROM python:${PYTHON}-slim-bookworm AS build
ARG SERVICE
COPY --from=ghcr.io/astral-sh/uv:0.13.8 /uv /bin/uv
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PYTHON_DOWNLOADS=never
WORKDIR /app
# Dependencies first (their own cached layer): the workspace definition and lock only.
COPY pyproject.toml uv.lock ./
COPY shared/pyproject.toml shared/pyproject.toml
COPY devstack/pyproject.toml devstack/pyproject.toml
COPY services/usage-meter/pyproject.toml services/usage-meter/pyproject.toml
COPY services/wallet/pyproject.toml services/wallet/pyproject.toml
COPY services/recharge/pyproject.toml services/recharge/pyproject.toml
COPY services/rebilling/pyproject.toml services/rebilling/pyproject.toml
COPY services/notifier/pyproject.toml services/notifier/pyproject.toml
RUN --mount=type=cache,target=/root/.cache/uv \
    test -n "$SERVICE" && \
    uv sync --frozen --no-dev --no-install-workspace --package "tally-${SERVICE}"
# Then the code: the shared library and this service only.
COPY shared shared
COPY services/${SERVICE} services/${SERVICE}
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable --package "tally-${SERVICE}"

FROM python:${PYTHON}-slim-bookworm AS runtime
ARG SERVICE
RUN groupadd --system --gid 10001 tally && \
    useradd --system --uid 10001 --gid tally --no-create-home tally
COPY --from=build --chown=10001:10001 /app/.venv /app/.venv
ENV PATH=/app/.venv/bin:$PATH PYTHONUNBUFFERED=1 TALLY_HOST=0.0.0.0 TALLY_SERVICE=${SERVICE}
USER 10001:10001
EXPOSE 8001 8002 8003 8004 8005
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
    CMD ["python", "-c", "import os,urllib.request as u;s=os.environ['TALLY_SERVICE'].upper().replace('-','_');p={'USAGE_METER':8001,'WALLET':8002,'RECHARGE':8003,'REBILLING':8004,'NOTIFIER':8005}[s];u.urlopen(f'http://127.0.0.1:{os.environ.get(\"TALLY_PORT_\"+s,p)}/healthz',timeout=2)"]
ENTRYPOINT ["sh", "-c", "exec python -m tally_$(echo \"$TALLY_SERVICE\" | tr - _) \"$@\"", "--"]
