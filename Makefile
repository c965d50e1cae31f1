# tally — `make help` lists the targets. The first two are all a newcomer needs: `make run`, `make test`.
SHELL := /bin/bash
PY_SYS ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TALLY := $(VENV)/bin/tally
STAMP := $(VENV)/.installed
KAFKA_JARS := deploy/kafka/libs/.complete

.DEFAULT_GOAL := help
.PHONY: help run test install kafka-jars lint typecheck test-unit test-integration test-e2e bench bench-detect bench-detect-stack clean \
	grafana dashboard-assets test-faketime reference-prices sample-invoices

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

run: install kafka-jars ## Run the live local stack (Kafka, worker, simulated traffic, status line); Ctrl-C stops
	@echo 'tally is in .venv/bin. To use it in another shell, from this directory: . .venv/bin/activate'
	@echo '  (or export PATH="$$PWD/.venv/bin:$$PATH"), then e.g. tally status'
	$(TALLY) run

test: install kafka-jars lint ## Lint, then the whole suite: unit, integration (real Kafka + chDB), e2e; then test-faketime
	$(PY) -m pytest tests -q -p no:cacheprovider
	$(MAKE) --no-print-directory test-faketime

install: $(STAMP) ## Create the virtualenv and install tally with its dev dependencies

$(STAMP): pyproject.toml
	test -x $(PY) || $(PY_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

kafka-jars: $(KAFKA_JARS) ## Fetch Apache Kafka's jars with Maven (once)

$(KAFKA_JARS): deploy/kafka/pom.xml
	bash deploy/kafka/fetch.sh

lint: install ## ruff and mypy
	$(VENV)/bin/ruff check tally streams ops tests
	$(VENV)/bin/mypy

test-unit: install ## Unit tests only (no I/O)
	$(PY) -m pytest tests/unit -q -p no:cacheprovider

test-integration: install kafka-jars ## Integration tests (real Kafka broker and chDB)
	$(PY) -m pytest tests/integration -q -p no:cacheprovider

test-e2e: install kafka-jars ## End-to-end tests (the CLI driving the whole local stack)
	$(PY) -m pytest tests/e2e -q -p no:cacheprovider

# The tests whose data meets a TTL, a retention or a budget period, run again with the clock 60 days ahead (Debian's
# faketime). The shim keeps monotonic waits real where libfaketime 0.9.10 breaks them (see tests/faketime/shim.c);
# java is not faked (libfaketime makes the JVM crawl). The same command with `tests` runs the whole suite.
FAKETIME_SHIM := $(VENV)/faketime_shim.so
FAKETIME_TESTS := tests/integration/test_store_sink.py tests/integration/test_request_sink.py \
	tests/integration/test_rollups.py tests/integration/test_dashboard_panels.py \
	tests/integration/test_chargeback_report.py tests/integration/test_reports_money.py
FAKETIME_RUN = LD_PRELOAD=$(abspath $(FAKETIME_SHIM)) FAKETIME_DONT_FAKE_MONOTONIC=1 FAKETIME_SKIP_CMDS=java \
	faketime -f +60d

$(FAKETIME_SHIM): tests/faketime/shim.c $(STAMP)
	cc -shared -fPIC -O2 -Wall -o $@ $< -ldl

test-faketime: install $(FAKETIME_SHIM) ## The TTL/retention/period-sensitive tests with the clock 60 days ahead
	@command -v faketime >/dev/null || { echo "test-faketime needs faketime: apt-get install faketime"; exit 1; }
	$(FAKETIME_RUN) $(PY) -m pytest $(FAKETIME_TESTS) -q -p no:cacheprovider
.PHONY: faults
faults: install kafka-jars ## The fault suite: one row per scenario (lost, duplicated, exact cost); exit 1 unless all exact
	$(PY) -m tests.faults.run $(FAULTS_ARGS)

bench: install kafka-jars ## Benchmarks: per-stage cost, Kafka/Faust baselines, end-to-end throughput and latency
	$(PY) -m tests.bench.run

bench-detect: install ## Detection benchmark: precision, recall, delay per incident kind, against the seed's z-score
	$(PY) -m tests.bench.detect

# One seed, two days of event time at 0.4 requests/s (~95k lines); SDK messages of up to 2,000 events (~1 MB), so a
# backfill message spans hours of event time; paced: the two days in 6 minutes (~480x). About 12-15 minutes on two
# busy cores. Add `--kill-process 3` for a backfill with the worker killed three times (another ~5 minutes).
DETECT_STACK_ARGS ?= --days 2 --rate 0.4 --seeds 7 --paced-minutes 6 --sdk-batch-events 2000 --sdk-max-bytes 1000000
bench-detect-stack: install kafka-jars ## Detection through a real stack: offline, backfill and paced side by side
	$(PY) -m tests.bench.detect --mode all $(DETECT_STACK_ARGS)

# The price card `tally run` loads by default, generated from the installed genai-prices (committed: the stack runs
# offline, and a new genai-prices release is a reviewed diff; tests/unit/test_genai_prices_grid.py checks it is current).
reference-prices: install ## Regenerate reference/genai_prices.yaml from the installed genai-prices package
	$(TALLY) reference import genai-prices --out reference/genai_prices.yaml

sample-invoices: install ## Write invoice.csv (README's reconcile example) and one file per shape, from today's sums
	$(TALLY) report sample-invoices $(if $(DAY),--day $(DAY))

grafana: install ## Regenerate the Grafana dashboard (deploy/grafana/) from tally/dashboard/panels.py
	$(PY) -m tally.dashboard.grafana

dashboard-assets: ## Rebuild the live page's charting library (npm ci, then copy into tally/dashboard/static/vendor)
	cd tally/dashboard && npm ci --no-audit --no-fund && npm run build

clean: ## Remove the data directory (Kafka logs, chDB) — not the virtualenv or jars
	rm -rf .tally
