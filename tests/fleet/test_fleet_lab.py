"""fleet/pgtls.yml on a lab fleet of four throwaway clusters (db1..db4, ansible_connection local).

One fleet serves the whole module; each step (phase 1, the CA, --check, phase 2, rollback) runs
once, when the first test needs it, so any test also runs alone with ``-k``.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from fleetkit import LabHosts, Played, clear, lab_dir

from pgtls_helpers.lab import LabCA, free_port
from pgtls_helpers.lab.fleet import sign
from pgtls_helpers.postgres.probe import fingerprint, probe
from pgtls_helpers.runbook.fleet_report import load_fleet_report

CHANGE = "CHG-fleet"
HOSTS = ("db1", "db2", "db3", "db4")


class LabFleet(LabHosts):
    def __init__(self, base: Path) -> None:
        super().__init__(base, hosts=len(HOSTS), change_id=CHANGE)
        self.ca = LabCA.create()
        self.done: dict[str, Played] = {}
        self.before_change: dict[str, dict[str, str]] = {}

    def step(self, name: str) -> Played:
        """Run one step of the change once; later calls return the first result."""
        if name in self.done:
            return self.done[name]
        if name == "phase1":
            result = self.play("pgtls.yml")
        elif name == "check":
            self.step("phase1")
            sign(self.control, CHANGE, ca=self.ca)
            self.before_change = {h: self.files(h) for h in HOSTS}
            result = self.play("pgtls.yml", "--check")
        elif name == "phase2":
            self.step("check")
            result = self.play("pgtls.yml")
        elif name == "rollback":
            self.step("phase2")
            result = self.play("rollback.yml")
        else:
            raise ValueError(name)
        self.done[name] = result
        assert result.returncode == 0, f"{name} failed:\n{result.tail()}"
        return result

    def report(self, records: Path | None = None) -> dict[str, dict[str, object]]:
        fleet = load_fleet_report((records or self.control / "records") / CHANGE)
        return {r.host: r.__dict__ for r in fleet.rows}

    def ssl(self, host: str) -> str:
        c = self.clusters[host]
        out = subprocess.run(
            ["psql", "-Atc", "show ssl", f"host={c.host} port={c.port} user=postgres"],
            env={**os.environ, "PGPASSFILE": str(c.passfile)},
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()


@pytest.fixture(scope="module")
def fleet() -> Iterator[LabFleet]:
    with lab_dir("pgtls-fleet-") as base:
        yield LabFleet(base)


def _no_private_key_in(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            assert b"PRIVATE KEY" not in path.read_bytes(), path


def test_phase_one_brings_every_csr_and_record_home(fleet: LabFleet) -> None:
    fleet.step("phase1")
    for host in HOSTS:
        csr = x509.load_pem_x509_csr((fleet.control / "csr" / CHANGE / f"{host}.csr").read_bytes())
        assert csr.subject.rfc4514_string().startswith(f"CN={host}.lab.pgtls.test,")
        (record,) = [p for p in (fleet.control / "records" / CHANGE / host).iterdir() if p.is_dir()]
        manifest = json.loads((record / "manifest.json").read_text())
        assert manifest["outcome"] == "waiting-for-ca"
    rows = fleet.report()
    assert [rows[h]["outcome"] for h in HOSTS] == ["waiting-for-ca"] * 4
    # canary, a quarter (one of four), then the rest
    assert [rows[h]["wave"] for h in HOSTS] == [1, 2, 3, 3]
    _no_private_key_in(fleet.control)


def test_check_changes_nothing_on_any_host_and_brings_the_plans_home(fleet: LabFleet) -> None:
    fleet.step("check")
    for host in HOSTS:
        assert fleet.files(host) == fleet.before_change[host], host
        assert fleet.ssl(host) == "off"
    rows = fleet.report()
    assert [rows[h]["outcome"] for h in HOSTS] == ["planned"] * 4
    for host in HOSTS:
        record = fleet.control / "records" / CHANGE / str(rows[host]["record"])
        manifest = json.loads((record / "manifest.json").read_text())
        assert manifest["apply"] is False
        assert [s["status"] for s in manifest["steps"]][:4] == ["ok"] * 4


def test_phase_two_verifies_every_host_under_one_root(fleet: LabFleet) -> None:
    fleet.step("phase2")
    rows = fleet.report()
    root = fleet.control / "ca" / CHANGE / "root.crt"
    for host in HOSTS:
        row = rows[host]
        assert row["outcome"] == "ok", row
        assert row["checks_total"] and row["checks_passed"] == row["checks_total"]
        assert row["days_left"] is not None and row["days_left"] > 390
        c = fleet.clusters[host]
        assert row["fingerprint"] == fingerprint(probe(c.host, c.port).chain[0])
        # a client with only the fleet's one root connects to every host with verify-full
        proc = subprocess.run(
            [
                "psql",
                "-Atc",
                "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
                f"host=localhost hostaddr=127.0.0.1 port={c.port} user=postgres "
                f"sslmode=verify-full sslrootcert={root}",
            ],
            env={**os.environ, "PGPASSFILE": str(c.passfile)},
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.stdout.strip() == "t", proc.stderr
    page = (fleet.control / "records" / CHANGE / "fleet-report.html").exists()
    assert not page  # the report is written by the command, not by the playbook
    _no_private_key_in(fleet.control / "records")


def test_fleet_report_command_writes_html_and_json(fleet: LabFleet) -> None:
    fleet.step("phase2")
    from pgtls_helpers.cli import main

    folder = fleet.control / "records" / CHANGE
    assert main(["fleet", "report", str(folder)]) == 0
    data = json.loads((folder / "fleet-report.json").read_text())
    assert data["counts"] == {"ok": 4}
    html = (folder / "fleet-report.html").read_text()
    for host in HOSTS:
        row = next(r for r in data["hosts"] if r["host"] == host)
        assert f'href="{row["page"]}"' in html
        assert (folder / row["page"]).is_file()


def test_rollback_restores_every_host(fleet: LabFleet) -> None:
    fleet.step("rollback")
    for host in HOSTS:
        now = fleet.files(host)
        # every file is as before the change; what is new is only the backups the change made
        assert {p: now.get(p) for p in fleet.before_change[host]} == fleet.before_change[host]
        assert {p for p in now if p not in fleet.before_change[host]} == {
            p for p in now if ".pgtls-backup-" in p
        }, host
        assert fleet.ssl(host) == "off"
    rows = fleet.report()
    assert [rows[h]["outcome"] for h in HOSTS] == ["rolled-back"] * 4
    # reverse order: the host changed last goes first
    assert [rows[h]["wave"] for h in reversed(HOSTS)] == [1, 2, 3, 3]
    for host in HOSTS:
        record = fleet.control / "records" / CHANGE / str(rows[host]["record"])
        manifest = json.loads((record / "manifest.json").read_text())
        assert (manifest["kind"], manifest["outcome"]) == ("rollback", "ok")
        assert (record / "index.html").is_file()


def test_a_broken_host_stops_the_waves_after_it(fleet: LabFleet, tmp_path: Path) -> None:
    fleet.step("rollback")
    # db2 (the second wave) points at a port where no server listens
    inventory = yaml.safe_load(fleet.inventory.read_text())
    hosts = inventory["all"]["children"]["pgtls_servers"]["hosts"]
    hosts["db2"]["server_port"] = free_port()
    broken = tmp_path / "inventory.yml"
    broken.write_text(yaml.safe_dump(inventory))
    records = tmp_path / "records"
    untouched = {h: fleet.files(h, with_home=True) for h in ("db3", "db4")}

    result = fleet.play("pgtls.yml", "-e", f"pgtls_records_dir={records}", inventory=broken)

    assert result.returncode != 0
    for host in ("db3", "db4"):
        assert fleet.files(host, with_home=True) == untouched[host], host
    assert not (records / CHANGE / "db3").exists() and not (records / CHANGE / "db4").exists()
    rows = fleet.report(records)
    assert rows["db1"]["outcome"] == "ok"
    assert rows["db2"]["outcome"] == "failed" and rows["db2"]["wave"] == 2
    assert rows["db2"]["failed_step"] and rows["db2"]["reason"]
    assert rows["db2"]["record"] and (records / CHANGE / str(rows["db2"]["page"])).is_file()
    assert rows["db3"]["outcome"] == rows["db4"]["outcome"] == "not reached"
    page = (records / CHANGE).joinpath("fleet-report.html")
    from pgtls_helpers.cli import main

    assert main(["fleet", "report", str(records / CHANGE)]) == 1
    text = page.read_text()
    assert "not reached" in text and str(rows["db2"]["reason"])[:40] in text
    # back out what the canary did, as an operator would
    clear(records)
