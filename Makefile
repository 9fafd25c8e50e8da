# The two commands of the README: `make demo` and `make test`.
# Each creates .venv (with the Python given as PYTHON, python3 by default) and installs
# trio-pgs with its development dependencies when pyproject.toml changed.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DOCS_STAMP := $(VENV)/.installed-docs

.PHONY: demo test lint typecheck bench docs clean

$(STAMP): pyproject.toml
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  echo "venv without ensurepip: creating it bare and using $(PYTHON)'s pip"; \
	  $(PYTHON) -m venv --without-pip $(VENV) && \
	  $(PYTHON) -m pip --python $(BIN)/python install -q pip; }
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

demo: $(STAMP)
	$(BIN)/python examples/game.py

test: $(STAMP)
	$(BIN)/ruff check trio_pgs tests examples benchmarks
	$(BIN)/mypy --strict trio_pgs
	$(BIN)/python -m tests.typecheck_user_code
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/run.py $(BENCH_ARGS)

# The docs' extra is installed once (again when pyproject.toml changes); sphinx-build -q
# rebuilds only the pages that changed and prints only warnings, which fail the build.
$(DOCS_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[docs]'
	@touch $@

docs: $(DOCS_STAMP)
	$(BIN)/sphinx-build -q -W --keep-going -b html docs docs/_build/html
	@echo "docs built: docs/_build/html/index.html"

clean:
	rm -rf $(VENV) .nox .mypy_cache .ruff_cache .pytest_cache .hypothesis docs/_build \
	  build *.egg-info game-state bank-state chat-state cart-state
