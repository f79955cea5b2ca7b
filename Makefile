# AsFT Service. `make demo` and `make test` work on a fresh machine: both install first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines and CI pin the CPU torch wheel; on a GPU machine: make setup CONSTRAINTS=
CONSTRAINTS ?= constraints-cpu.txt
CONSTRAINT_FLAGS := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
STAMP := $(VENV)/.installed
# What `make demo` needs: the service and the worker, without the test and lint tools.
RUNTIME_STAMP := $(VENV)/.installed-runtime
PYTEST_ARGS ?=
comma := ,

# `pip install` of the extras given, with uv when it can (bytecode compiled as pip does, or
# each process would compile it again under PYTHONDONTWRITEBYTECODE): 16 s against pip's 50 s
# on 2 cores. uv reads no pip.conf, so where it cannot install (a private index set for pip
# only), pip does.
define install
	$(PY) -m pip install -q uv && $(VENV)/bin/uv pip install -q --python $(PY) \
	    --compile-bytecode $(CONSTRAINT_FLAGS) -e '.[$(1)]' \
	  || $(PY) -m pip install -q $(CONSTRAINT_FLAGS) -e '.[$(1)]'
endef

.PHONY: setup setup-runtime setup-tools test try test-fast lint bench chaos demo miniature frontier api serve clean

setup: $(STAMP)
setup-runtime: $(RUNTIME_STAMP)

$(RUNTIME_STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, from the constraints, so nothing below can pull a CUDA build. pip compiles
	# its bytecode on one core; compileall on all of them (15 s in all against 22 s). A few of
	# torch's test helpers use newer syntax and do not compile, as under pip.
	$(PY) -m pip install -q --no-compile $(CONSTRAINT_FLAGS) torch
	$(PY) -m compileall -q -j 0 "$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/torch" \
	  > /dev/null || true
	$(call install,worker)
	touch $@

$(STAMP): $(RUNTIME_STAMP)
	$(call install,worker$(comma)dev)
	touch $@

# Debian packages the tests use: Chromium and its driver (the dashboard's browser tests,
# tests/client/test_dashboard.py) and wrk (the load bench's smoke test); nothing is
# downloaded at test time. Without root or apt, those tests skip (and fail under CI=true).
TEST_PACKAGES := chromium chromium-driver wrk
setup-tools:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null \
	    || ! command -v wrk >/dev/null; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian's $(TEST_PACKAGES)"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -qq --no-install-recommends $(TEST_PACKAGES) >/dev/null 2>&1 \
	      || { apt-get update -qq && apt-get install -y -qq --no-install-recommends $(TEST_PACKAGES) >/dev/null; } \
	      || echo "could not install $(TEST_PACKAGES): the tests that need them skip (fail under CI=true)"; \
	  else \
	    echo "no apt-get as root: the browser and load tests skip without $(TEST_PACKAGES)"; \
	  fi; \
	fi

# The tiny zoo is built (or reused) before pytest starts, so its first build (about 4 min,
# printing its progress) is not cut off by the per-test timeout of the first test using it.
# One cache for the demo, the tests and CI: var/cache (ASFT_TEST_CACHE overrides).
TEST_CACHE ?= $(or $(ASFT_TEST_CACHE),var/cache)
# Tests run in TEST_WORKERS pytest-xdist processes, each with its share of the cores
# (tests/conftest.py): about 1.7x faster on 2 cores than one process. TEST_WORKERS=0: one.
TEST_WORKERS ?= 2
test: setup setup-tools
	$(PY) -m asft_core.zoo --cache-dir $(TEST_CACHE) > /dev/null
	$(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

# The README's walk-through, run as written on a fresh var/ (a newcomer's first commands).
try: setup
	$(PY) -m asft_core.zoo --cache-dir $(TEST_CACHE) > /dev/null
	$(PY) -m pytest tests/client/test_walkthrough.py $(PYTEST_ARGS)

# The edit-test loop: what is not marked slow, on SQLite only (the full suite is `make test`).
test-fast: setup
	$(PY) -m asft_core.zoo --cache-dir $(TEST_CACHE) > /dev/null
	$(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal -m "not slow and not postgresql" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: setup
	$(PY) bench/penalty.py
	$(PY) bench/train_step.py
	$(PY) bench/alignment_memory.py
	$(PY) bench/eval.py
	$(PY) bench/dispatch.py
	$(PY) bench/api_load.py

# The chaos soak on PostgreSQL + Redis + 2 workers, loopback only: 50 jobs while a component
# is killed every few seconds (30 kills; a few minutes); figures in var/chaos.json. make test
# runs a reduced one (10 jobs, 6 kills).
CHAOS_JOBS ?= 50
CHAOS_KILLS ?= 30
chaos: setup
	$(PY) -m asft_core.zoo --cache-dir $(TEST_CACHE) > /dev/null
	mkdir -p var
	ASFT_CHAOS_JOBS=$(CHAOS_JOBS) ASFT_CHAOS_KILLS=$(CHAOS_KILLS) ASFT_CHAOS_REPORT=var/chaos.json \
	  $(PY) -m pytest tests/worker/test_chaos.py -s $(PYTEST_ARGS)

# The service end to end: zoo, asft serve, three jobs through the API, the table, stop.
demo: setup-runtime
	$(PY) -m asft_client.demo --data-dir var

# The service on one machine (SQLite, filesystem broker, one worker); Ctrl-C stops it.
serve: setup
	$(VENV)/bin/asft serve

# The paper's table in miniature: PROFILE=full (the whole grid), ci (reduced) or test.
PROFILE ?= full
miniature: setup
	$(PY) -m asft_core.experiments --profile $(PROFILE) --data-dir var

# The safety-utility frontier (pre-registered in asft_core/experiments/frontier.json):
# PROFILE=full (486 cells, about 110 min on 2 cores; resumable), ci (a few minutes) or test.
frontier: setup
	$(PY) -m asft_core.experiments.frontier --profile $(PROFILE) --data-dir var

# The REST API on the embedded default (migrates first; prints a key on first start).
api: setup
	$(VENV)/bin/asft db upgrade
	$(VENV)/bin/asft api

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache
