# Tally — two commands do all the set-up on a fresh machine with Python 3.11:
#   make run    start the whole system on embedded infrastructure, with a demo
#   make test   run the whole test suite
SHELL := /bin/bash
.DEFAULT_GOAL := help

UV_VERSION := 0.13.8
TOOLS      := .tally/tools
UV         := $(TOOLS)/bin/uv
PYTHON     ?= python3
export UV_PYTHON_PREFERENCE ?= system

.PHONY: help install run test test-unit test-integration test-e2e test-fast model lint check-packages format asyncapi openapi bench bench-scaling bench-wallet chaos clean reset stack

help: ## show the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(UV):
	@echo "==> installing uv $(UV_VERSION) into $(TOOLS)"
	@$(PYTHON) -m venv $(TOOLS)
	@$(TOOLS)/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

.venv/.synced: $(UV) uv.lock pyproject.toml shared/pyproject.toml devstack/pyproject.toml $(wildcard services/*/pyproject.toml)
	@echo "==> syncing the workspace from uv.lock"
	@$(UV) sync --frozen --all-packages
	@touch $@

install: .venv/.synced ## install everything from the lock file

run: install ## start broker, Postgres, fake Stripe, SMTP sink, all services, demo and live view
	@$(UV) run --frozen --no-sync python -m tally_devstack run

stack: install ## start only the embedded infrastructure and print its environment
	@$(UV) run --frozen --no-sync python -m tally_devstack stack

# The e2e layer waits on its stack two thirds of the time: E2E_WORKERS pytest-xdist workers,
# each with a stack of its own, run its files side by side (longest first: tests/conftest.py).
E2E_WORKERS ?= 2
E2E_XDIST   := -n $(E2E_WORKERS) --dist loadfile --no-loadscope-reorder

test: install ## the whole suite: e2e (all services), with unit (no I/O) and integration (broker + Postgres) beside it; their logs follow
	@mkdir -p .tally; \
	$(UV) run --frozen --no-sync pytest tests/unit -p no:cacheprovider --basetemp=.tally/unit-tmp \
		> .tally/unit.log 2>&1 & unit=$$!; \
	$(UV) run --frozen --no-sync pytest tests/integration -p no:cacheprovider --basetemp=.tally/integration-tmp \
		> .tally/integration.log 2>&1 & integration=$$!; \
	$(UV) run --frozen --no-sync pytest tests/e2e $(E2E_XDIST); e2e=$$?; \
	wait $$unit; units=$$?; wait $$integration; integrations=$$?; \
	echo "==> tests/unit (run beside e2e)"; cat .tally/unit.log; \
	echo "==> tests/integration (run beside e2e)"; cat .tally/integration.log; \
	exit $$(( e2e || units || integrations ))

test-unit: install ## domain and use cases, no I/O (seconds)
	@$(UV) run --frozen --no-sync pytest tests/unit

test-integration: install ## one service's machinery against the real broker and Postgres
	@$(UV) run --frozen --no-sync pytest tests/integration

test-e2e: install ## the whole stack through its public APIs (E2E_WORKERS stacks side by side)
	@$(UV) run --frozen --no-sync pytest tests/e2e $(E2E_XDIST)

test-fast: test-unit

model: install ## the lifecycle model, a long walk (MODEL_STEPS, default 1000; MODEL_SEED replays one)
	@MODEL_STEPS=$${MODEL_STEPS:-1000} $(UV) run --frozen --no-sync pytest -s \
		tests/e2e/test_lifecycle_model.py -o timeout=$${MODEL_TIMEOUT:-7200}

lint: install ## ruff, ruff format --check, mypy and squawk on migrations (CI fails on any of them)
	@$(UV) run --frozen --no-sync ruff check .
	@$(UV) run --frozen --no-sync ruff format --check .
	@$(UV) run --frozen --no-sync mypy shared/src services/*/src devstack/src clients/*/src tests
	@$(UV) run --frozen --no-sync squawk --no-error-on-unmatched-pattern shared/src/tally/migrations/*.sql services/*/src/*/migrations/*.sql

check-packages: install ## each package installed alone from the lock, its app imported
	@UV=$(UV) .ci/check-packages

format: install ## ruff format and the fixable lint
	@$(UV) run --frozen --no-sync ruff format .
	@$(UV) run --frozen --no-sync ruff check --fix .

asyncapi: install ## write docs/asyncapi.json again from the event models (a test fails when it is stale)
	@$(UV) run --frozen --no-sync python -m tally.asyncapi > docs/asyncapi.json

openapi: install ## write the merged OpenAPI document again (docs/ and the packaged copy; a test fails when stale)
	@TALLY_ENV=development $(UV) run --frozen --no-sync python -m tally.openapi shared/src/tally/openapi.json docs/openapi.json

bench: install ## end to end through the public paths: events/s, latency, CPU and memory per service
	@$(UV) run --frozen --no-sync python bench/e2e_bench.py

bench-scaling: install ## the same at 1k/100k/1M wallets and 100k/1M events: cost per event
	@$(UV) run --frozen --no-sync python bench/e2e_bench.py --scaling

bench-wallet: install ## wallet alone: events/s from a pre-filled topic, vs one transaction per event
	@$(UV) run --frozen --no-sync python bench/wallet_bench.py

chaos: install ## fault suite: SIGKILLs, Postgres restarts, redeliveries; then checks every balance
	@$(UV) run --frozen --no-sync python -m tally_devstack.chaos --seconds $${CHAOS_SECONDS:-120} --faults $${CHAOS_FAULTS:-24}

reset: ## start afresh: remove TALLY_HOME's state (Postgres data, logs, mail, marker); keeps tools
	@PYTHONPATH=devstack/src $(PYTHON) -m tally_devstack.home reset

clean: ## remove local state (.tally: data, logs, mail) and the virtualenv
	rm -rf .tally .venv
