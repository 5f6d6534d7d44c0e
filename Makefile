# Two commands do all set-up on a fresh machine:
#   make demo   # mock SDSS, DESI and PFS surveys -> ingest -> predict -> HATS catalog -> query, on a local Dask cluster
#   make test   # the test suite (reads ../shared/realdata when present)
# Both create .venv/ when missing and install catalogpred into it, with CPU torch pinned in constraints.txt.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: venv demo test bench bench-quick clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/catalogpred demo --output demo-output

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/run.py

bench-quick: $(STAMP)
	$(BIN)/python bench/run.py --quick

clean:
	rm -rf demo-output bench-output .pytest_cache
