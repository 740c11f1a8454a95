# Two commands for a new user: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-quick browser bench docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed-test: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

demo: $(VENV)/.installed-test
	$(BIN)/vlpipe demo

test: $(VENV)/.installed-test browser
	$(BIN)/python -m pytest

test-quick: $(VENV)/.installed-test
	$(BIN)/python -m pytest -m "not slow"

# Debian's chromium for the headless-browser report test; a no-op where it exists, never fails the build.
browser:
	@sh tests/install_browser.sh

# Throughput against the bare model loop and a naive transformers loop (docs/performance.md).
bench: $(VENV)/.installed-test
	$(BIN)/python -m benchmarks.bench $(BENCH_ARGS)

# The documentation site (MkDocs + Material) into site/; the suite builds it strictly too.
docs: $(VENV)/.installed-test
	$(BIN)/mkdocs build --strict

clean:
	rm -rf out .cache/demo .pytest_cache site
