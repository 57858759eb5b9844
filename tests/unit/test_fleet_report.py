"""The fleet report read from a records folder: rows, unreached hosts, thin manifests, errors."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from pgtls_helpers.cli import main
from pgtls_helpers.display.fleet import fleet_page, fleet_text
from pgtls_helpers.errors import InputError
from pgtls_helpers.runbook.fleet_report import load_fleet_report

RUN = "20261130T010000Z-change"
NOW = datetime(2026, 11, 30, tzinfo=timezone.utc)


def _note(folder: Path, host: str, stamp: str | None, wave: int, **extra: object) -> None:
    (folder / host).mkdir(parents=True, exist_ok=True)
    note = {"run": RUN, "host": host, "wave": wave, "phase": "install", "record": stamp}
    note.update(extra)
    name = stamp or f"{RUN}-no-record"
    (folder / host / f"{name}.fleet.json").write_text(json.dumps(note))


def _record(folder: Path, host: str, stamp: str, manifest: dict[str, object]) -> Path:
    record = folder / host / stamp
    record.mkdir(parents=True)
    (record / "manifest.json").write_text(json.dumps(manifest))
    return record


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    base = tmp_path / "records" / "CHG1"
    (base / "fleet-runs").mkdir(parents=True)
    hosts = ["db1", "db2", "db3", "db4"]
    (base / "fleet-runs" / f"{RUN}.json").write_text(
        json.dumps({"run": RUN, "change_id": "CHG1", "hosts": hosts, "playbook": "change"})
    )
    ok = _record(
        base,
        "db1",
        "20261130T010001Z",
        {
            "outcome": "ok",
            "apply": True,
            "steps": [{"step": "05_verify_clients", "status": "ok"}],
            "presented_chain": [{"sha256": "AB" * 32}],
            "certificates": [
                {"role": "leaf", "sha256": "AB" * 32, "not_after": "2027-12-31 00:00:00+00:00"}
            ],
            "checks": [{"passed": True}, {"passed": True}, {"passed": False}],
        },
    )
    (ok / "index.html").write_text("<html></html>")
    _note(base, "db1", "20261130T010001Z", 1, exit_code=0)
    failed = _record(
        base,
        "db2",
        "20261130T010101Z",
        {
            "outcome": "failed",
            "steps": [
                {"step": "01_key_and_csr", "title": "Key and CSR", "status": "ok"},
                {
                    "step": "03_install_files",
                    "title": "Install files",
                    "status": "failed",
                    "error": "ServerError: connection refused",
                },
            ],
        },
    )
    (failed / "03_install_files.html").write_text("<html></html>")
    _note(base, "db2", "20261130T010101Z", 2, exit_code=1)
    # an earlier run reached db3; this one did not
    _note(base, "db3", "20261129T000000Z", 3)
    (base / "db3" / "20261129T000000Z.fleet.json").write_text(
        json.dumps({"run": "20261129T000000Z-change", "record": "20261129T000000Z"})
    )
    return base


def test_a_row_per_host_with_wave_outcome_and_reason(folder: Path) -> None:
    report = load_fleet_report(folder, now=NOW)
    rows = {r.host: r for r in report.rows}
    assert [r.host for r in report.rows] == ["db1", "db2", "db3", "db4"]
    assert (rows["db1"].outcome, rows["db1"].wave) == ("ok", 1)
    assert rows["db1"].fingerprint == "AB" * 32
    assert rows["db1"].days_left == 396
    assert (rows["db1"].checks_passed, rows["db1"].checks_total) == (2, 3)
    assert rows["db1"].page == "db1/20261130T010001Z/index.html"
    assert rows["db2"].outcome == "failed"
    assert rows["db2"].failed_step == "03_install_files Install files"
    assert rows["db2"].reason == "ServerError: connection refused"
    assert rows["db2"].page == "db2/20261130T010101Z/03_install_files.html"
    assert rows["db3"].outcome == rows["db4"].outcome == "not reached"
    assert not report.all_good
    assert report.counts == {"ok": 1, "failed": 1, "not reached": 2}


def test_the_page_links_each_record_and_escapes_text(folder: Path) -> None:
    report = load_fleet_report(folder, now=NOW)
    page = fleet_page(report)
    assert 'href="db1/20261130T010001Z/index.html"' in page
    assert "ServerError: connection refused" in page
    assert "<script" not in page
    assert "db2" in fleet_text(report) and "not reached" in fleet_text(report)


def test_a_host_without_record_and_a_thin_manifest(folder: Path) -> None:
    _note(folder, "db3", None, 3, exit_code=2, stderr=["pgtls: ca_files: missing"])
    _record(folder, "db4", "20261130T010201Z", {})  # a manifest with none of the fields
    _note(folder, "db4", "20261130T010201Z", 3)
    rows = {r.host: r for r in load_fleet_report(folder, now=NOW).rows}
    assert rows["db3"].outcome == "failed" and rows["db3"].reason == "pgtls: ca_files: missing"
    assert rows["db4"].outcome == "unknown" and rows["db4"].fingerprint is None


def test_the_command_writes_html_and_json_and_says_not_all_good(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["fleet", "report", str(folder)]) == 1
    assert (folder / "fleet-report.html").exists()
    data = json.loads((folder / "fleet-report.json").read_text())
    assert [h["outcome"] for h in data["hosts"]] == ["ok", "failed", "not reached", "not reached"]
    assert "report:" in capsys.readouterr().out


def test_a_folder_without_fleet_runs_is_unusable_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(InputError, match="no fleet run here"):
        load_fleet_report(tmp_path)
    assert main(["fleet", "report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pgtls: ") and "Traceback" not in err


def test_a_rollback_record_reads_as_rolled_back(folder: Path) -> None:
    _record(folder, "db3", "20261130T020000Z", {"kind": "rollback", "outcome": "ok"})
    _note(folder, "db3", "20261130T020000Z", 1)
    _record(
        folder,
        "db4",
        "20261130T020001Z",
        {"kind": "rollback", "outcome": "failed", "error": "no journal"},
    )
    _note(folder, "db4", "20261130T020001Z", 2)
    rows = {r.host: r for r in load_fleet_report(folder, now=NOW).rows}
    assert rows["db3"].outcome == "rolled-back"
    assert (rows["db4"].outcome, rows["db4"].failed_step, rows["db4"].reason) == (
        "failed",
        "rollback",
        "no journal",
    )


def test_a_rollback_with_nothing_to_roll_back_is_good_news(folder: Path) -> None:
    _note(folder, "db4", None, 1, phase="rollback", exit_code=0)
    report = load_fleet_report(folder, now=NOW)
    row = {r.host: r for r in report.rows}["db4"]
    assert (row.outcome, row.good, row.record) == ("nothing to roll back", True, None)
    # the same host failing its rollback before any record is a failure, as before
    _note(folder, "db4", None, 1, phase="rollback", exit_code=1)
    row = {r.host: r for r in load_fleet_report(folder, now=NOW).rows}["db4"]
    assert row.outcome == "failed" and not row.good
