"""The embedded default itself: the throwaway CA and cluster behave like the real things."""

from __future__ import annotations

import os
import pwd
import subprocess
from pathlib import Path

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pgtls_helpers.errors import PgtlsError
from pgtls_helpers.lab import LabCA, LabCluster, find_bindir
from pgtls_helpers.pki.csr import build_csr
from pgtls_helpers.pki.keys import generate_key
from pgtls_helpers.pki.subject import make_subject


def test_the_ca_signs_a_csr_the_way_the_article_receives_it(lab_ca: LabCA, tmp_path: Path) -> None:
    key = generate_key("ecdsa-p256")
    csr = build_csr(make_subject("db1.example.com", sans=["db1", "10.0.0.5"]), key)
    leaf = lab_ca.sign_csr(csr)
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(v) for v in sans.get_values_for_type(x509.DNSName)] == ["db1.example.com", "db1"]
    assert [str(v) for v in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert leaf.public_key() == key.public_key()

    files = lab_ca.write_response(leaf, tmp_path)
    assert [p.name for p in files] == [
        "db1.example.com.crt",
        "IntermediateCA_FOO.crt",
        "IntermediateCA_BAR.crt",
        "RootCA.crt",
    ]
    # OpenSSL itself accepts the chain: root trusted, intermediates untrusted, leaf for its name
    untrusted = tmp_path / "untrusted.pem"
    untrusted.write_bytes(
        (tmp_path / "IntermediateCA_FOO.crt").read_bytes()
        + (tmp_path / "IntermediateCA_BAR.crt").read_bytes()
    )
    proc = subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(tmp_path / "RootCA.crt"),
            "-untrusted",
            str(untrusted),
            "-purpose",
            "sslserver",
            "-verify_hostname",
            "db1.example.com",
            str(tmp_path / "db1.example.com.crt"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    issuers = [
        c.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        for c in (leaf, *lab_ca.intermediates)
    ]
    assert issuers == ["IntermediateCA_FOO", "IntermediateCA_BAR", "RootCA"]


def test_a_csr_without_sans_gets_its_cn_as_one(lab_ca: LabCA) -> None:
    key = generate_key("ecdsa-p256")
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "db2.example.com")]))
        .sign(key, hashes.SHA256())
    )
    leaf = lab_ca.sign_csr(csr)
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(v) for v in sans.get_values_for_type(x509.DNSName)] == ["db2.example.com"]


def test_an_explicit_bindir_that_is_wrong_is_said_not_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGTLS_PG_BINDIR", str(tmp_path))
    with pytest.raises(PgtlsError, match="PGTLS_PG_BINDIR=.* holds no initdb"):
        find_bindir()


def test_the_cluster_starts_like_a_server_before_the_change(lab_cluster: LabCluster) -> None:
    with psycopg.connect(**lab_cluster.conninfo()) as conn:  # type: ignore[arg-type]
        assert conn.execute("SHOW ssl").fetchone() == ("off",)
        methods = {
            row[0]: row[1]
            for row in conn.execute("SELECT type, auth_method FROM pg_hba_file_rules")
        }
    assert methods == {"local": "peer", "host": "scram-sha-256"}
    # the password is never in the cluster's repr; the passfile is private
    assert lab_cluster.password() not in repr(lab_cluster)
    assert (lab_cluster.passfile.stat().st_mode & 0o777) == 0o600
    pid = int((lab_cluster.pgdata / "postmaster.pid").read_text().split()[0])
    owner = Path(f"/proc/{pid}").stat().st_uid
    if os.geteuid() == 0:  # PostgreSQL refuses root: the lab runs it as the server's user
        assert pwd.getpwuid(owner).pw_name == lab_cluster.os_user != "root"
    else:
        assert owner == os.geteuid()


def test_a_copy_of_a_template_is_a_cluster_of_its_own(pg_bindir: Path) -> None:
    template = LabCluster.create(bindir=pg_bindir)
    copies = [LabCluster.create(template=template) for _ in range(2)]
    try:
        for c in copies:
            c.start()
        for c in copies:
            conf = (c.pgdata / "postgresql.conf").read_text()
            assert conf.count("# pgtls lab cluster") == 1 and f"port = {c.port}\n" in conf
            assert (c.pgdata.stat().st_mode & 0o777) == 0o700
            with psycopg.connect(**c.conninfo()) as conn:  # type: ignore[arg-type]
                row = conn.execute("SELECT setting FROM pg_settings WHERE name = 'port'")
                assert row.fetchone() == (str(c.port),)
        assert copies[0].port != copies[1].port
        # the template stays as it was: never started, its data directory not the copies'
        assert not (template.pgdata / "postmaster.pid").exists()
        with pytest.raises(PgtlsError, match="must not be running"):
            template.start()
            LabCluster.create(template=template)
    finally:
        for c in [*copies, template]:
            c.remove()
