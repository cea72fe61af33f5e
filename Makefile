# shoprec — `make up` starts the local stack, `make test` runs the whole suite.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: up down status test test-fast bench install system-deps clean up-lb down-lb status-lb

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: pip takes the CPU build on disk instead of a multi-GB CUDA build
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps recbole==1.2.1
	@touch $(STAMP)

install: $(STAMP) system-deps

# Debian packages: redis-server (online state), nginx (load balancer of `make up-lb`),
# chromium + chromium-driver (the dashboard's browser test), wrk (load generator of `shoprec bench serve`)
APT_PACKAGES := redis-server nginx chromium chromium-driver wrk
system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing with apt:$$missing"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null) \
	  || { echo "could not install$$missing with apt: install them by hand (redis-server is needed unless SHOPREC_REDIS_URL is set)"; exit 1; }; \
	fi

up: install
	$(BIN)/shoprec stack up

down:
	@if [ -x $(BIN)/shoprec ]; then $(BIN)/shoprec stack down; fi

status:
	@$(BIN)/shoprec stack status

test: install
	$(BIN)/python -m pytest -q

# the suite without the tests marked slow (fuzzing, end to end, benchmarks on a sample)
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/shoprec bench all

clean: down
	rm -rf var

# two `bentoml serve` replicas (ports 3101, 3102) behind nginx (deploy/nginx.conf) on http://127.0.0.1:8080,
# started as the current user with config, pids and logs under var/lb/ (uses Redis/Kafka/MLflow of `make up`)
up-lb: install
	$(BIN)/python -m pipelines.serve_process up-lb

down-lb:
	@if [ -x $(BIN)/python ]; then $(BIN)/python -m pipelines.serve_process down-lb; fi

status-lb:
	@$(BIN)/python -m pipelines.serve_process status-lb
