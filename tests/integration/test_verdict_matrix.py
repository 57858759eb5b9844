"""The verdicts against the real thing: every chain shape served by a real PostgreSQL server
and judged by ``psql sslmode=verify-full``; ``chain inspect``'s readiness (step 2's verdict)
and ``pgtls watch``'s ``verified`` / status must be what libpq did, and a pair the server
refuses to load must be predicted.

The shapes: each optional extension absent in turn, keyUsage and extendedKeyUsage variants,
basicConstraints and path length variants, unknown critical and non-critical extensions, name
constraints, validity windows, weak keys and signatures, a CN-only leaf, a missing
intermediate. On PostgreSQL 17 (a build with its own OpenSSL) the verdicts follow that build's
libpq (``PGTLS_LIBPQ``), as they would for a client that uses it.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from certfactory import CLIENT_AUTH, SERVER_AUTH, Chain, Issued, issue, make_ca, pem
from cryptography import x509
from cryptography.x509.oid import ObjectIdentifier

from pgtls_helpers.lab import LabCluster
from pgtls_helpers.pki.chain import order_chain
from pgtls_helpers.pki.findings import check_chain, has_errors
from pgtls_helpers.pki.posture import Target, WatchOptions
from pgtls_helpers.postgres.watch import watch

HOST = "127.0.0.1"
SANS = ("db1.example.com", HOST)
UNKNOWN = ObjectIdentifier("1.3.6.1.4.1.55555.1")


def _chain(
    *,
    root: dict[str, object] | None = None,
    inter: dict[str, object] | None = None,
    leaf: dict[str, object] | None = None,
    key_type: str = "ecdsa-p256",
    two_intermediates: dict[str, object] | None = None,
) -> Chain:
    r = make_ca("Matrix Root", key_type=key_type, **(root or {}))
    inter = dict(inter or {})
    if inter.pop("is_ca", True):
        i = make_ca("Matrix Intermediate", issuer=r, key_type=key_type, **inter)
    else:  # basicConstraints CA:FALSE, signing all the same
        i = issue("Matrix Intermediate", issuer=r, key_type=key_type, days=3650, **inter)  # type: ignore[arg-type]
    inters: tuple[Issued, ...] = (i,)
    if two_intermediates is not None:
        i2 = make_ca("Matrix Issuing CA", issuer=i, key_type=key_type, **two_intermediates)
        inters = (i, i2)
    values: dict[str, object] = {"sans": SANS, "eku": [SERVER_AUTH], "key_type": key_type}
    values.update(leaf or {})
    cert = issue("db1.example.com", issuer=inters[-1], **values)  # type: ignore[arg-type]
    return Chain(root=r, intermediates=inters, leaf=cert)


def _ku(**on: bool) -> x509.KeyUsage:
    names = (
        "digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
        "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only",
    )  # fmt: skip
    return x509.KeyUsage(**{n: on.get(n, False) for n in names})


def _constraints(permitted: str) -> tuple[x509.NameConstraints, bool]:
    return (
        x509.NameConstraints(
            permitted_subtrees=[
                x509.DNSName(permitted),
                x509.IPAddress(ipaddress.ip_network("127.0.0.0/8")),
            ],
            excluded_subtrees=None,
        ),
        True,
    )


NOW = _dt.datetime.now(_dt.UTC).replace(microsecond=0)
SHAPES: dict[str, Callable[[], Chain]] = {
    "baseline": lambda: _chain(),
    "root-without-keyusage (openssl req -x509 default)": lambda: _chain(root={"key_usage": False}),
    "no-key-identifiers-anywhere": lambda: _chain(
        root={"ski": False, "aki": False},
        inter={"ski": False, "aki": False},
        leaf={"ski": False, "aki": False},
    ),
    "leaf-without-aki": lambda: _chain(leaf={"aki": False}),
    "leaf-san-only": lambda: _chain(
        leaf={"key_usage": False, "eku": None, "ski": False, "aki": False}
    ),
    "leaf-without-basic-constraints": lambda: _chain(leaf={"basic_constraints": False}),
    "leaf-eku-client-only": lambda: _chain(leaf={"eku": [CLIENT_AUTH]}),
    "leaf-eku-server-and-client": lambda: _chain(leaf={"eku": [SERVER_AUTH, CLIENT_AUTH]}),
    "leaf-keyusage-certsign-only": lambda: _chain(
        leaf={"key_usage": False, "extra_extensions": [(_ku(key_cert_sign=True), True)]}
    ),
    "intermediate-ca-false": lambda: _chain(
        inter={
            "is_ca": False,
            "key_usage": False,
            "extra_extensions": [(_ku(key_cert_sign=True), True)],
        }
    ),
    "intermediate-without-basic-constraints": lambda: _chain(inter={"basic_constraints": False}),
    "intermediate-keyusage-without-certsign": lambda: _chain(
        inter={"key_usage": False, "extra_extensions": [(_ku(crl_sign=True), True)]}
    ),
    "intermediate-without-keyusage": lambda: _chain(inter={"key_usage": False}),
    "intermediate-pathlen-0-exceeded": lambda: _chain(
        inter={"path_length": 0}, two_intermediates={}
    ),
    "root-pathlen-0-exceeded": lambda: _chain(root={"path_length": 0}),
    "intermediate-pathlen-1-ok": lambda: _chain(inter={"path_length": 1}, two_intermediates={}),
    "leaf-unknown-critical-extension": lambda: _chain(
        leaf={"extra_extensions": [(x509.UnrecognizedExtension(UNKNOWN, b"\x05\x00"), True)]}
    ),
    "leaf-unknown-noncritical-extension": lambda: _chain(
        leaf={"extra_extensions": [(x509.UnrecognizedExtension(UNKNOWN, b"\x05\x00"), False)]}
    ),
    "name-constraints-permit": lambda: _chain(
        inter={"extra_extensions": [_constraints("example.com")]}
    ),
    "name-constraints-exclude-the-leaf": lambda: _chain(
        inter={"extra_extensions": [_constraints("example.org")]}
    ),
    "leaf-expired": lambda: _chain(leaf={"expired": True}),
    "leaf-not-yet-valid": lambda: _chain(leaf={"not_yet_valid": True}),
    "intermediate-expired": lambda: _chain(inter={"expired": True}),
    "rsa-2048": lambda: _chain(key_type="rsa2048"),
    "ecdsa-p384": lambda: _chain(key_type="ecdsa-p384"),
    "leaf-rsa-1024": lambda: _chain(key_type="rsa2048", leaf={"key_type": "rsa1024"}),
    "leaf-signed-sha1": lambda: _chain(key_type="rsa2048", leaf={"hash_name": "sha1"}),
    "intermediate-signed-sha1": lambda: _chain(key_type="rsa2048", inter={"hash_name": "sha1"}),
    "cn-only-leaf": lambda: _chain(leaf={"sans": None}),
    "wrong-host": lambda: _chain(leaf={"sans": ("other.example.com",)}),
}
MISSING_INTERMEDIATE = "missing-intermediate (leaf served alone)"
# shapes libpq takes that cryptography's stricter RFC 5280 profile refuses
STRICTER = ("root-without-keyusage (openssl req -x509 default)", "no-key-identifiers-anywhere")


@dataclass
class Row:
    shape: str
    psql: str  # "ok", or libpq's message; "server refused" when it would not load the pair
    ready: bool
    load_predicted: bool
    verified: bool | None
    status: str | None

    @property
    def agrees(self) -> bool:
        connected = self.psql == "ok"
        if self.psql == "server refused":
            return self.load_predicted and not self.ready
        # watch: a chain libpq takes is verified and never critical (a posture warning such
        # as plaintext-accepted may stand); one it refuses is critical
        watched = bool(self.verified) and self.status in ("ok", "warning")
        return self.ready == connected and watched == connected


def _psql(bindir: Path, cluster: LabCluster, root_file: Path) -> str:
    conninfo = (
        f"host={HOST} port={cluster.port} dbname=postgres user={cluster.superuser} "
        f"sslmode=verify-full sslrootcert={root_file} connect_timeout=5"
    )
    proc = subprocess.run(
        [str(bindir / "psql"), conninfo, "-XAtc", "select 1"],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
        env={**os.environ, "PGPASSFILE": str(cluster.passfile)},
    )
    if proc.returncode == 0:
        return "ok"
    said = " ".join(proc.stderr.split())
    return said.split(" failed: ", 1)[-1] or "refused"


@pytest.fixture
def libpq_of(pg_bindir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The verdicts follow the libpq this major's psql uses."""
    out = subprocess.run(
        ["ldd", str(pg_bindir / "psql")], capture_output=True, text=True, check=False
    ).stdout
    for line in out.splitlines():
        if "libpq.so" in line and "=>" in line:
            monkeypatch.setenv("PGTLS_LIBPQ", line.split("=>")[1].split()[0])
    yield


def test_every_chain_shape_gets_the_verdict_libpq_gives(
    pg_bindir: Path, fresh_cluster: LabCluster, libpq_of: None, tmp_path: Path
) -> None:
    rows: list[Row] = []
    shapes = [*SHAPES.items(), (MISSING_INTERMEDIATE, lambda: _chain())]
    good = _chain()
    for shape, build in shapes:
        chain = build()
        served = [chain.leaf.cert, *(i.cert for i in reversed(chain.intermediates))]
        if shape == MISSING_INTERMEDIATE:
            served = served[:1]
        root_file = tmp_path / "root.crt"
        root_file.write_bytes(pem(chain.root))
        # step 2 / chain inspect: the CA's files as a DBA would pass them (the root included)
        result = order_chain([*served, chain.root.cert])
        findings = check_chain(result, key=chain.leaf.key, hosts=[HOST])
        ready = not has_errors(findings)
        if shape in STRICTER:  # libpq takes it; the RFC 5280 profile is a warning, said so
            assert ready and "strict-profile" in {f.code for f in findings}, findings
        load_predicted = any(f.code in ("server-cannot-load", "weak-key", "weak-signature")
                             and f.is_error for f in findings)  # fmt: skip
        try:
            fresh_cluster.serve_certificate(chain.leaf.key, served)
        except Exception:  # the server would not start with the pair
            rows.append(Row(shape, "server refused", ready, load_predicted, None, None))
            good_chain = [good.leaf.cert, good.intermediates[0].cert]
            fresh_cluster.serve_certificate(good.leaf.key, good_chain, restart=False)
            fresh_cluster.start()
            continue
        psql = _psql(pg_bindir, fresh_cluster, root_file)
        (watched,) = watch(
            [Target(HOST, fresh_cluster.port)],
            WatchOptions(roots=(chain.root.cert,), timeout=5.0),
        )
        rows.append(Row(shape, psql, ready, load_predicted, watched.verified, watched.status))
    table = "\n".join(
        f"{'agree' if r.agrees else 'DIFFER'}  {r.shape:55} psql={r.psql[:70]!r} ready={r.ready} "
        f"verified={r.verified} status={r.status}"
        for r in rows
    )
    agreeing = sum(r.agrees for r in rows)
    print(f"\n{table}\n{agreeing} of {len(rows)} shapes agree with psql sslmode=verify-full")
    assert agreeing == len(rows), table
    # the matrix is not one-sided: libpq both accepted and refused shapes here
    assert any(r.psql == "ok" for r in rows) and any(r.psql != "ok" for r in rows)
