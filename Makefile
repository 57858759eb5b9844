# Every target that runs code creates .venv first when it is missing or stale.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PARAMS ?= parameters/lab.yaml

.PHONY: venv test lint fleet-lint demo demo-clients demo-unattended run rollback trust clients lab notebook parameters-cells bench faults clean fleet-wheels fleet-demo fleet-down bench-fleet

# The venv: uv makes it and installs into it (seconds, where pip takes a minute), as an editable
# install: one .pth line puts this checkout on sys.path, so `pgtls` and the notebooks' kernels
# import pgtls_helpers from here. uv comes from the PATH, or else pip brings it once into
# $(VENV)/.uv (it goes with the venv; a Python without pip of its own, such as Debian's, uses the
# venv's). UV=pip, or no uv to be had, and pip does it all.
UV ?= $(shell command -v uv 2>/dev/null)
$(STAMP): pyproject.toml
	@set -e; uv='$(UV)'; python=$$($(PYTHON) -c 'import sys; print(sys.executable)'); \
	if [ -z "$$uv" ]; then \
	  boot="-m pip install -qq --disable-pip-version-check --target $(VENV)/.uv uv"; \
	  test -x $(VENV)/.uv/bin/uv || "$$python" $$boot >/dev/null 2>&1 \
	    || { test -x $(BIN)/python || "$$python" -m venv $(VENV); $(BIN)/python $$boot; } \
	    >/dev/null 2>&1 || true; \
	  if [ -x $(VENV)/.uv/bin/uv ]; then uv=$(VENV)/.uv/bin/uv; else uv=pip; fi; \
	fi; \
	if [ "$$uv" != pip ]; then \
	  echo "setting up $(VENV) with uv"; \
	  test -x $(BIN)/python || "$$uv" venv -q --seed --allow-existing --python "$$python" $(VENV); \
	  "$$uv" pip install -q --python $(BIN)/python -e '.[dev,fleet]'; \
	else \
	  echo "setting up $(VENV) with pip (uv is not to be had)"; \
	  test -x $(BIN)/python || "$$python" -m venv $(VENV); \
	  $(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev,fleet]'; \
	fi; \
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check pgtls_helpers tests bench
	$(BIN)/mypy
	$(MAKE) --no-print-directory fleet-lint

# fleet/: Ansible's production profile, without looking anything up on the network
fleet-lint: $(STAMP)
	cd fleet && PATH=$(CURDIR)/$(BIN):$$PATH ANSIBLE_CONFIG=ansible.cfg ansible-lint -q pgtls.yml clients.yml rollback.yml renew.yml roles

# four pytest sessions at once over the two majors (tests/by_major.sh); `--durations` is printed
test: lint
	tests/by_major.sh $(BIN)

# Every fault point, on a server with SSL off and one with SSL on, each killed run followed by
# a rollback and by a rerun then a rollback (`make test` runs a representative subset).
faults: $(STAMP)
	PGTLS_FAULTS=all $(BIN)/pytest -q tests/faults

demo: $(STAMP)
	$(BIN)/python -m pgtls_helpers run parameters/lab.yaml --records records --work work

# The unattended path on the embedded default: a real CA signs, then pgtls renew (CA=acme:
# Pebble, from Debian's pebble package; default: OpenBao, from the dev extra)
demo-unattended: $(STAMP)
	$(BIN)/python -m pgtls_helpers lab demo-unattended --ca $(or $(CA),vault) --records records --work work

# The client-certificate runbook on the embedded default (as root: a throwaway client OS user)
demo-clients: $(STAMP)
	$(BIN)/python -m pgtls_helpers lab demo-clients --records records --work work

run: $(STAMP)
	$(BIN)/python -m pgtls_helpers run $(PARAMS) --records records --work work

# CA rotation, client side: add_roots / remove_roots in the listed users' root.crt
trust: $(STAMP)
	$(BIN)/python -m pgtls_helpers trust $(PARAMS) --records records --work work

# The client-certificate runbook: CA-signed client certificates for the listed client OS users
clients: $(STAMP)
	$(BIN)/python -m pgtls_helpers clients $(PARAMS) --records records --work work

# Back out the change of PARAMS (DRY_RUN=1: only show what would be put back).
rollback: $(STAMP)
	$(BIN)/python -m pgtls_helpers rollback $(PARAMS) --records records --work work $(if $(DRY_RUN),--dry-run)

lab: $(STAMP)
	$(BIN)/python -m pgtls_helpers lab up --dir work/lab

# JupyterLab on copies of the notebooks prepared with PARAMS, on PORT (default 8888, or a free
# one); it prints one line with the URL and logs to work/lab/jupyterlab.log. With lab parameters
# the notebooks point at the lab cluster in work/lab (started if needed; `pgtls lab down --dir
# work/lab` removes it, and the client OS user it made as root).
notebook: $(STAMP)
	$(BIN)/python -m pgtls_helpers lab notebook --params $(PARAMS) --dir work/lab --work work --records records$(if $(PORT), --port $(PORT))

# The notebooks' parameters cell, written from Params (pgtls_helpers/runbook/params.py): after
# a parameter is added, removed or given another default there.
parameters-cells: $(STAMP)
	$(BIN)/python -m pgtls_helpers.runbook.params --cells notebooks

bench: $(STAMP)
	$(BIN)/python bench/bench_chain.py
	$(BIN)/python bench/bench_probe.py
	$(BIN)/python bench/bench_watch.py
	$(BIN)/python bench/bench_unattended.py
	$(BIN)/python bench/bench_runbook.py

# The runbook on many servers (fleet/, README "Many servers"). The wheelhouse is what the
# playbook installs on each host: the pgtls wheel (notebooks included) and every dependency.
WHEELHOUSE := dist/pgtls-wheelhouse.tar
# the hosts' Python resolves the dependencies (same minor version and platform as the hosts)
HOST_PYTHON ?= /usr/bin/python3
FLEET_DIR  := work/fleet
FLEET_CHANGE := lab-fleet
ANSIBLE    := PATH=$(CURDIR)/$(BIN):$$PATH ANSIBLE_CONFIG=fleet/ansible.cfg ansible-playbook

$(WHEELHOUSE): $(STAMP) pyproject.toml $(shell find pgtls_helpers notebooks -name '*.py' -o -name '*.ipynb')
	$(BIN)/python -m pgtls_helpers.lab.fleet wheels --out $@ --python $(HOST_PYTHON)

fleet-wheels: $(WHEELHOUSE)

# Four throwaway clusters as db1..db4, one shared lab CA, both phases, the fleet report.
# FLEET_KEEP=1 leaves the clusters running (make fleet-down removes them).
fleet-demo: $(WHEELHOUSE)
	$(BIN)/python -m pgtls_helpers.lab.fleet down --dir $(FLEET_DIR)
	rm -rf records/$(FLEET_CHANGE) csr/$(FLEET_CHANGE) ca/$(FLEET_CHANGE)
	$(BIN)/python -m pgtls_helpers.lab.fleet up --dir $(FLEET_DIR) --change-id $(FLEET_CHANGE)
	@echo "== phase 1: a key and a CSR on every host; the CSRs come home to csr/$(FLEET_CHANGE)/"
	$(ANSIBLE) -i $(FLEET_DIR)/inventory.yml fleet/pgtls.yml
	@echo "== the CA: one lab CA signs every CSR into ca/$(FLEET_CHANGE)/<host>/"
	$(BIN)/python -m pgtls_helpers.lab.fleet sign --control . --change-id $(FLEET_CHANGE)
	@echo "== phase 2: install, enable, verify, in waves (canary, 25%, the rest)"
	$(ANSIBLE) -i $(FLEET_DIR)/inventory.yml fleet/pgtls.yml
	$(BIN)/python -m pgtls_helpers fleet report records/$(FLEET_CHANGE)/
	test -n "$(FLEET_KEEP)" || $(BIN)/python -m pgtls_helpers.lab.fleet down --dir $(FLEET_DIR)

# Ansible's overhead per host on the lab fleet, against four `pgtls run` one after another
bench-fleet: $(WHEELHOUSE)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python bench/bench_fleet.py --wheelhouse $(WHEELHOUSE) --host-python $(HOST_PYTHON)

fleet-down: $(STAMP)
	$(BIN)/python -m pgtls_helpers.lab.fleet down --dir $(FLEET_DIR)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
