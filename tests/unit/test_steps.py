"""The step registry (runbook/steps.py): each step names a notebook that exists and a result
type that saves a summary, and a step is skipped by what it is, not by its name."""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import pytest

from pgtls_helpers.runbook.params import Params
from pgtls_helpers.runbook.steps import SERVER, TRUST, Step

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


@pytest.mark.parametrize("step", [*SERVER, *TRUST], ids=lambda s: s.name)
def test_each_step_has_its_notebook_and_a_typed_result(step: Step) -> None:
    assert (NOTEBOOKS / step.notebook).is_file()
    module, name = step.result.split(":")
    result = getattr(importlib.import_module(module), name)
    assert dataclasses.is_dataclass(result) and result.__dataclass_params__.frozen
    assert callable(result.summary)


def test_skips_follow_the_registry() -> None:
    plan = Params(change_id="CHG-1", common_name="db1.example.com", apply=False)
    applied = dataclasses.replace(plan, apply=True)
    verify = SERVER[-1]
    assert verify.skipped(plan, phase_one=False) == (
        "skipped",
        "apply is false: nothing was changed, so there is nothing to verify",
    )
    assert verify.skipped(applied, phase_one=False) is None
    # phase one: only the step that makes the CSR runs; the trust change never waits for a CA
    assert [s.name for s in SERVER if s.skipped(applied, phase_one=True) is None] == [
        "01_key_and_csr"
    ]
    assert not any(s.needs_ca for s in TRUST)
    assert [s.name for s in (*SERVER, *TRUST) if s.writes] == [
        "03_install_files",
        "04_enable_ssl",
        "client_trust",
    ]


def test_a_client_ca_rotations_trust_or_retire_change_runs_only_c4_and_c5() -> None:
    from pgtls_helpers.runbook.steps import CLIENTS, waits_for_the_ca

    issue = Params(change_id="CHG-1", common_name="db1.example.com", apply=True)
    assert waits_for_the_ca(issue, CLIENTS)  # ca_mode files, no client_ca_files yet
    for change in (
        dataclasses.replace(issue, trust_client_roots=("new-root.crt",)),
        dataclasses.replace(issue, retire_client_roots=("ab" * 32,)),
    ):
        assert not waits_for_the_ca(change, CLIENTS)  # no CSR goes to a CA
        run = [s.name for s in CLIENTS if s.skipped(change, phase_one=False) is None]
        assert run == ["c4_server_trust", "c5_verify_clients"]
