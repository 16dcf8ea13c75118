# alarm_engine: `make run` runs the engine on the local stack, `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
STACK := $(BIN)/python -m alarm_engine.stack
# The tests get their own stack (ports, data) so they never touch a running demo.
TEST_ENV := KAFKA_PORT=19092 KAFKA_CONTROLLER_PORT=19093 REGISTRY_PORT=18081 \
	ALARM_ENGINE_STACK_DIR=$(CURDIR)/.stack-test \
	BOOTSTRAP_SERVERS=127.0.0.1:19092 SCHEMA_REGISTRY=http://127.0.0.1:18081/apis/ccompat/v7
PYTEST_ARGS ?=

.PHONY: install run test unit integration stack-start stack-stop stack-status bench soak clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

## The demo: stack, demo IOC, topics, a few alarms, one worker, then list-active --follow.
run: install
	$(BIN)/python -m alarm_engine.demo

## Unit tests, then integration tests against a freshly started real stack (stopped afterwards).
test: install
	$(BIN)/python -m pytest -q -m "not integration" $(PYTEST_ARGS)
	$(TEST_ENV) $(STACK) start --fresh
	status=0; $(TEST_ENV) $(BIN)/python -m pytest -q -m "integration and not soak" $(PYTEST_ARGS) || status=$$?; \
	$(TEST_ENV) $(STACK) stop; exit $$status

unit: install
	$(BIN)/python -m pytest -q -m "not integration" $(PYTEST_ARGS)

stack-start: install
	$(STACK) start

stack-stop:
	$(STACK) stop

stack-status:
	$(STACK) status

clean:
	-$(STACK) stop
	rm -rf .stack .stack-test .alarm-engine-data

## Benchmarks on the real stack (not part of make test); results in bench/results/.
BENCH_ENV := KAFKA_PORT=29092 KAFKA_CONTROLLER_PORT=29093 REGISTRY_PORT=28181 \
	ALARM_ENGINE_STACK_DIR=$(CURDIR)/.stack-bench \
	BOOTSTRAP_SERVERS=127.0.0.1:29092 SCHEMA_REGISTRY=http://127.0.0.1:28181/apis/ccompat/v7
bench: install
	$(BIN)/pip install -q -e '.[test,bench]'
	$(BENCH_ENV) $(STACK) start --fresh
	status=0; $(BENCH_ENV) $(BIN)/python -m bench $(BENCH_ARGS) || status=$$?; \
	$(BENCH_ENV) $(STACK) stop; exit $$status

## Long variants of the reliability tests.
soak: install
	$(TEST_ENV) $(STACK) start --fresh
	status=0; $(TEST_ENV) ALARM_ENGINE_SOAK=1 $(BIN)/python -m pytest -q -m "soak" $(PYTEST_ARGS) || status=$$?; \
	$(TEST_ENV) $(STACK) stop; exit $$status
