# Everything runs from a local virtual environment, created on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: demo test install install-test clean

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -e .
	touch $@

# torch first, pinned, so nothing else pulls another build of it. TORCH_PIP_OPTIONS: where to get
# its CPU build when pip's default wheel is a CUDA one (Linux from PyPI), e.g.
# TORCH_PIP_OPTIONS='--index-url https://download.pytorch.org/whl/cpu'.
TORCH_PIP_OPTIONS ?=
$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install $(TORCH_PIP_OPTIONS) torch==2.13.0
	$(PIP) install -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(VENV)/bin/llama-jax demo

# The test files are shared among TEST_WORKERS processes, each file run whole by one of them (its
# module fixtures built once); 0 runs everything in this process.
TEST_WORKERS ?= 2
test: install-test
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
