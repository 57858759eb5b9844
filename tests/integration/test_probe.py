"""``probe`` against real servers: a lab cluster serving a lab CA chain, a cluster with SSL off,
nothing listening, and small listeners that are not PostgreSQL; cross-checked with
``openssl s_client -starttls postgres``."""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID
from support import skip_or_fail

from pgtls_helpers.errors import InputError, PgtlsError
from pgtls_helpers.lab import LabCA, LabCluster, free_port
from pgtls_helpers.postgres.probe import ProbeResult, chain_rows, probe, probe_many

REPO = Path(__file__).resolve().parents[2]
PrivateKey = ec.EllipticCurvePrivateKey
JSON_KEYS = [
    "host", "port", "tls_version", "cipher", "not_after", "days_left", "names", "chain", "error",
]  # fmt: skip


def sha256(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def assert_presents(result: ProbeResult, served: list[x509.Certificate]) -> None:
    """The probe saw exactly ``served``, in the order it was served."""
    assert result.error is None, result.error
    assert [sha256(c) for c in result.chain] == [sha256(c) for c in served]
    assert result.tls_version is not None and result.tls_version.startswith("TLSv1")
    assert result.cipher


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgtls_helpers", "probe", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def _started(cluster_factory: Callable[[], LabCluster]) -> LabCluster:
    try:
        cluster = cluster_factory()
    except PgtlsError as exc:
        skip_or_fail(str(exc))
        raise
    cluster.start()
    return cluster


@pytest.fixture(scope="module")
def ssl_server(lab_ca: LabCA) -> Iterator[tuple[LabCluster, list[x509.Certificate]]]:
    """A cluster serving an ECDSA leaf for localhost + IntermediateCA_FOO + IntermediateCA_BAR."""
    cluster = _started(LabCluster.create)
    key, leaf = lab_ca.issue(["localhost", "127.0.0.1"])
    served = [leaf, *lab_ca.intermediates]
    cluster.serve_certificate(key, served)
    yield cluster, served
    cluster.remove()


# --- small listeners that are not PostgreSQL ----------------------------------------------


@contextmanager
def listener(
    answer: Callable[[socket.socket], None], *, family: socket.AddressFamily = socket.AF_INET
) -> Iterator[int]:
    """Accept connections on a free local port and hand each to ``answer``; yields the port."""
    server = socket.socket(family, socket.SOCK_STREAM)
    server.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.05)
    port = server.getsockname()[1]
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            try:
                answer(conn)
            except OSError:
                pass

    def loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        stop.set()
        thread.join(timeout=5)
        server.close()


def http_server(conn: socket.socket) -> None:
    conn.recv(64)
    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")


def hang_up(conn: socket.socket) -> None:
    conn.recv(64)


def silent(conn: socket.socket) -> None:
    conn.recv(64)
    conn.recv(64)  # waits for the client to give up


def ssl_off(conn: socket.socket) -> None:
    assert conn.recv(8) == bytes.fromhex("0000000804d2162f")
    conn.sendall(b"N")


def fork_failure(conn: socket.socket) -> None:
    conn.recv(8)
    fields = b"SFATAL\0C53300\0Msorry, too many clients already\0\0"
    conn.sendall(b"E" + (len(fields) + 4).to_bytes(4, "big") + fields)


def s_then_garbage(conn: socket.socket) -> None:
    conn.recv(8)
    conn.sendall(b"S")
    conn.recv(1024)
    conn.sendall(b"this is not TLS\r\n" * 4)


def write_tls_files(
    directory: Path, key: PrivateKey, chain: list[x509.Certificate]
) -> tuple[Path, Path]:
    key_path, chain_path = directory / "server.key", directory / "server.crt"
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    chain_path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain))
    return key_path, chain_path


@pytest.fixture(scope="module")
def tls_files(lab_ca: LabCA, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Key and chain files for a tiny TLS server (localhost leaf + both intermediates)."""
    key, leaf = lab_ca.issue(["localhost"])
    return write_tls_files(tmp_path_factory.mktemp("tls"), key, [leaf, *lab_ca.intermediates])


def tls_server(
    key_path: Path, chain_path: Path, names: list[str | None]
) -> Callable[[socket.socket], None]:
    """Answers 'S', completes a TLS handshake and records the SNI name the client sent."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(chain_path, key_path)
    ctx.sni_callback = lambda _sock, name, _ctx: names.append(name)  # type: ignore[assignment]

    def answer(conn: socket.socket) -> None:
        conn.recv(8)
        conn.sendall(b"S")
        with ctx.wrap_socket(conn, server_side=True) as tls:
            try:
                tls.recv(1)
            except (OSError, ssl.SSLError):
                pass

    return answer


# --- the presented chain ------------------------------------------------------------------


def test_probe_shows_the_served_chain_in_order(ssl_server) -> None:
    cluster, served = ssl_server
    result = probe(cluster.host, cluster.port)
    assert_presents(result, served)
    assert (result.host, result.port) == (cluster.host, cluster.port)
    assert result.chain[0].subject.rfc4514_string() == "CN=localhost"


def test_chain_rows_name_each_presented_certificate(ssl_server) -> None:
    cluster, served = ssl_server
    rows = chain_rows(probe(cluster.host, cluster.port))
    assert rows == [
        {
            "sha256": sha256(c),
            "subject": c.subject.rfc4514_string(),
            "issuer": c.issuer.rfc4514_string(),
        }
        for c in served
    ]
    assert [r["subject"].split(",")[0] for r in rows] == [
        "CN=localhost",
        "CN=IntermediateCA_FOO",
        "CN=IntermediateCA_BAR",
    ]


def test_probe_agrees_with_openssl_s_client(ssl_server) -> None:
    cluster, served = ssl_server
    proc = subprocess.run(
        [
            "openssl",
            "s_client",
            "-starttls",
            "postgres",
            "-connect",
            f"{cluster.host}:{cluster.port}",
            "-showcerts",
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )
    pems = re.findall(
        r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", proc.stdout, flags=re.S
    )
    theirs = [sha256(x509.load_pem_x509_certificate(p.encode())) for p in pems]
    ours = probe(cluster.host, cluster.port)
    assert len(theirs) == len(served) == 3
    assert [sha256(c) for c in ours.chain] == theirs
    session = re.search(r"^New, (TLSv[\d.]+), Cipher is (\S+)", proc.stdout, flags=re.M)
    assert session is not None, proc.stdout
    assert (ours.tls_version, ours.cipher) == session.groups()


def test_probe_of_an_rsa_leaf(fresh_cluster: LabCluster, lab_ca: LabCA) -> None:
    key, leaf = lab_ca.issue(["localhost"], key_type="rsa2048")
    fresh_cluster.serve_certificate(key, [leaf, lab_ca.intermediates[0]])
    result = probe(fresh_cluster.host, fresh_cluster.port)
    assert_presents(result, [leaf, lab_ca.intermediates[0]])


def test_probing_leaves_nothing_in_the_server_log(ssl_server) -> None:
    cluster, _ = ssl_server
    before = cluster.log_size()
    results = probe_many([(cluster.host, cluster.port)] * 12, timeout=5)
    assert all(r.ok for r in results)
    with open(cluster.log_path, "rb") as fh:
        fh.seek(before)
        assert fh.read().decode(errors="replace").strip() == ""


def test_sni_is_the_host_name_and_absent_for_an_address(tls_files) -> None:
    names: list[str | None] = []
    with listener(tls_server(*tls_files, names)) as port:
        by_name = probe("localhost", port)
        by_address = probe("127.0.0.1", port)
    assert by_name.ok and by_address.ok, (by_name.error, by_address.error)
    assert names == ["localhost", None]
    assert len(by_name.chain) == 3


def test_ipv6_literal(tls_files) -> None:
    names: list[str | None] = []
    with listener(tls_server(*tls_files, names), family=socket.AF_INET6) as port:
        [result] = probe_many([f"[::1]:{port}"])
    assert result.ok, result.error
    assert (result.host, result.port, result.target) == ("::1", port, f"[::1]:{port}")
    assert names == [None]


# --- servers that do not give a chain -----------------------------------------------------


def test_ssl_off_through_the_cli(lab_cluster: LabCluster) -> None:
    target = f"127.0.0.1:{lab_cluster.port}"
    proc = run_cli(target)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr == f"pgtls: {target}: the server refused SSL (ssl = off?)\n"


def test_ssl_off_as_json(lab_cluster: LabCluster) -> None:
    target = f"127.0.0.1:{lab_cluster.port}"
    proc = run_cli("--json", target)
    assert proc.returncode == 1
    assert proc.stderr == ""
    assert json.loads(proc.stdout) == {
        "host": "127.0.0.1",
        "port": lab_cluster.port,
        "tls_version": None,
        "cipher": None,
        "not_after": None,
        "days_left": None,
        "names": [],
        "chain": [],
        "error": f"{target}: the server refused SSL (ssl = off?)",
    }


def test_nothing_listening() -> None:
    port = free_port()
    result = probe("127.0.0.1", port, timeout=2)
    assert result.error == (
        f"127.0.0.1:{port}: connection refused; is PostgreSQL listening on "
        "this address and port (listen_addresses, port)?"
    )
    assert result.chain == () and result.tls_version is None
    proc = run_cli(f"127.0.0.1:{port}")
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "connection refused" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (http_server, "answered the SSLRequest with b'H', not 'S' or 'N'; is this a PostgreSQL"),
        (hang_up, "closed the connection without answering the SSLRequest; is this a PostgreSQL"),
        (silent, "no answer to the SSLRequest within 0.5 s; is this a PostgreSQL server?"),
        (ssl_off, "the server refused SSL (ssl = off?)"),
        (fork_failure, "answered the SSLRequest with an error: sorry, too many clients already"),
        (s_then_garbage, "the TLS handshake failed ("),
    ],
)
def test_not_a_tls_postgresql_server(
    answer: Callable[[socket.socket], None], expected: str
) -> None:
    with listener(answer) as port:
        result = probe("127.0.0.1", port, timeout=0.5)
        proc = run_cli("--timeout", "0.5", f"127.0.0.1:{port}")
    assert result.error is not None and result.error.startswith(f"127.0.0.1:{port}: ")
    assert expected in result.error
    assert "\n" not in result.error
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr == f"pgtls: {result.error}\n"


def test_unresolvable_host() -> None:
    result = probe("no-such-host.invalid", 5432, timeout=2)
    assert result.error is not None
    assert result.error.startswith("no-such-host.invalid:5432: cannot resolve the host name")


# --- several targets and the JSON contract ------------------------------------------------


def test_results_come_back_in_the_order_given(ssl_server, lab_cluster: LabCluster) -> None:
    cluster, served = ssl_server
    good = f"127.0.0.1:{cluster.port}"
    with listener(silent) as slow, listener(http_server) as http:
        refused = free_port()
        targets = [
            f"127.0.0.1:{slow}",
            good,
            f"127.0.0.1:{refused}",
            f"localhost:{lab_cluster.port}",
            good,
            f"127.0.0.1:{http}",
        ]
        results = probe_many(targets, timeout=1.0)
        proc = run_cli("--json", "--timeout", "1", *targets)
    assert [r.target for r in results] == targets
    assert [r.ok for r in results] == [False, True, False, False, True, False]
    assert "no answer" in str(results[0].error)
    assert "refused SSL" in str(results[3].error)
    assert_presents(results[4], served)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 1
    assert [f"{o['host']}:{o['port']}" for o in map(json.loads, lines)] == targets
    assert [json.loads(line)["error"] for line in lines] == [r.error for r in results]


def test_json_shape(ssl_server) -> None:
    cluster, served = ssl_server
    target = f"{cluster.host}:{cluster.port}"
    proc = run_cli("--json", target, f"localhost:{cluster.port}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    lines = proc.stdout.splitlines()
    assert len(lines) == 2
    expected = chain_rows(probe(cluster.host, cluster.port))
    for line, host in zip(lines, (cluster.host, "localhost"), strict=True):
        obj = json.loads(line)
        assert list(obj) == JSON_KEYS
        assert (obj["host"], obj["port"], obj["error"]) == (host, cluster.port, None)
        assert obj["tls_version"].startswith("TLSv1") and obj["cipher"]
        assert [list(row) for row in obj["chain"]] == [["sha256", "subject", "issuer"]] * 3
        assert obj["chain"] == expected
        assert [row["sha256"] for row in obj["chain"]] == [sha256(c) for c in served]
        end = served[0].not_valid_after_utc
        assert obj["not_after"] == end.strftime("%Y-%m-%dT%H:%M:%SZ")
        assert obj["days_left"] == (end - datetime.now(timezone.utc)).days
        assert obj["names"] == ["DNS:localhost", "IP:127.0.0.1"]


def test_json_rows_for_names_beyond_ascii(lab_ca: LabCA, tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    odd = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "CH"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, 'Zürich Ärzte, "AG"'),
            x509.NameAttribute(
                NameOID.ORGANIZATIONAL_UNIT_NAME, "caf\xe9", _type=_ASN1Type.T61String
            ),
            x509.NameAttribute(NameOID.COMMON_NAME, "localhost"),
        ]
    )
    now = datetime.now(timezone.utc)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(odd)
        .issuer_name(odd)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    served = [leaf, lab_ca.intermediates[0]]
    with listener(tls_server(*write_tls_files(tmp_path, key, served), [])) as port:
        proc = run_cli("--json", f"127.0.0.1:{port}")
        result = probe("127.0.0.1", port)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["chain"] == chain_rows(result)
    assert chain_rows(result)[0]["subject"] == leaf.subject.rfc4514_string()
    assert "Zürich" in chain_rows(result)[0]["subject"]


def test_readable_output(ssl_server) -> None:
    cluster, served = ssl_server
    proc = run_cli(f"127.0.0.1:{cluster.port}", f"127.0.0.1:{cluster.port}")
    assert proc.returncode == 0, proc.stderr
    blocks = proc.stdout.split("\n\n")
    assert len(blocks) == 2
    assert blocks[0] + "\n" == blocks[1]
    head, until, names, *body = blocks[0].splitlines()
    assert len(body) == 3 * 3
    assert head.startswith(f"127.0.0.1:{cluster.port}  TLSv1")
    assert head.endswith("3 certificates presented")
    end = served[0].not_valid_after_utc
    days = (end - datetime.now(timezone.utc)).days
    assert until == f"  not after  {end:%Y-%m-%dT%H:%M:%SZ} ({days} days left)"
    assert names == "  names      DNS:localhost, IP:127.0.0.1"
    assert sha256(served[0]) in body[2] and "CN=localhost" in body[0]


def test_an_email_address_prints_by_name(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "localhost"),
            x509.NameAttribute(NameOID.EMAIL_ADDRESS, "dba@example.com"),
        ]
    )
    now = datetime.now(timezone.utc)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    with listener(tls_server(*write_tls_files(tmp_path, key, [leaf]), [])) as port:
        text = run_cli(f"127.0.0.1:{port}")
        js = run_cli("--json", f"127.0.0.1:{port}")
    assert text.returncode == 0, text.stderr
    assert "  0  subject  emailAddress=dba@example.com,CN=localhost" in text.stdout.splitlines()
    assert "  names      (no subjectAltName)" in text.stdout.splitlines()
    row = json.loads(js.stdout)["chain"][0]
    assert row["subject"] == row["issuer"] == "emailAddress=dba@example.com,CN=localhost"


def test_bad_target_is_unusable_input() -> None:
    proc = run_cli("db1:http")
    assert proc.returncode == 2
    assert proc.stderr.startswith("pgtls: 'db1:http': the port must be a number")
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    with pytest.raises(InputError):
        probe_many(["db1:"])
