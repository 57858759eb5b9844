"""fleet/clients.yml on a lab fleet of two throwaway clusters that serve TLS already.

Each host has client OS users of its own (the two hosts share this machine's /home): db1's
client logs in by CN, db2's by a DN and a pg_ident.conf map. Phase 1 brings every client's CSR
home, the test signs them at home for client authentication as a CA would, ``--check`` plans
phase 2, phase 2 installs and proves each client's certificate login, and fleet/rollback.yml
with the client change's id puts every server and client file back. One fleet serves the
whole module; each step runs once, when the first test needs it, so any test also runs alone
with ``-k``.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
import yaml
from cryptography import x509
from fleetkit import LabHosts, Played, lab_dir

from pgtls_helpers.lab import LabCA
from pgtls_helpers.lab.ca import pem_of
from pgtls_helpers.runbook.fleet_report import HostRow, load_fleet_report
from pgtls_helpers.runbook.record import read_manifest

CHANGE = "CHG-fleet-clients"
HOSTS = ("db1", "db2")
ADDRESS = "127.0.0.1/32"


@contextmanager
def client_users(count: int) -> Iterator[tuple[str, ...]]:
    """Real OS users with homes of their own, removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("client OS users need root")
    names = tuple(f"pgtls_fc{i}_{os.getpid()}" for i in range(1, count + 1))
    made: list[str] = []
    try:
        for name in names:
            subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", name], check=True)
            made.append(name)
        yield names
    finally:
        for name in made:
            subprocess.run(["userdel", "--remove", name], check=False, capture_output=True)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class ClientFleet(LabHosts):
    def __init__(self, base: Path, users: tuple[str, ...]) -> None:
        super().__init__(base, hosts=len(HOSTS), change_id=CHANGE)
        # db1: CN = role; db2: a DN, mapped to its role by pg_ident.conf
        self.clients: dict[str, dict[str, str]] = {
            "db1": {"os_user": users[0], "role": users[0]},
            "db2": {"os_user": users[1], "role": "app_db2", "subject": "CN=app2,OU=dba,O=Example"},
        }
        self.client_ca = LabCA.create()  # the CA the CSRs are sent to, distinct from the server's
        self._serve_tls()
        self.inventory = self._client_inventory()
        self.done: dict[str, Played] = {}
        self.before: dict[str, dict[str, object]] = {}

    def _serve_tls(self) -> None:
        """Every host serves a lab chain (the server runbook is another test's), each client
        trusts its root in ~/.postgresql/root.crt and has a role of its own."""
        server_ca = LabCA.create()
        for host in HOSTS:
            cluster = self.clusters[host]
            key, leaf = server_ca.issue([f"{host}.lab.pgtls.test", "localhost", cluster.host])
            cluster.serve_certificate(key, [leaf, *server_ca.intermediates])
            client = self.clients[host]
            entry = pwd.getpwnam(client["os_user"])
            folder = Path(entry.pw_dir) / ".postgresql"
            folder.mkdir(mode=0o700)
            (folder / "root.crt").write_bytes(pem_of(server_ca.root))
            for path in (folder, folder / "root.crt"):
                os.chown(path, entry.pw_uid, entry.pw_gid)
            with psycopg.connect(**cluster.conninfo(), autocommit=True) as conn:  # type: ignore[arg-type]
                conn.execute(f'CREATE ROLE "{client["role"]}" LOGIN')

    def _client_inventory(self) -> Path:
        """The lab inventory with the client change's parameters: a change_id of its own, and
        per host its clients, their cert lines and (db2) the map."""
        data = yaml.safe_load(self.inventory.read_text())
        data["all"]["vars"].update(change_id=CHANGE, ca_mode="files")
        hosts = data["all"]["children"]["pgtls_servers"]["hosts"]
        for host in HOSTS:
            client = self.clients[host]
            rule = {"type": "hostssl", "database": "all", "user": client["role"]}
            hosts[host]["clients"] = [client]
            hosts[host]["hba_rules"] = [{**rule, "address": ADDRESS, "method": "cert"}]
        hosts["db2"]["hba_rules"][0]["options"] = ["map=certmap"]
        hosts["db2"]["ident_maps"] = [{"map": "certmap", "system_user": "app2", "role": "app_db2"}]
        path = self.base / "fleet" / "inventory-clients.yml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def state(self, host: str) -> dict[str, object]:
        """What the client change may touch on a host, hashed: the data directory's files
        (pg_hba.conf, pg_ident.conf, postgresql.auto.conf, ssl_ca_file's client_ca.crt), the
        settings, and the client's ~/.postgresql."""
        cluster = self.clusters[host]
        with psycopg.connect(**cluster.conninfo(), autocommit=True) as conn:  # type: ignore[arg-type]
            settings = {
                name: conn.execute(f"SHOW {name}").fetchone()[0]  # type: ignore[index]
                for name in ("ssl_ca_file", "hba_file", "ident_file")
            }
        folder = Path(pwd.getpwnam(self.clients[host]["os_user"]).pw_dir) / ".postgresql"
        files = {p.name: _sha(p) for p in sorted(folder.iterdir())}
        return {"server": self.files(host), "settings": settings, "client": files}

    def step(self, name: str) -> Played:
        """Run one step of the change once; later calls return the first result."""
        if name in self.done:
            return self.done[name]
        if name == "csr":
            self.before = {h: self.state(h) for h in HOSTS}
            result = self.play("clients.yml")
        elif name == "check":
            self.step("csr")
            self.sign()
            result = self.play("clients.yml", "--check")
        elif name == "install":
            self.step("check")
            result = self.play("clients.yml")
        elif name == "rollback":
            self.step("install")
            result = self.play("rollback.yml")
        else:
            raise ValueError(name)
        self.done[name] = result
        assert result.returncode == 0, f"{name} failed:\n{result.tail()}"
        return result

    def sign(self) -> None:
        """Play the CA at home: each client CSR signed for client authentication, the answers
        of a host's clients together in ca/<change_id>/<host>/."""
        for host in HOSTS:
            target = self.control / "ca" / CHANGE / host
            for path in sorted((self.control / "csr" / CHANGE / host).glob("*.csr")):
                csr = x509.load_pem_x509_csr(path.read_bytes())
                self.client_ca.write_response(self.client_ca.sign_client_csr(csr), target)

    def rows(self) -> dict[str, HostRow]:
        return {r.host: r for r in load_fleet_report(self.control / "records" / CHANGE).rows}

    def login(self, host: str) -> subprocess.CompletedProcess[str]:
        """psql as the client OS user with its own files alone: verify-full, and the
        certificate instead of a password (the user has no ~/.pgpass)."""
        client = self.clients[host]
        entry = pwd.getpwnam(client["os_user"])
        conninfo = (
            f"host=localhost hostaddr=127.0.0.1 port={self.clusters[host].port} "
            f"user={client['role']} dbname=postgres sslmode=verify-full connect_timeout=10"
        )
        return subprocess.run(
            [
                "psql",
                conninfo,
                "-XwAtc",
                "SELECT client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            ],
            env={"HOME": entry.pw_dir, "PATH": os.environ["PATH"], "LC_ALL": "C"},
            cwd=entry.pw_dir,
            user=entry.pw_uid,
            group=entry.pw_gid,
            extra_groups=[],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )


@pytest.fixture(scope="module")
def fleet() -> Iterator[ClientFleet]:
    with lab_dir("pgtls-fleet-clients-") as base, client_users(len(HOSTS)) as users:
        yield ClientFleet(base, users)


def test_phase_one_brings_every_clients_csr_home_and_changes_no_server_file(
    fleet: ClientFleet,
) -> None:
    fleet.step("csr")
    rows = fleet.rows()
    for host in HOSTS:
        client = fleet.clients[host]
        (path,) = (fleet.control / "csr" / CHANGE / host).iterdir()
        assert path.name == f"{client['os_user']}.csr"
        csr = x509.load_pem_x509_csr(path.read_bytes())
        assert csr.subject.rfc4514_string() == client.get("subject", f"CN={client['role']}")
        assert fleet.state(host) == fleet.before[host], host
        assert rows[host].outcome == "waiting-for-ca" and rows[host].phase == "csr"
        assert rows[host].record is not None
        manifest = read_manifest(
            fleet.control / "records" / CHANGE / rows[host].record / "manifest.json"
        )
        assert manifest.kind == "clients"
    for path in (fleet.control / "records").rglob("*"):
        if path.is_file():
            assert b"PRIVATE KEY" not in path.read_bytes(), path


def test_check_plans_phase_two_and_changes_nothing(fleet: ClientFleet) -> None:
    fleet.step("check")
    rows = fleet.rows()
    for host in HOSTS:
        assert fleet.state(host) == fleet.before[host], host
        assert rows[host].outcome == "planned" and rows[host].phase == "install", rows[host]


def test_phase_two_logs_every_client_in_with_its_certificate(fleet: ClientFleet) -> None:
    fleet.step("install")
    rows = fleet.rows()
    for host in HOSTS:
        client = fleet.clients[host]
        proc = fleet.login(host)
        assert proc.returncode == 0, proc.stderr
        dn = client.get("subject", f"CN={client['role']}")
        assert proc.stdout.strip() == "/" + "/".join(reversed(dn.split(","))), proc.stdout
        row = rows[host]
        assert row.outcome == "ok", row
        assert row.checks_total and row.checks_passed == row.checks_total
        # the server trusts the client CA now; its hba and ident lines are in place
        state = fleet.state(host)
        assert state["server"] != fleet.before[host]["server"]
        home = Path(pwd.getpwnam(client["os_user"]).pw_dir) / ".postgresql"
        assert {"postgresql.crt", "postgresql.key"} <= set(state["client"]), state  # type: ignore[operator]
        assert (home / "postgresql.key").stat().st_mode & 0o777 == 0o600


def test_rollback_with_the_client_change_id_puts_every_file_back(fleet: ClientFleet) -> None:
    fleet.step("rollback")
    rows = fleet.rows()
    for host in HOSTS:
        now = fleet.state(host)
        before = fleet.before[host]
        assert now["settings"] == before["settings"] and now["client"] == before["client"], host
        server_now: dict[str, str] = now["server"]  # type: ignore[assignment]
        server_before: dict[str, str] = before["server"]  # type: ignore[assignment]
        assert {p: server_now.get(p) for p in server_before} == server_before, host
        assert all(".pgtls-backup-" in p for p in server_now if p not in server_before), host
        assert fleet.login(host).returncode != 0
        row = rows[host]
        assert row.outcome == "rolled-back" and row.record is not None, row
        manifest = read_manifest(fleet.control / "records" / CHANGE / row.record / "manifest.json")
        assert (manifest.kind, manifest.outcome) == ("rollback", "ok")
