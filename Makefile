# Every target that runs code creates .venv first when it is missing or stale.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PARAMS ?= parameters/lab.yaml

.PHONY: venv test lint demo run lab notebook bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check pgtls_helpers tests bench
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

demo: $(STAMP)
	$(BIN)/python -m pgtls_helpers run parameters/lab.yaml --records records --work work

run: $(STAMP)
	$(BIN)/python -m pgtls_helpers run $(PARAMS) --records records --work work

lab: $(STAMP)
	$(BIN)/python -m pgtls_helpers lab up --dir work/lab

notebook: $(STAMP)
	PGTLS_PARAMS=$(abspath $(PARAMS)) $(BIN)/jupyter lab notebooks/

bench: $(STAMP)
	$(BIN)/python bench/bench_chain.py
	$(BIN)/python bench/bench_probe.py
	$(BIN)/python bench/bench_runbook.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
