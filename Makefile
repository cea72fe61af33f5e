# shoprec — `make up` starts the local stack, `make test` runs the whole suite.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: up down status test test-fast bench install system-deps clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: pip takes the CPU build on disk instead of a multi-GB CUDA build
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[test]"
	@touch $(STAMP)

install: $(STAMP) system-deps

system-deps:
	@if [ -z "$$SHOPREC_REDIS_URL" ] && ! command -v redis-server >/dev/null; then \
	  echo "installing redis-server (apt)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null) \
	  || { echo "could not install redis-server: install it or set SHOPREC_REDIS_URL"; exit 1; }; \
	fi

up: install
	$(BIN)/shoprec stack up

down:
	@test -x $(BIN)/shoprec && $(BIN)/shoprec stack down || true

status:
	@$(BIN)/shoprec stack status

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/shoprec bench all

clean: down
	rm -rf var
