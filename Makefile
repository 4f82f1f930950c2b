# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
# Everything downloaded (virtualenv, Kafka jars, data) lands in git-ignored folders.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
KAFKA_STAMP := deploy/kafka/libs/.fetched-stamp

.PHONY: run sandbox status test lint unit bench bench-quick bench-peers bench-tools clean setup kafka browser redis

setup: $(STAMP) $(KAFKA_STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

kafka: $(KAFKA_STAMP)

# Kafka's jars come from Maven Central through deploy/kafka/pom.xml, fetched once.
$(KAFKA_STAMP): deploy/kafka/pom.xml
	rm -rf deploy/kafka/libs
	mvn -q -B -f deploy/kafka/pom.xml dependency:copy-dependencies
	touch $@

run: setup
	$(BIN)/parley run

# Readiness, consumer lag and counts of the stack `make run` started (exit 1 when not ready).
status: $(STAMP)
	$(BIN)/parley status

# `make run` plus the provider simulator and a `sandbox` WhatsApp channel that sends to it.
sandbox: setup
	$(BIN)/parley sandbox

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest tests/unit tests/property

# The console test (tests/integration/test_console.py) drives Debian's headless Chromium through
# playwright; Playwright's own browser download is never used. Installed once, as root (CI is).
CHROMIUM := /usr/bin/chromium
browser: $(CHROMIUM)

$(CHROMIUM):
	export DEBIAN_FRONTEND=noninteractive; \
	apt-get install -y -q chromium || (apt-get update -q && apt-get install -y -q chromium)

test: setup lint $(CHROMIUM)
	$(BIN)/pytest

# The seeds' design runs beside Parley in `make bench` (bench/peers.py): BullMQ on Debian's
# redis-server, installed once as root like Chromium above; bench/peers/node_modules by `npm ci`.
REDIS := /usr/bin/redis-server
redis: $(REDIS)

$(REDIS):
	export DEBIAN_FRONTEND=noninteractive; \
	apt-get install -y -q redis-server || (apt-get update -q && apt-get install -y -q redis-server)

# wrk (Debian's package): the flat-out ingress load generator in C (bench/wrk.py).
bench-tools: $(REDIS)
	@command -v wrk >/dev/null || apt-get install -y -q wrk || (apt-get update -q && apt-get install -y -q wrk)

bench: setup bench-tools
	$(BIN)/python -m bench

# The same table at a tenth of the counts (a few minutes): to compare two commits, not to quote.
bench-quick: setup bench-tools
	$(BIN)/python -m bench --scale 0.1

# Only the seeds' design (BullMQ 6.7 + Redis + Postgres), its figures beside the reference ones.
bench-peers: setup $(REDIS)
	$(BIN)/python -m bench --peers-only

clean:
	rm -rf .parley
