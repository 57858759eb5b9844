"""Client certificates as the server sees them: the subject and its three spellings, the
clientAuth refusal in libpq's words, the lab CA's client profile, PKCS#8 DER for pgjdbc.

The spellings and the purpose are checked against the real ``openssl`` too."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pgtls_helpers.errors import InputError
from pgtls_helpers.lab import LabCA
from pgtls_helpers.pki import client as pkiclient
from pgtls_helpers.pki import keys

CA = LabCA.create()
MINIMAL_CA = LabCA.create(minimal=True)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _client_cert(
    subject: str | None = None, *, role: str = "alice", ca: LabCA = CA, **kw: object
) -> x509.Certificate:
    key = keys.generate_key("ecdsa-p256")
    csr = pkiclient.build_client_csr(pkiclient.client_subject(role, subject), key)
    return ca.sign_client_csr(csr, **kw)  # type: ignore[arg-type]


def _openssl_subject(cert: x509.Certificate, nameopt: str, tmp_path: Path) -> str:
    path = tmp_path / "c.pem"
    path.write_bytes(_pem(cert))
    out = subprocess.run(
        ["openssl", "x509", "-in", str(path), "-noout", "-subject", "-nameopt", nameopt],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return out.removeprefix("subject=").strip()


def test_the_default_subject_is_cn_equal_to_the_role() -> None:
    name = pkiclient.client_subject("report_reader")
    assert name == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "report_reader")])


def test_a_dn_string_is_read_most_specific_first_and_encoded_in_certificate_order() -> None:
    name = pkiclient.client_subject("alice", "CN=alice,OU=dba,O=Example")
    assert [(a.oid, a.value) for a in name] == [
        (NameOID.ORGANIZATION_NAME, "Example"),
        (NameOID.ORGANIZATIONAL_UNIT_NAME, "dba"),
        (NameOID.COMMON_NAME, "alice"),
    ]
    assert pkiclient.rfc4514_dn(name) == "CN=alice,OU=dba,O=Example"
    assert pkiclient.hba_dn(name) == "CN=alice,OU=dba,O=Example"
    assert pkiclient.stat_ssl_dn(name) == "/O=Example/OU=dba/CN=alice"


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("OU=dba,O=Example", "has no CN"),
        ("CN=alice,C=Germany", "length must be >= 2 and <= 2"),
        ('CN=a "b"', "must be escaped"),
        ("CN=alice,XX=1", "is not a distinguished name"),
    ],
)
def test_a_dn_without_a_cn_or_with_a_bad_attribute_is_refused(text: str, words: str) -> None:
    with pytest.raises(InputError, match=words):
        pkiclient.parse_dn(text)


def test_email_and_lower_case_spellings_are_read() -> None:
    name = pkiclient.parse_dn("CN=bob,emailAddress=bob@example.com,E=b2@example.com,o=Ex")
    assert name.get_attributes_for_oid(NameOID.EMAIL_ADDRESS)[0].value == "b2@example.com"
    assert pkiclient.hba_dn(name) == (
        "CN=bob,emailAddress=bob@example.com,emailAddress=b2@example.com,O=Ex"
    )


def test_the_server_forms_are_what_openssl_prints(tmp_path: Path) -> None:
    """clientname=DN matches OpenSSL's RFC 2253 printing (PostgreSQL uses XN_FLAG_RFC2253);
    pg_stat_ssl.client_dn is the slash form in certificate order."""
    cert = _client_cert('CN=J\\, \\"Doe\\",OU=dba+UID=jd,O=Exämple,C=DE', role="jdoe")
    assert pkiclient.hba_dn(cert.subject) == _openssl_subject(cert, "RFC2253", tmp_path)
    # the slash form of openssl's old default printing, as PostgreSQL writes client_dn
    assert pkiclient.stat_ssl_dn(cert.subject) == '/C=DE/O=Exämple/OU=dba/UID=jd/CN=J\\, \\"Doe\\"'
    plain = _client_cert("CN=alice,OU=dba,O=Example")
    assert pkiclient.stat_ssl_dn(plain.subject) == "/" + _openssl_subject(
        plain, "compat", tmp_path
    ).lstrip("/")


def test_pg_stat_ssl_keeps_63_bytes_of_the_dn() -> None:
    name = pkiclient.parse_dn("CN=" + "a" * 60 + ",O=Example")
    shown = pkiclient.stat_ssl_dn(name)
    assert len(shown.encode()) == 63
    assert shown.startswith("/O=Example/CN=aaa")


def test_a_lab_client_certificate_is_for_client_auth_and_keeps_the_subject() -> None:
    cert = _client_cert("CN=alice,OU=dba,O=Example")
    assert pkiclient.client_auth_problem(cert) is None
    assert cert.subject == pkiclient.parse_dn("CN=alice,OU=dba,O=Example")
    assert cert.issuer == CA.signer.subject
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and not basic.value.ca


def _openssl_verify(cert: x509.Certificate, purpose: str, tmp_path: Path) -> str:
    (tmp_path / "root.pem").write_bytes(_pem(CA.root))
    (tmp_path / "inter.pem").write_bytes(b"".join(_pem(c) for c in CA.intermediates))
    (tmp_path / "leaf.pem").write_bytes(_pem(cert))
    proc = subprocess.run(
        [
            "openssl",
            "verify",
            "-purpose",
            purpose,
            "-CAfile",
            str(tmp_path / "root.pem"),
            "-untrusted",
            str(tmp_path / "inter.pem"),
            str(tmp_path / "leaf.pem"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    return proc.stdout + proc.stderr


def test_openssl_accepts_the_lab_client_certificate_for_a_client(tmp_path: Path) -> None:
    assert _openssl_verify(_client_cert(), "sslclient", tmp_path).strip().endswith(": OK")


def test_a_server_auth_only_certificate_is_refused_in_libpqs_words(tmp_path: Path) -> None:
    cert = _client_cert(server_auth_only=True)
    why = pkiclient.client_auth_problem(cert)
    assert why is not None
    assert "serverAuth, without clientAuth" in why
    assert '"sslv3 alert unsupported certificate"' in why
    # the server's OpenSSL refuses it for a client's purpose
    assert "unsuitable certificate purpose" in _openssl_verify(cert, "sslclient", tmp_path)
    # a server's certificate, likewise
    _key, server = CA.issue(["db1.example.com"])
    assert "sslv3 alert unsupported certificate" in (pkiclient.client_auth_problem(server) or "")


def test_a_certificate_without_extended_key_usage_is_not_taken_for_a_client() -> None:
    key = keys.generate_key("ecdsa-p256")
    _k, leaf = MINIMAL_CA.issue(["alice"])
    assert pkiclient.client_auth_problem(leaf) is not None
    del key


def test_the_subject_must_be_the_one_asked_for() -> None:
    cert = _client_cert("CN=alice,OU=dba,O=Example")
    assert pkiclient.subject_problem(cert, pkiclient.parse_dn("CN=alice,OU=dba,O=Example")) is None
    other_cn = pkiclient.subject_problem(cert, pkiclient.parse_dn("CN=bob,OU=dba,O=Example"))
    assert other_cn is not None and "CN is 'alice', not 'bob'" in other_cn
    reordered = pkiclient.subject_problem(cert, pkiclient.parse_dn("CN=alice,O=Example"))
    assert reordered is not None and "clientname=DN" in reordered


@pytest.mark.parametrize("key_type", ["ecdsa-p256", "rsa2048"])
def test_pkcs8_der_is_the_same_key_and_openssl_reads_it(key_type: str, tmp_path: Path) -> None:
    key = keys.generate_key(key_type)
    der = pkiclient.pkcs8_der(key)
    again = serialization.load_der_private_key(der, None)
    assert keys.describe_key(again) == keys.describe_key(key)
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    assert again.public_key().public_bytes(
        serialization.Encoding.DER, pub
    ) == key.public_key().public_bytes(serialization.Encoding.DER, pub)
    path = tmp_path / "postgresql.pk8"
    path.write_bytes(der)
    subprocess.run(
        ["openssl", "pkcs8", "-nocrypt", "-inform", "DER", "-in", str(path), "-out", "/dev/null"],
        check=True,
        capture_output=True,
    )


def test_the_lab_ca_refuses_a_csr_without_a_cn() -> None:
    key = keys.generate_key("ecdsa-p256")
    csr = pkiclient.build_client_csr(
        x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example")]), key
    )
    with pytest.raises(InputError, match="no common name"):
        CA.sign_client_csr(csr)
