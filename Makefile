# The two set-up commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test install lint typecheck pytest bench load clean redis-server

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml setup.py $(wildcard ext/*.pyx ext/*.pxi)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/fairgate demo --port 8080

redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server with apt"; \
	  (apt-get update -qq && apt-get install -y -qq redis-server) >/dev/null; }

lint: install
	$(BIN)/ruff check gateway tests loadtests
	$(BIN)/ruff format --check gateway tests loadtests

typecheck: install
	$(BIN)/mypy

pytest: install redis-server
	$(BIN)/pytest -q

test: lint typecheck pytest

bench: install
	$(BIN)/pip install -q -e '.[loadtest]'
	$(BIN)/python loadtests/bench_proxy.py

load: install
	$(BIN)/pip install -q -e '.[loadtest]'
	$(BIN)/python loadtests/run_load.py

clean:
	rm -rf $(VENV) build *.egg-info gateway/*.so gateway/*.c ext/*.c
