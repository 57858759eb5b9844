"""The host-name rules checked against real libpq, not only against our reading of its source.

A throwaway cluster serves each certificate of ``hostname_cases.CERTS`` in turn; a client
connects with ``sslmode=verify-full host=NAME hostaddr=127.0.0.1`` and libpq alone decides.
Two clients run the same table: psycopg (its bundled libpq) and ``psql`` (the system's libpq),
so two libpq versions are held to :func:`pgtls_helpers.hostname.matches_host`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import certfactory
import hostname_cases
import psycopg
import pytest
from psycopg import pq
from support import skip_or_fail

from pgtls_helpers.lab import LabCluster
from pgtls_helpers.pki.hostname import explain, matches_host

Connect = Callable[[str], tuple[bool, str]]


@pytest.fixture(scope="module")
def ca() -> certfactory.Issued:
    return certfactory.make_ca("pgtls host-name test CA")


@pytest.fixture(scope="module")
def cluster() -> Iterator[LabCluster]:
    """A cluster of this module's own: its certificate changes from test to test."""
    from pgtls_helpers.errors import PgtlsError
    from pgtls_helpers.lab import find_bindir

    try:
        find_bindir()
    except PgtlsError as exc:
        skip_or_fail(str(exc))
    made = LabCluster.create()
    try:
        made.start()
        yield made
    finally:
        made.remove()


@pytest.fixture(scope="module")
def root_file(ca: certfactory.Issued, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return certfactory.write_pem(tmp_path_factory.mktemp("client") / "root.crt", ca)


def _conninfo(cluster: LabCluster, host: str, root: Path) -> dict[str, str | int]:
    # sslsni=0: the server name indication is not what is tested, and some of these host
    # strings are not names OpenSSL would send.
    return cluster.conninfo(
        host=host,
        hostaddr="127.0.0.1",
        sslmode="verify-full",
        sslrootcert=str(root),
        sslsni="0",
    )


def _psycopg_connect(cluster: LabCluster, root: Path) -> Connect:
    def connect(host: str) -> tuple[bool, str]:
        try:
            with psycopg.connect(**_conninfo(cluster, host, root)) as conn:  # type: ignore[arg-type]
                conn.execute("SELECT 1")
        except psycopg.OperationalError as exc:
            return False, str(exc)
        return True, ""

    return connect


def _psql_connect(cluster: LabCluster, root: Path) -> Connect:
    psql = shutil.which("psql")
    if psql is None:
        skip_or_fail("psql is not installed; psycopg's libpq is checked on its own")

    def quote(value: str | int) -> str:
        text = str(value).replace("\\", "\\\\").replace("'", "\\'")
        return f"'{text}'"

    def connect(host: str) -> tuple[bool, str]:
        info = _conninfo(cluster, host, root)
        dsn = " ".join(f"{k}={quote(v)}" for k, v in info.items())
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        proc = subprocess.run(
            [psql, "-X", "-A", "-t", "-d", dsn, "-c", "SELECT 1"],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
            check=False,
        )
        return proc.returncode == 0, proc.stderr

    return connect


@pytest.fixture(scope="module", params=["psycopg", "psql"])
def client(request: pytest.FixtureRequest, cluster: LabCluster, root_file: Path) -> Connect:
    if request.param == "psycopg":
        return _psycopg_connect(cluster, root_file)
    return _psql_connect(cluster, root_file)


def _libpq_versions() -> str:
    system = subprocess.run(["psql", "--version"], capture_output=True, text=True, check=False)
    return f"psycopg libpq {pq.version()}, {system.stdout.strip() or 'no psql'}"


@pytest.mark.parametrize("cert_name", list(hostname_cases.CERTS))
def test_libpq_agrees_with_matches_host(
    cert_name: str,
    client: Connect,
    cluster: LabCluster,
    ca: certfactory.Issued,
) -> None:
    server = hostname_cases.build(cert_name, ca)
    cluster.serve_certificate(server.key, [server.cert])
    cases = [c for c in hostname_cases.CASES if c.cert == cert_name]
    assert cases, f"no host names listed for {cert_name}"
    disagreements = []
    for case in cases:
        ok, message = client(case.host)
        ours = matches_host(server.cert, case.host)
        if ok != ours or ok != case.ok:
            disagreements.append(
                f"host={case.host!r}: libpq {'accepts' if ok else 'refuses'} "
                f"({message.strip()[:200]}), matches_host says {ours}, table says {case.ok}; "
                f"explain: {explain(server.cert, case.host)}"
            )
        elif not ok and case.libpq_says:
            assert case.libpq_says in message, message
    assert not disagreements, f"{_libpq_versions()}\n" + "\n".join(disagreements)


def test_a_good_connection_really_is_verified(
    cluster: LabCluster, ca: certfactory.Issued, root_file: Path
) -> None:
    # Guards the table above against passing for the wrong reason (say, SSL being off).
    server = hostname_cases.build("server-cn-only", ca)
    cluster.serve_certificate(server.key, [server.cert])
    info = _conninfo(cluster, "common-name.pg-ssltest.test", root_file)
    with psycopg.connect(**info) as conn:  # type: ignore[arg-type]
        assert conn.pgconn.ssl_in_use
        row = conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
        assert row is not None and row[0] is True
    other_root = certfactory.write_pem(
        root_file.parent / "other-root.crt", certfactory.make_ca("Some Other CA")
    )
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        psycopg.connect(**_conninfo(cluster, "common-name.pg-ssltest.test", other_root))  # type: ignore[arg-type]
