# streamtasks — developer commands. `make test` is what CI runs (through .ci/run).
SHELL := /bin/bash
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
# NODES=3: the three-node Kafka + Cassandra cluster (other ports, beside the single node)
NODES ?= 1
SERVICES := bash deploy/local/services.sh --nodes $(NODES)
CLUSTER := bash deploy/local/services.sh --nodes 3
STAMP := .make/installed
PYTEST := $(PYTHON) -m pytest -p no:cacheprovider

.PHONY: help install up down status clean-data kafka-start kafka-stop cassandra-start \
        cassandra-stop kafka-kill cassandra-kill test test-cluster unit integration lint demo bench

help:
	@echo "make demo        set up, start local Kafka + Cassandra, run the examples"
	@echo "make test        set up, start local Kafka + Cassandra, run unit + integration tests"
	@echo "make unit        unit tests only (memory://, no services)"
	@echo "make lint        ruff + mypy --strict"
	@echo "make bench       benchmarks (prints figures)"
	@echo "make test-cluster  start the 3-node cluster, run the fault tests (cluster/)"
	@echo "make up|down|status|clean-data [NODES=3], make kafka-stop|kafka-start|cassandra-stop|cassandra-start [NODES=3 NODE=n]"

# Installs the package and its dev tools once per change of pyproject.toml.
$(STAMP): pyproject.toml
	@echo "installing streamtasks and its dev tools (pip install -e '.[dev]')" >&2
	@$(PIP) install --quiet --disable-pip-version-check -e '.[dev]' >&2
	@mkdir -p .make && touch $(STAMP)

install: $(STAMP)

up: install
	$(SERVICES) up

down:
	$(SERVICES) down

status:
	$(SERVICES) status

clean-data:
	$(SERVICES) clean-data

kafka-start kafka-stop cassandra-start cassandra-stop kafka-kill cassandra-kill:
	$(SERVICES) $@ $(NODE)

unit: install
	$(PYTEST) tests -q

# Integration tests need the real servers; `up` fails (never skips) when they cannot start.
integration: up
	$(PYTEST) integration -q

test: install up
	$(PYTEST) tests -q
	$(PYTEST) integration -q -rs

# Fault tests on three Kafka brokers and three Cassandra nodes; fails (never skips) when the
# cluster cannot start. It runs beside the single node (other ports; memory is plenty).
test-cluster: install
	$(CLUSTER) up
	$(PYTEST) cluster -q -rs

lint: install
	$(PYTHON) -m ruff check streamtasks tests integration cluster examples bench
	$(PYTHON) -m mypy --strict streamtasks

# Only the demo's own lines on stdout: the services' and the migration's go to stderr.
demo: install
	@$(SERVICES) up >&2
	@$(PYTHON) -m streamtasks.cli migrate >&2
	@$(PYTHON) examples/demo.py

# Celery's own environment, Redis (Debian) and Machinery's Go module, for bench/compare.py.
bench-deps:
	command -v redis-server >/dev/null || { apt-get update && apt-get install -y redis-server; }
	test -x bench/.venv-celery/bin/python || $(PYTHON) -m venv bench/.venv-celery
	bench/.venv-celery/bin/python -m pip install --quiet --disable-pip-version-check 'celery[redis]>=5,<6'
	cd bench/machinery && GOFLAGS=-mod=mod go mod download

# Prints figures and the issue-10 table; writes bench/results/latest.json (BENCH_TASKS=N).
bench: up bench-deps
	$(PYTHON) bench/codec.py
	$(PYTHON) bench/run.py
	$(PYTHON) bench/chord.py
	$(PYTHON) bench/many_queues.py
	$(PYTHON) bench/compare.py --tasks $(or $(BENCH_TASKS),20000)
	$(PYTHON) bench/openloop.py
	$(PYTHON) bench/backlog_rss.py
