"""CSRs: what goes in, what openssl makes of it, the readable view, and the files on disk."""

from __future__ import annotations

import hashlib
import os
import re
import stat
import subprocess
from pathlib import Path

import certfactory
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import AttributeOID

from pgtls_helpers.errors import InputError
from pgtls_helpers.pki.csr import (
    build_csr,
    csr_pem,
    format_name,
    load_csr,
    render_csr,
    spki_sha256,
)
from pgtls_helpers.pki.keys import generate_key, load_key, public_key_matches
from pgtls_helpers.pki.subject import Subject, make_subject
from pgtls_helpers.postgres.keyfiles import write_key_and_csr

SUBJECT = make_subject(
    "db1.example.com",
    country="US",
    state="Pennsylvania",
    locality="Philadelphia",
    organization="Example Corp",
    organizational_unit="Database Team",
    email="dba@example.com",
    sans=["db1", "10.0.0.5"],
)


def openssl(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["openssl", *args], input=stdin, capture_output=True, check=False, timeout=60
    )


@pytest.mark.parametrize("key_type", ["rsa2048", "ecdsa-p256", "ecdsa-p384"])
def test_build_csr(key_type: str) -> None:
    key = generate_key(key_type)
    csr = build_csr(SUBJECT, key)
    assert csr.is_signature_valid
    assert isinstance(csr.signature_hash_algorithm, hashes.SHA256)
    assert csr.subject == SUBJECT.to_x509_name()
    ext = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert ext.critical is False
    assert ext.value.get_values_for_type(x509.DNSName) == ["db1.example.com", "db1"]
    assert [str(ip) for ip in ext.value.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    assert [a.oid for a in csr.attributes] == [x509.ObjectIdentifier("1.2.840.113549.1.9.14")]
    assert csr.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_build_csr_rechecks_a_hand_made_subject() -> None:
    with pytest.raises(InputError, match="Country"):
        build_csr(Subject("db1.example.com", country="Germany"), generate_key("ecdsa-p256"))


def test_openssl_verifies_and_reads_our_csr(tmp_path: Path) -> None:
    path = tmp_path / "server.csr"
    path.write_bytes(csr_pem(build_csr(SUBJECT, generate_key("rsa2048"))))
    verify = openssl("req", "-in", str(path), "-verify", "-noout")
    assert verify.returncode == 0, verify.stderr
    assert b"verify OK" in verify.stdout + verify.stderr
    text = openssl("req", "-in", str(path), "-noout", "-text").stdout.decode()
    assert (
        "Subject: C = US, ST = Pennsylvania, L = Philadelphia, O = Example Corp, "
        "OU = Database Team, CN = db1.example.com, emailAddress = dba@example.com"
    ) in text
    assert "DNS:db1.example.com, DNS:db1, IP Address:10.0.0.5" in text
    assert "Signature Algorithm: sha256WithRSAEncryption" in text
    assert "Public-Key: (2048 bit)" in text
    assert "challengePassword" not in text


def test_load_csr_formats(tmp_path: Path) -> None:
    csr = build_csr(SUBJECT, generate_key("ecdsa-p256"))
    pem = csr_pem(csr)
    der = csr.public_bytes(serialization.Encoding.DER)
    # openssl req -text writes the text dump before the PEM block: that file must load too.
    path = tmp_path / "server.csr"
    path.write_bytes(pem)
    with_text = openssl("req", "-in", str(path), "-text").stdout
    assert with_text.startswith(b"Certificate Request:")
    for data in (pem, pem.replace(b"\n", b"\r\n"), der, with_text):
        assert load_csr(data, "server.csr") == csr


def test_load_csr_refusals() -> None:
    chain = certfactory.make_chain()
    cases = {
        b"": "server.csr is empty",
        chain.leaf.cert_pem(): "server.csr is a certificate, not a certificate signing request",
        chain.leaf.cert_der(): "server.csr is a certificate, not a certificate signing request",
        chain.leaf.key_pem(): "server.csr is a private key, not a certificate signing request",
        b"<html><body>Session expired</body></html>": "looks like an HTML page",
        b"hello": "is not a PEM or DER certificate signing request",
    }
    for data, message in cases.items():
        with pytest.raises(InputError) as info:
            load_csr(data, "server.csr")
        assert message in str(info.value), data[:20]


def test_render_csr(tmp_path: Path) -> None:
    key = generate_key("rsa3072")
    csr = build_csr(SUBJECT, key)
    text = render_csr(csr)
    lines = dict((m.group(1), m.group(2)) for m in re.finditer(r"^  ([^:]+):\s+(.*)$", text, re.M))
    assert text.splitlines()[0] == "Certificate signing request"
    assert lines["Subject"] == (
        "C=US, ST=Pennsylvania, L=Philadelphia, O=Example Corp, OU=Database Team, "
        "CN=db1.example.com, emailAddress=dba@example.com"
    )
    assert lines["Public key"] == "RSA 3072 bits"
    assert lines["Subject alt names"] == "DNS:db1.example.com, DNS:db1, IP:10.0.0.5"
    assert lines["Signature algorithm"] == "sha256WithRSAEncryption"
    assert lines["Signature valid"] == "yes"
    assert lines["Attributes"] == "none (no challenge password)"
    # The SPKI hash is the one openssl computes from the key file.
    key_path = tmp_path / "k.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    spki_der = openssl("pkey", "-in", str(key_path), "-pubout", "-outform", "DER").stdout
    assert lines["SPKI SHA-256"] == hashlib.sha256(spki_der).hexdigest()
    assert spki_sha256(csr.public_key()) == lines["SPKI SHA-256"]


def test_render_ec_and_bad_signature() -> None:
    csr = build_csr(make_subject("db1.example.com"), generate_key("ecdsa-p256"))
    text = render_csr(csr)
    assert "ECDSA P-256 (256 bits)" in text
    assert "ecdsa-with-SHA256" in text
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01
    tampered = x509.load_der_x509_csr(bytes(der))
    assert "Signature valid:     NO" in render_csr(tampered)


def test_render_shows_challenge_password_without_its_value() -> None:
    key = generate_key("ecdsa-p256")
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(make_subject("db1.example.com").to_x509_name())
        .add_attribute(AttributeOID.CHALLENGE_PASSWORD, b"hunter2-value")
        .sign(key, hashes.SHA256())
    )
    text = render_csr(csr)
    assert "challengePassword (set; PostgreSQL does not use it)" in text
    assert "hunter2" not in text
    assert "(none; clients will compare the CN)" in text


def test_format_name_keeps_certificate_order() -> None:
    assert format_name(SUBJECT.to_x509_name()).startswith("C=US, ST=Pennsylvania,")


def test_write_key_and_csr(tmp_path: Path) -> None:
    out = tmp_path / "work" / "change-1"
    key_path, csr_path = write_key_and_csr(out, SUBJECT, "ecdsa-p256")
    assert (key_path.name, csr_path.name) == ("server.key", "server.csr")
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    key = load_key(key_path.read_bytes())
    csr = load_csr(csr_path.read_bytes())
    assert csr.is_signature_valid
    assert csr.subject == SUBJECT.to_x509_name()
    cert = certfactory.issue("x.example.com", key=key).cert  # type: ignore[arg-type]
    assert public_key_matches(csr.public_key(), cert)
    assert sorted(p.name for p in out.iterdir()) == ["server.csr", "server.key"]
    check = openssl("pkey", "-in", str(key_path), "-noout")
    assert check.returncode == 0, check.stderr


def test_write_key_and_csr_with_passphrase(tmp_path: Path) -> None:
    key_path, _ = write_key_and_csr(tmp_path, SUBJECT, "ecdsa-p256", passphrase=b"pw-123")
    assert key_path.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert openssl("pkey", "-in", str(key_path), "-passin", "pass:pw-123", "-noout").returncode == 0
    assert openssl("pkey", "-in", str(key_path), "-passin", "pass:nope", "-noout").returncode != 0


def test_existing_files_are_refused_then_backed_up(tmp_path: Path) -> None:
    key1, csr1 = write_key_and_csr(tmp_path, SUBJECT, "ecdsa-p256")
    old_key, old_csr = key1.read_bytes(), csr1.read_bytes()
    with pytest.raises(InputError, match="server.key already exists; use --force"):
        write_key_and_csr(tmp_path, SUBJECT, "ecdsa-p256")
    assert key1.read_bytes() == old_key
    key2, csr2 = write_key_and_csr(tmp_path, SUBJECT, "ecdsa-p256", overwrite=True)
    assert key2.read_bytes() != old_key
    baks = sorted(p.name for p in tmp_path.iterdir() if ".bak-" in p.name)
    assert len(baks) == 2
    assert all(re.fullmatch(r"server\.(key|csr)\.bak-\d{8}T\d{6}Z", b) for b in baks)
    key_bak = next(tmp_path.glob("server.key.bak-*"))
    assert key_bak.read_bytes() == old_key
    assert stat.S_IMODE(key_bak.stat().st_mode) == 0o600
    assert next(tmp_path.glob("server.csr.bak-*")).read_bytes() == old_csr
    # A second replacement within the same second keeps both backups.
    write_key_and_csr(tmp_path, SUBJECT, "ecdsa-p256", overwrite=True)
    assert len([p for p in tmp_path.iterdir() if ".bak-" in p.name]) == 4


def test_failed_csr_write_puts_the_old_files_back(tmp_path: Path) -> None:
    key1, csr1 = write_key_and_csr(tmp_path, SUBJECT, "ecdsa-p256")
    old_key = key1.read_bytes()
    # Occupy the CSR's temporary name so that writing it fails.
    (tmp_path / f".server.csr.tmp-{os.getpid()}").mkdir()
    with pytest.raises(FileExistsError):
        write_key_and_csr(tmp_path, SUBJECT, "ecdsa-p256", overwrite=True)
    assert key1.read_bytes() == old_key
    assert csr1.exists()
    assert not list(tmp_path.glob("*.bak-*"))


def test_out_dir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="is not a directory"):
        write_key_and_csr(tmp_path / "f", SUBJECT, "ecdsa-p256")
