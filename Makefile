# Every target that runs code creates .venv first when it is missing or stale.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PARAMS ?= parameters/lab.yaml

.PHONY: venv test lint demo run rollback trust lab notebook bench faults clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]' --config-settings editable_mode=compat
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check pgtls_helpers tests bench
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

# Every fault point, on a server with SSL off and one with SSL on, each killed run followed by
# a rollback and by a rerun then a rollback (`make test` runs a representative subset).
faults: $(STAMP)
	PGTLS_FAULTS=all $(BIN)/pytest -q tests/faults

demo: $(STAMP)
	$(BIN)/python -m pgtls_helpers run parameters/lab.yaml --records records --work work

run: $(STAMP)
	$(BIN)/python -m pgtls_helpers run $(PARAMS) --records records --work work

# CA rotation, client side: add_roots / remove_roots in the listed users' root.crt
trust: $(STAMP)
	$(BIN)/python -m pgtls_helpers trust $(PARAMS) --records records --work work

# Back out the change of PARAMS (DRY_RUN=1: only show what would be put back).
rollback: $(STAMP)
	$(BIN)/python -m pgtls_helpers rollback $(PARAMS) --records records --work work $(if $(DRY_RUN),--dry-run)

lab: $(STAMP)
	$(BIN)/python -m pgtls_helpers lab up --dir work/lab

# JupyterLab on copies of the notebooks prepared with PARAMS; with lab parameters they point at
# the lab cluster in work/lab (started if needed; `pgtls lab down --dir work/lab` removes it).
notebook: $(STAMP)
	$(BIN)/python -m pgtls_helpers lab notebook --params $(PARAMS) --dir work/lab --work work

bench: $(STAMP)
	$(BIN)/python bench/bench_chain.py
	$(BIN)/python bench/bench_probe.py
	$(BIN)/python bench/bench_watch.py
	$(BIN)/python bench/bench_runbook.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
