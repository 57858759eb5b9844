"""Helpers of the fault-injection tests: the server's state that a rollback must restore, the
change's steps in a child process that a fault point kills, and ``pgtls rollback``."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from pgtls_helpers.lab import LabCluster
from pgtls_helpers.pki.chain import fingerprint
from pgtls_helpers.postgres.probe import probe
from pgtls_helpers.runbook.params import Params

HERE = Path(__file__).resolve().parent

# Every point at which the journal can stop the run, in the order a change reaches them.
# "<step>:<kind>:intent" is after the entry is durable and before the write; "<step>:<kind>"
# right after the write; "reload-*" right after a reload was confirmed.
INSTALL_POINTS = (
    "install:key:intent",
    "install:key",
    "install:certificate:intent",
    "install:certificate",
)
ENABLE_POINTS = (
    "enable:hba-checked",
    "enable:auto.conf:intent",
    "enable:auto.conf",
    "enable:reload-ssl",
    "enable:hba:intent",
    "enable:hba",
    "enable:reload-hba",
)
ALL_POINTS = INSTALL_POINTS + ENABLE_POINTS


@dataclass(frozen=True)
class ServerState:
    """What must be exactly as before after a rollback and a restart."""

    hba: bytes
    auto_conf: bytes
    served: str | None  # fingerprint of the certificate the server presents, or None
    ssl: str

    @classmethod
    def of(cls, cluster: LabCluster) -> ServerState:
        import psycopg

        result = probe("127.0.0.1", cluster.port, timeout=5.0)
        with psycopg.connect(**cluster.conninfo(sslmode="prefer"), autocommit=True) as conn:  # type: ignore[arg-type]
            ssl = str(conn.execute("SHOW ssl").fetchone()[0])  # type: ignore[index]
        return cls(
            hba=(cluster.pgdata / "pg_hba.conf").read_bytes(),
            auto_conf=(cluster.pgdata / "postgresql.auto.conf").read_bytes(),
            served=fingerprint(result.chain[0]) if result.error is None and result.chain else None,
            ssl=ssl,
        )

    def short(self) -> dict[str, str | None]:
        return {
            "hba": hashlib.sha256(self.hba).hexdigest()[:12],
            "auto_conf": hashlib.sha256(self.auto_conf).hexdigest()[:12],
            "served": self.served[:12] if self.served else None,
            "ssl": self.ssl,
        }


def params_file(params: Params, directory: Path) -> Path:
    """The parameters as a YAML file, for the child processes."""
    values = {k: v for k, v in params.__dict__.items() if k != "extra" and v is not None}
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
    values["hba_rules"] = [dict(r) for r in params.hba_rules]
    path = directory / "change.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def env_for(cluster: LabCluster, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGTLS_FAULT")}
    env.update(PGPASSFILE=str(cluster.passfile), PGTLS_LOCK_WAIT="5", **extra)
    return env


def run_steps(
    params_path: Path,
    cluster: LabCluster,
    *,
    fault: str | None = None,
    signal: str = "KILL",
    trust: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Steps 3 and 4 (``trust``: the client-trust change) in a child process (its own
    process group), stopped at ``fault``."""
    extra = {"PGTLS_FAULT_AFTER": fault, "PGTLS_FAULT_SIGNAL": signal} if fault else {}
    return subprocess.run(
        [sys.executable, str(HERE / "run_steps.py"), str(params_path)]
        + (["--trust"] if trust else []),
        capture_output=True,
        text=True,
        check=False,
        env=env_for(cluster, **extra),
        start_new_session=True,
        timeout=180,
    )


def rollback(
    params_path: Path, cluster: LabCluster, *args: str
) -> subprocess.CompletedProcess[str]:
    if "--records" not in args:  # the test's own folder, never the checkout's records/
        args = (*args, "--records", str(params_path.parent / "rollback-records"))
    return subprocess.run(
        [sys.executable, "-m", "pgtls_helpers", "rollback", str(params_path), *args],
        capture_output=True,
        text=True,
        check=False,
        env=env_for(cluster),
        timeout=180,
    )


def assert_as_before(cluster: LabCluster, before: ServerState) -> None:
    """After a restart the server comes up, and its files and certificate are as before."""
    cluster.restart()
    now = ServerState.of(cluster)
    assert now.hba == before.hba, "pg_hba.conf differs"
    assert now.auto_conf == before.auto_conf, "postgresql.auto.conf differs"
    assert now.served == before.served, (now.short(), before.short())
    assert now.ssl == before.ssl
