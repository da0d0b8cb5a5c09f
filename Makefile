# Quick start: `make demo` and `make test`; both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.revlens-installed
TORCH_VERSION ?= 2.13.0

.PHONY: venv demo test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, in its own call (the CPU build on disk here), so pip does not resolve a CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/revlens demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) benchmarks/probe_throughput.py
	$(PY) benchmarks/intervention_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
