# saefast — the two commands of the README.
#   make demo : set up, then train a single SAE, a bagging and a boosting ensemble and print the table
#   make test : set up, then run the tests
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# The local CPU wheel: any other torch spec would download GBs of CUDA packages.
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= demo_out

.PHONY: setup demo test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet --no-build-isolation -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/saefast demo --out $(DEMO_OUT)

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check saefast kernels tests bench

clean:
	rm -rf $(VENV) build *.egg-info $(DEMO_OUT)
