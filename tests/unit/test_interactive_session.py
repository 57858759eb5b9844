"""The interactive session's confirmation: what ``make notebook`` prepares for a real server
and what the apply steps check; a run without a session (headless) is never asked."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pgtls_helpers.display.changes import apply_step
from pgtls_helpers.runbook import interactive
from pgtls_helpers.runbook.params import Params, load_params


def _params(tmp_path: Path) -> Params:
    return load_params(
        {
            "change_id": "CHG1",
            "common_name": "db1.example.com",
            "server_host": "db1.example.com",
            "server_port": 5433,
            "apply": True,
            "work_dir": str(tmp_path / "work"),
        }
    )


def _session(tmp_path: Path) -> Params:
    params_file = tmp_path / "CHG1.yaml"
    params_file.write_text("change_id: CHG1\n")
    return interactive.start_session(
        _params(tmp_path),
        tmp_path / "notebooks",
        params_file=params_file,
        values={"change_id": "CHG1"},
        records_dir=tmp_path / "records",
        data_directory="/var/lib/postgresql/15/main",
        server_before=None,
    )


def test_an_apply_step_refuses_in_one_sentence_until_the_server_is_confirmed(
    tmp_path: Path,
) -> None:
    params = _session(tmp_path)
    session = interactive.session_of(params)
    assert session is not None and session.server == "db1.example.com:5433"
    assert session.data_directory == "/var/lib/postgresql/15/main"
    ran: list[Params] = []
    with pytest.raises(interactive.NotConfirmed) as refused:
        apply_step(ran.append, params)
    assert str(refused.value) == (
        "nothing was applied: press “Apply to db1.example.com:5433” at the top of this "
        "notebook to confirm this server, then run this cell again"
    )
    assert not ran and interactive.applied(tmp_path / "notebooks") == []

    done = interactive.confirm(params)
    assert done.server == "db1.example.com:5433"
    apply_step(ran.append, params)
    assert ran == [params]
    assert [a["step"] for a in interactive.applied(tmp_path / "notebooks")] == ["append"]


def test_a_confirmation_names_its_server_and_a_new_session_drops_it(tmp_path: Path) -> None:
    params = _session(tmp_path)
    interactive.confirm(params)
    elsewhere = dataclasses.replace(params, server_host="db2.example.com")
    with pytest.raises(interactive.NotConfirmed, match="db2.example.com:5433"):
        interactive.require_confirmation(elsewhere)
    again = _session(tmp_path)  # `make notebook` once more: confirm anew
    with pytest.raises(interactive.NotConfirmed):
        interactive.require_confirmation(again)


def test_a_headless_run_has_no_session_and_is_not_asked(tmp_path: Path) -> None:
    # `pgtls run` sets record_dir to its own record, which holds no session.json
    record = tmp_path / "records" / "CHG1" / "20260101T000000Z"
    record.mkdir(parents=True)
    params = dataclasses.replace(_params(tmp_path), record_dir=str(record))
    assert interactive.session_of(params) is None
    assert apply_step(lambda p: "done", params) == "done"
    assert apply_step(lambda p: "done", _params(tmp_path)) == "done"  # no record_dir at all
    assert interactive.seal_session(tmp_path / "notebooks") is None  # nothing to record
