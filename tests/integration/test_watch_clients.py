"""``pgtls watch`` on the client side: client users' certificates, CRLs, sessions by issuer.

A real cluster serves TLS and trusts the lab CA's root for client certificates
(``ssl_ca_file``); two real OS users hold certificates the lab CA signed (one 10 days from
expiry, one fine), a real session is held open with each, and a CRL made with cryptography whose
nextUpdate is past is loaded as ``ssl_crl_file``: libpq then shows the misleading
``sslv3 alert certificate expired`` for a certificate that is valid, which is why such a CRL is
critical. Each of the four formats is asserted through the command.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import pwd
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from prometheus_client.parser import text_string_to_metric_families
from support import skip_or_fail

from pgtls_helpers.lab import LabCA, LabCluster
from pgtls_helpers.lab.ca import pem_of
from pgtls_helpers.pki.client import build_client_csr, client_subject, stat_ssl_dn
from pgtls_helpers.pki.client_posture import CRL_EXPIRED_ALERT, CRL_EXPIRED_ALERT_NEW
from pgtls_helpers.pki.keys import generate_key, serialize_key
from pgtls_helpers.pki.posture import Target, WatchOptions
from pgtls_helpers.postgres.clients import write_client_file
from pgtls_helpers.postgres.watch import load_roots, watch
from pgtls_helpers.postgres.watch_clients import check_client_users, resolve_watch_users

REPO = Path(__file__).resolve().parents[2]
NOW = _dt.datetime.now(_dt.UTC)
TAG = os.getpid()


@dataclass(frozen=True)
class Client:
    os_user: str
    cert: x509.Certificate
    home: Path

    @property
    def crt(self) -> Path:
        return self.home / ".postgresql" / "postgresql.crt"

    @property
    def key(self) -> Path:
        return self.home / ".postgresql" / "postgresql.key"


@dataclass(frozen=True)
class Lab:
    cluster: LabCluster
    ca: LabCA
    root_file: Path
    warn: Client
    fine: Client
    stale_crl: Path
    fresh_crl: Path


def _useradd(name: str) -> Path:
    subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", name], check=True)
    return Path(pwd.getpwnam(name).pw_dir)


def _give_client_files(ca: LabCA, os_user: str, home: Path, days: int) -> Client:
    """Key and certificate in ~/.postgresql as the client runbook leaves them."""
    entry = pwd.getpwnam(os_user)
    directory = home / ".postgresql"
    directory.mkdir(mode=0o700)
    os.chown(directory, entry.pw_uid, entry.pw_gid)
    key = generate_key("ecdsa-p256")
    # valid from an hour before NOW, which is taken once, when the module is imported
    csr = build_client_csr(client_subject(os_user), key)
    cert = ca.sign_client_csr(csr, days=days, not_before=NOW - _dt.timedelta(hours=1))
    bundle = pem_of(cert) + b"".join(pem_of(c) for c in ca.intermediates)
    ids = {"uid": entry.pw_uid, "gid": entry.pw_gid}
    write_client_file(directory / "postgresql.crt", bundle, mode=0o644, **ids)
    write_client_file(directory / "postgresql.key", serialize_key(key), mode=0o600, **ids)
    return Client(os_user, cert, home)


def _sql(cluster: LabCluster, *statements: str) -> None:
    with psycopg.connect(**cluster.conninfo(sslmode="require"), autocommit=True) as conn:  # type: ignore[arg-type]
        for statement in statements:
            conn.execute(statement)  # type: ignore[arg-type]


def _cert_login(lab: Lab, client: Client) -> psycopg.Connection:
    """A login with the client's certificate alone (pg_hba.conf: cert), as libpq makes it."""
    return psycopg.connect(
        **lab.cluster.conninfo(
            user=client.os_user,
            sslmode="verify-full",
            sslrootcert=str(lab.root_file),
            sslcert=str(client.crt),
            sslkey=str(client.key),
            passfile="/dev/null",
        ),  # type: ignore[arg-type]
        autocommit=True,
    )


@pytest.fixture(scope="module")
def lab(pg_bindir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    if os.geteuid() != 0:
        skip_or_fail("client OS users need root")
    scratch = tmp_path_factory.mktemp("watch-clients")
    ca = LabCA.create()
    cluster = LabCluster.create(bindir=pg_bindir)
    users = [f"pgtls_ww{TAG}", f"pgtls_wf{TAG}"]
    try:
        cluster.start()
        key, leaf = ca.issue(["db.pgtls.test", "127.0.0.1"])
        cluster.serve_certificate(key, [leaf, *ca.intermediates])
        root_file = scratch / "root.crt"
        root_file.write_bytes(pem_of(ca.root))
        (cluster.pgdata / "client_ca.crt").write_bytes(pem_of(ca.root))
        hba = cluster.pgdata / "pg_hba.conf"
        hba.write_text(
            "hostnossl all all 127.0.0.1/32 reject\n"
            f"hostssl all {','.join(users)} 127.0.0.1/32 cert\n" + hba.read_text()
        )
        _sql(
            cluster,
            "ALTER SYSTEM SET ssl_ca_file = 'client_ca.crt'",
            *(f'CREATE ROLE "{u}" LOGIN' for u in users),
            "SELECT pg_reload_conf()",
        )
        homes = [_useradd(u) for u in users]
        warn = _give_client_files(ca, users[0], homes[0], days=11)  # 10 whole days left
        fine = _give_client_files(ca, users[1], homes[1], days=397)
        day, hour = _dt.timedelta(days=1), _dt.timedelta(hours=1)
        stale = ca.sign_crl(last_update=NOW - 8 * day, next_update=NOW - 23 * hour)
        fresh = ca.sign_crl(last_update=NOW - hour, next_update=NOW + 6 * day + hour)
        stale_crl = scratch / "stale.crl"
        stale_crl.write_bytes(stale.public_bytes(serialization.Encoding.PEM))
        fresh_crl = scratch / "fresh.crl"
        fresh_crl.write_bytes(fresh.public_bytes(serialization.Encoding.DER))
        yield Lab(cluster, ca, root_file, warn, fine, stale_crl, fresh_crl)
    finally:
        cluster.remove()
        for user in users:
            subprocess.run(["userdel", "--remove", user], check=False, capture_output=True)


def pgtls(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pgtls_helpers",
            "watch",
            f"127.0.0.1:{lab.cluster.port}",
            "--root",
            str(lab.root_file),
            "--on-disk",
            "--sessions",
            "--user",
            "postgres",
            "--crit-days",
            "7",
            "--client-user",
            lab.warn.os_user,
            "--client-user",
            lab.fine.os_user,
            "--crl",
            str(lab.stale_crl),
            "--crl",
            str(lab.fresh_crl),
            *args,
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "PGPASSFILE": str(lab.cluster.passfile), "NO_COLOR": "1"},
    )


def _crl_hash(path: Path) -> str:
    proc = subprocess.run(
        ["openssl", "crl", "-hash", "-noout", "-in", str(path)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return proc.stdout.strip()


@pytest.fixture(scope="module")
def stale_server(lab: Lab) -> Iterator[Lab]:
    """Both clients hold a session open (made before the CRL went stale), then the server loads
    the stale CRL as ssl_crl_file; a new certificate login now fails."""
    held = [_cert_login(lab, lab.warn), _cert_login(lab, lab.fine)]
    try:
        for conn in held:
            row = conn.execute(
                "SELECT issuer_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
            ).fetchone()
            assert row is not None and row[0] == stat_ssl_dn(lab.ca.signer.subject)
        (lab.cluster.pgdata / "client.crl").write_bytes(lab.stale_crl.read_bytes())
        # the same CRL in a hashed directory too, as `openssl rehash` names it
        crl_dir = lab.cluster.pgdata / "crl.d"
        crl_dir.mkdir()
        (crl_dir / f"{_crl_hash(lab.stale_crl)}.r0").write_bytes(lab.stale_crl.read_bytes())
        _sql(
            lab.cluster,
            "ALTER SYSTEM SET ssl_crl_file = 'client.crl'",
            "ALTER SYSTEM SET ssl_crl_dir = 'crl.d'",
            "SELECT pg_reload_conf()",
        )
        yield lab
    finally:
        for conn in held:
            conn.close()


def _psql_as(lab: Lab, client: Client) -> subprocess.CompletedProcess[str]:
    """The machine's psql as the client OS user, with only its own ~/.postgresql files."""
    entry = pwd.getpwnam(client.os_user)
    return subprocess.run(
        ["psql", f"host=127.0.0.1 port={lab.cluster.port} dbname=postgres sslmode=require",
         "-XAtc", "SELECT 1"],
        capture_output=True, text=True, timeout=30, cwd="/", check=False,
        env={"HOME": str(client.home), "PATH": os.environ["PATH"], "LC_ALL": "C"},
        user=entry.pw_uid, group=entry.pw_gid, extra_groups=[],
    )  # fmt: skip


def test_a_stale_crl_fails_every_certificate_login_with_a_misleading_alert(
    stale_server: Lab,
) -> None:
    # the certificate is valid for 396 more days; the server's CRL is what is out of date
    for _ in range(50):  # the reload is asynchronous
        proc = _psql_as(stale_server, stale_server.fine)
        if proc.returncode != 0:
            break
        time.sleep(0.1)
    # the machine's libpq (OpenSSL 3.0) says sslv3; psycopg's bundled OpenSSL 3.5 says ssl/tls
    assert CRL_EXPIRED_ALERT in proc.stderr, proc.stderr
    with pytest.raises(psycopg.OperationalError, match=CRL_EXPIRED_ALERT_NEW):
        _cert_login(stale_server, stale_server.warn)


def test_json_client_certificates_crls_and_sessions(stale_server: Lab) -> None:
    lab = stale_server
    proc = pgtls(lab, "--format", "json")
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)
    (target,) = doc["targets"]
    assert target["status"] == "ok" and target["error"] is None, target
    clients = {c["os_user"]: c for c in doc["client_certificates"]}
    warn, fine = clients[lab.warn.os_user], clients[lab.fine.os_user]
    assert (warn["status"], warn["reasons"], warn["days_left"]) == (
        "warning", ["expires-soon"], 10,
    )  # fmt: skip
    assert warn["serial"] == str(lab.warn.cert.serial_number) and warn["key_matches"] is True
    assert warn["issuer"] == lab.ca.signer.subject.rfc4514_string()
    assert warn["kind"] == "client-certificate" and warn["path"] == str(lab.warn.crt)
    assert (fine["status"], fine["reasons"], fine["days_left"]) == ("ok", [], 396)
    crls = doc["crls"]
    assert [(c["source"], c["status"], c["reasons"]) for c in crls] == [
        (str(lab.stale_crl), "critical", ["crl-expired"]),
        (str(lab.fresh_crl), "ok", []),
        (f"127.0.0.1:{lab.cluster.port} ssl_crl_file", "critical", ["crl-expired"]),
        (f"127.0.0.1:{lab.cluster.port} ssl_crl_dir", "critical", ["crl-expired"]),
    ]
    assert crls[3]["path"] == f"crl.d/{_crl_hash(lab.stale_crl)}.r0"
    assert crls[0]["days_left"] == -1 and crls[1]["days_left"] == 6
    assert crls[2]["target"] == f"127.0.0.1:{lab.cluster.port}" and crls[2]["path"] == "client.crl"
    assert CRL_EXPIRED_ALERT in crls[0]["details"][0]
    sessions = target["sessions"]
    assert (sessions["tls"], sessions["error"]) == (2, None), sessions
    assert sessions["by_issuer"] == [
        {
            "issuer_dn": stat_ssl_dn(lab.ca.signer.subject),
            "client_cert_sessions": 2,
            "known": 2,
            "fewest_days_left": 10,
        }
    ]
    assert doc["summary"] == {"ok": 3, "warning": 1, "critical": 3, "unknown": 0}


def test_prometheus_metrics_of_their_own(stale_server: Lab) -> None:
    lab = stale_server
    proc = pgtls(lab, "--format", "prometheus")
    assert proc.returncode == 1, proc.stderr
    fam = {f.name: f for f in text_string_to_metric_families(proc.stdout)}
    status = {s.labels["os_user"]: s.value for s in fam["pgtls_client_cert_status"].samples}
    assert status == {lab.warn.os_user: 1, lab.fine.os_user: 0}
    (expiry,) = [
        s for s in fam["pgtls_client_cert_not_after_timestamp_seconds"].samples
        if s.labels["os_user"] == lab.warn.os_user
    ]  # fmt: skip
    assert expiry.value == int(lab.warn.cert.not_valid_after_utc.timestamp())
    assert expiry.labels["serial"] == str(lab.warn.cert.serial_number)
    assert {s.value for s in fam["pgtls_client_cert_key_matches"].samples} == {1}
    reasons = {
        (s.labels["os_user"], s.labels["reason"]) for s in fam["pgtls_client_cert_reason"].samples
    }
    assert reasons == {(lab.warn.os_user, "expires-soon")}
    crl = {s.labels["source"]: s.value for s in fam["pgtls_crl_status"].samples}
    target = f"127.0.0.1:{lab.cluster.port}"
    assert crl == {
        str(lab.stale_crl): 2,
        str(lab.fresh_crl): 0,
        f"{target} ssl_crl_file": 2,
        f"{target} ssl_crl_dir": 2,
    }
    assert len(fam["pgtls_crl_next_update_timestamp_seconds"].samples) == 4
    (known,) = fam["pgtls_sessions_client_cert_min_days_left"].samples
    assert known.value == 10 and known.labels["target"] == target
    assert [s.value for s in fam["pgtls_sessions_client_cert"].samples] == [2]
    transport = {s.labels["transport"]: s.value for s in fam["pgtls_sessions"].samples}
    assert transport["tls"] == 2


def test_nagios_worst_state_wins_and_says_each_thing_once(stale_server: Lab) -> None:
    lab = stale_server
    proc = pgtls(lab, "--format", "nagios")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    first, *long = proc.stdout.splitlines()
    text, perf = first.split(" | ")
    assert text.startswith("PGTLS CRITICAL - 127.0.0.1:")
    # the same stale CRL, from --crl, ssl_crl_file and ssl_crl_dir, is said once
    assert text.count("CRL of IntermediateCA_FOO crl-expired") == 1, text
    assert f"client {lab.warn.os_user} expires-soon (10 days left)" in text
    assert "1 client certificate ok (fewest 396 days left)" in text and "1 CRL ok" in text
    assert f"days_client_{lab.warn.os_user}=10;30;7;;" in perf
    assert "days_crl1=-1;;0;;" in perf and "sessions_client_cert=2;;;0;" in perf
    assert any(line.startswith("crl ") and CRL_EXPIRED_ALERT in line for line in long)
    assert re.search(r"sessions: 2 sessions over TLS \(2 with a client certificate\)", proc.stdout)


def test_table_rows_of_their_own(stale_server: Lab) -> None:
    lab = stale_server
    proc = pgtls(lab)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(
        re.match(rf"client-certificate\s+warning\s+{lab.warn.os_user}\s+10\s", ln) for ln in lines
    )
    assert any(
        re.match(rf"crl\s+critical\s+{re.escape(str(lab.stale_crl))}\s+-1\s", ln) for ln in lines
    )
    issuer = re.escape(stat_ssl_dn(lab.ca.signer.subject))
    assert any(re.match(rf"127\.0\.0\.1:\d+\s+{issuer}\s+2\s+2\s+10$", ln) for ln in lines)
    assert "3 ok, 1 warning, 3 critical, 0 unknown" in lines, proc.stdout


def test_only_client_users_need_no_target(lab: Lab) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pgtls_helpers", "watch", "--client-user", lab.fine.os_user,
         "--format", "nagios"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("PGTLS OK - 1 client certificate ok (fewest 396 days left)")


def test_a_link_to_a_root_only_file_is_not_followed(lab: Lab, tmp_path: Path) -> None:
    secret_cert = lab.ca.sign_client_csr(
        build_client_csr(client_subject("root-only-secret"), generate_key("ecdsa-p256"))
    )
    secret = tmp_path / "secret.crt"
    secret.write_bytes(pem_of(secret_cert))
    secret.chmod(0o600)
    name = f"pgtls_wl{TAG}"
    home = _useradd(name)
    try:
        entry = pwd.getpwnam(name)
        directory = home / ".postgresql"
        directory.mkdir(mode=0o700)
        os.chown(directory, entry.pw_uid, entry.pw_gid)
        (directory / "postgresql.crt").symlink_to(secret)  # planted by the user
        os.lchown(directory / "postgresql.crt", entry.pw_uid, entry.pw_gid)
        rows, known = check_client_users(
            resolve_watch_users([name]), warn_days=30, crit_days=15, now=_dt.datetime.now(_dt.UTC)
        )
        (row,) = rows
        assert (row.status, row.reasons) == ("unknown", ("unreadable",)), row
        assert known == () and row.subject is None
        assert "root-only-secret" not in json.dumps(row.as_json())
    finally:
        subprocess.run(["userdel", "--remove", name], check=False, capture_output=True)


def test_an_unknown_client_user_is_unusable_input() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pgtls_helpers", "watch", "--client-user", "no_such_user_pgtls"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 2 and "--client-user: there is no OS user" in proc.stderr


def test_a_key_that_is_not_the_certificates_and_readable_by_others(lab: Lab) -> None:
    name = f"pgtls_wk{TAG}"
    home = _useradd(name)
    try:
        client = _give_client_files(lab.ca, name, home, days=397)
        entry = pwd.getpwnam(name)
        other = serialize_key(generate_key("ecdsa-p256"))
        write_client_file(client.key, other, mode=0o644, uid=entry.pw_uid, gid=entry.pw_gid)
        (row,), known = check_client_users(
            resolve_watch_users([name]), warn_days=30, crit_days=15, now=_dt.datetime.now(_dt.UTC)
        )
        assert row.status == "critical" and row.key_matches is False
        assert row.reasons == ("key-readable-by-others", "key-mismatch"), row.details
        assert "0644" in row.details[0] and known == (client.cert,)
        (client.crt.parent / "postgresql.crt").unlink()
        (row,), _ = check_client_users(
            resolve_watch_users([name]), warn_days=30, crit_days=15, now=_dt.datetime.now(_dt.UTC)
        )
        assert (row.status, row.reasons) == ("critical", ("no-certificate",))
    finally:
        subprocess.run(["userdel", "--remove", name], check=False, capture_output=True)


def test_sessions_by_a_role_that_sees_only_its_own_are_said_not_counted(
    stale_server: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    lab = stale_server
    role = f"pgtls_watcher{TAG}"
    _sql(lab.cluster, f"CREATE ROLE {role} LOGIN PASSWORD 'watch-only'")
    monkeypatch.setenv("PGPASSWORD", "watch-only")
    opts = WatchOptions(
        roots=load_roots(lab.root_file), root_path=str(lab.root_file), sessions=True, user=role
    )
    (result,) = watch([Target("127.0.0.1", lab.cluster.port)], opts)
    assert result.sessions is not None and result.sessions.by_issuer == ()
    assert result.sessions.error and "grant it pg_read_all_stats" in result.sessions.error
    assert result.error and "--sessions" in result.error
    monkeypatch.delenv("PGPASSWORD")  # libpq prefers it to the superuser's passfile
    _sql(lab.cluster, f"GRANT pg_read_all_stats TO {role}")
    monkeypatch.setenv("PGPASSWORD", "watch-only")
    (result,) = watch([Target("127.0.0.1", lab.cluster.port)], opts)
    assert result.sessions is not None and result.sessions.error is None
    assert [g.client_cert_sessions for g in result.sessions.by_issuer] == [2]
    assert [g.known for g in result.sessions.by_issuer] == [0]  # no --client-user given


def test_the_watch_notebook_shows_client_certificates_crls_and_sessions(
    stale_server: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """notebooks/watch.ipynb, headless, with the same client users, CRLs and sessions."""
    import papermill

    from pgtls_helpers.runbook.runner import kernel_name

    lab = stale_server
    monkeypatch.setenv("PGPASSFILE", str(lab.cluster.passfile))
    nb = papermill.execute_notebook(
        str(REPO / "notebooks" / "watch.ipynb"),
        str(tmp_path / "watch.ipynb"),
        parameters={
            "targets": [f"127.0.0.1:{lab.cluster.port}"],
            "root": str(lab.root_file),
            "crit_days": 7,
            "client_users": [lab.warn.os_user, lab.fine.os_user],
            "crl_files": [str(lab.stale_crl), str(lab.fresh_crl)],
            "sessions": True,
            "login_user": "postgres",
        },
        kernel_name=kernel_name(),
        progress_bar=False,
        log_output=False,
        start_timeout=60,
    )
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    html = [str(o.get("data", {}).get("text/html", "")) for o in outputs]
    clients = next(h for h in html if "client certificate" in h and "<table" in h)
    # the client about to expire first, both users, both CRL files (the stale one critical)
    assert clients.index(lab.warn.os_user) < clients.index(lab.fine.os_user)
    assert str(lab.stale_crl) in clients and str(lab.fresh_crl) in clients
    assert "crl-expired" in clients
    sessions = next(h for h in html if "client_cert_sessions" in h)
    issuer = stat_ssl_dn(lab.ca.signer.subject)
    cell = "<td[^>]*>"
    row = re.search(rf"{cell}{re.escape(issuer)}</td>{cell}(\d+)</td>{cell}(\d+)</td>", sessions)
    assert row and row.groups() == ("2", "2"), sessions
    reasons = next(h for h in html if "needs" in h or "<ul>" in h)
    assert "crl-expired" in reasons and lab.warn.os_user in reasons
