"""fleet/renew.yml on a lab fleet of two throwaway clusters signed by a real OpenBao.

One fleet serves the whole module: the change (fleet/pgtls.yml, ca_mode vault: one phase,
the CA signs on the host), then renewal runs with thresholds that make nothing due, then
everything due, then everything due with db2's CA unreachable. Each step runs once, when the
first test needs it, so any test also runs alone with ``-k``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives.serialization import Encoding
from fleetkit import LabHosts, Played, lab_dir

from pgtls_helpers.lab import free_port
from pgtls_helpers.lab.cas import LabBao, openbao
from pgtls_helpers.postgres.probe import probe
from pgtls_helpers.runbook.fleet_report import HostRow, load_fleet_report
from pgtls_helpers.runbook.record import read_manifest

CHANGE = "CHG-renew-fleet"
HOSTS = ("db1", "db2")
NOT_DUE = "pgtls_renew_due_days=1"  # a 90-day certificate is not due a day before its end…
DUE = "pgtls_renew_due_days=365"  # …and is due a year before it


class RenewFleet(LabHosts):
    def __init__(self, base: Path, bao: LabBao) -> None:
        # a venv of its own: these hosts install pgtls[ca] (hvac for ca_mode vault)
        super().__init__(base, hosts=len(HOSTS), change_id=CHANGE, venv="venv-ca")
        self.root = base / "bao-root.crt"
        self.root.write_bytes(bao.root.public_bytes(Encoding.PEM))
        # the token by reference: a root-only file on the host, named in the inventory
        token = base / "bao-token"
        token.touch(mode=0o600)
        token.write_text(bao.token)
        data = yaml.safe_load(self.inventory.read_text())
        data["all"]["vars"]["ca_mode"] = "vault"
        data["all"]["vars"]["ca_settings"] = {**bao.settings, "token_file": str(token)}
        del data["all"]["vars"]["ca_settings"]["token_env"]
        self.inventory.write_text(yaml.safe_dump(data, sort_keys=False))
        # the same fleet with db2's CA on a port where nothing listens
        down_ca = json.loads(json.dumps(data))
        db2 = down_ca["all"]["children"]["pgtls_servers"]["hosts"]["db2"]
        db2["ca_settings"] = {
            **data["all"]["vars"]["ca_settings"],
            "address": f"http://127.0.0.1:{free_port()}",
            "timeout": 5,
        }
        self.inventory_ca_down = base / "fleet" / "inventory-ca-down.yml"
        self.inventory_ca_down.write_text(yaml.safe_dump(down_ca, sort_keys=False))
        self.done: dict[str, Played] = {}
        self.served: dict[str, dict[str, int]] = {}  # step -> host -> serial after it
        self.files_before: dict[str, dict[str, str]] = {}

    def serial(self, host: str) -> int:
        c = self.clusters[host]
        return probe(c.host, c.port).chain[0].serial_number

    def step(self, name: str) -> Played:
        """Run one step once; later calls return the first result."""
        if name in self.done:
            return self.done[name]
        if name == "change":
            result = self.play("pgtls.yml")
            assert result.returncode == 0, f"the change failed:\n{result.tail()}"
        elif name == "not-due":
            self.step("change")
            self.files_before = {h: self.files(h) for h in HOSTS}
            result = self.renew("-e", NOT_DUE)
        elif name == "due":
            self.step("not-due")
            result = self.renew("-e", DUE)
        elif name == "ca-down":
            self.step("due")
            result = self.renew("-e", DUE, inventory=self.inventory_ca_down)
        else:
            raise ValueError(name)
        self.served[name] = {h: self.serial(h) for h in HOSTS}
        self.done[name] = result
        return result

    def renew(self, *extra: str, inventory: Path | None = None) -> Played:
        return self.play("renew.yml", *extra, inventory=inventory)

    def rows(self) -> dict[str, HostRow]:
        fleet = load_fleet_report(self.control / "records" / CHANGE)
        assert fleet.playbook == "renew"
        return {r.host: r for r in fleet.rows}

    def verify_full(self, host: str) -> subprocess.CompletedProcess[str]:
        c = self.clusters[host]
        return subprocess.run(
            [
                "psql",
                "-Atc",
                "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
                f"host=localhost hostaddr=127.0.0.1 port={c.port} user=postgres "
                f"sslmode=verify-full sslrootcert={self.root}",
            ],
            env={**os.environ, "PGPASSFILE": str(c.passfile)},
            capture_output=True,
            text=True,
            check=False,
        )


def recap(result: Played, host: str) -> dict[str, int]:
    """The PLAY RECAP counts of one host."""
    line = re.search(rf"(?m)^{host}\s+:\s+(.*)$", result.output)
    assert line, result.tail()
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line.group(1))}


@pytest.fixture(scope="module")
def fleet() -> Iterator[RenewFleet]:
    with lab_dir("pgtls-fleet-renew-") as base:
        (base / "bao").mkdir()
        with openbao(base / "bao") as bao:
            yield RenewFleet(base, bao)


def test_a_renewal_that_is_not_due_changes_nothing_on_any_host(fleet: RenewFleet) -> None:
    result = fleet.step("not-due")
    assert result.returncode == 0, result.tail()
    rows = fleet.rows()
    for host in HOSTS:
        assert fleet.files(host) == fleet.files_before[host], host
        assert fleet.served["not-due"][host] == fleet.served["change"][host]
        assert recap(result, host)["changed"] == 0, result.tail()
        assert recap(result, host)["failed"] == 0
        assert f"{host}: not due: 127.0.0.1:" in result.output, result.tail()
        assert rows[host].outcome == "not due"
        assert rows[host].record is None
        assert "nothing was changed" in (rows[host].reason or "")


def test_a_due_renewal_serves_a_new_certificate_on_every_host(fleet: RenewFleet) -> None:
    result = fleet.step("due")
    assert result.returncode == 0, result.tail()
    rows = fleet.rows()
    for host in HOSTS:
        assert fleet.served["due"][host] != fleet.served["not-due"][host], host
        assert recap(result, host)["changed"] == 1
        assert f"{host}: renewed: change {CHANGE}-renew-" in result.output, result.tail()
        proc = fleet.verify_full(host)
        assert proc.stdout.strip() == "t", proc.stderr
        row = rows[host]
        assert row.outcome == "renewed", row
        assert row.checks_total and row.checks_passed == row.checks_total
        assert row.record is not None
        m = read_manifest(fleet.control / "records" / CHANGE / row.record / "manifest.json")
        assert m.change_id.startswith(f"{CHANGE}-renew-")
        assert m.renewal is not None
        assert (m.signed_by or "").startswith("vault"), m.signed_by
    for path in (fleet.control / "records").rglob("*"):
        if path.is_file():
            assert b"PRIVATE KEY" not in path.read_bytes(), path
            assert fleet_token(fleet) not in path.read_bytes(), path


def fleet_token(fleet: RenewFleet) -> bytes:
    return (fleet.base / "bao-token").read_bytes()


def test_a_host_whose_ca_is_down_fails_with_the_reason_and_the_other_renews(
    fleet: RenewFleet,
) -> None:
    result = fleet.step("ca-down")
    assert result.returncode != 0
    rows = fleet.rows()
    # db1 is the canary, renewed; db2's CA does not answer: it fails, its server untouched
    assert fleet.served["ca-down"]["db1"] != fleet.served["due"]["db1"]
    assert rows["db1"].outcome == "renewed"
    assert fleet.served["ca-down"]["db2"] == fleet.served["due"]["db2"]
    assert fleet.verify_full("db2").stdout.strip() == "t"
    assert recap(result, "db2")["failed"] == 1
    assert recap(result, "db2")["changed"] == 0
    said = re.search(r"db2: CA unavailable: (.+?)\"?$", result.output, re.M)
    assert said, result.tail()
    assert "127.0.0.1" in said.group(1)
    row = rows["db2"]
    assert row.outcome == "CA unavailable"
    assert row.reason and "127.0.0.1" in row.reason
    assert row.record is not None  # the failed renewal's record came home
