"""The pure parts of ``probe``: targets, names, rows and the CLI's JSON object (no network)."""

from __future__ import annotations

import datetime as dt
import json
import ssl
from pathlib import Path

import certfactory
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID

from pgtls_helpers.cli.probe import presented_object
from pgtls_helpers.errors import InputError
from pgtls_helpers.pki.client import rfc4514_dn
from pgtls_helpers.postgres.probe import (
    ProbeResult,
    chain_rows,
    format_target,
    leaf_validity,
    parse_target,
)
from pgtls_helpers.postgres.wire import cert_validity, rfc4514

A = x509.NameAttribute
RDN = x509.RelativeDistinguishedName
JSON_KEYS = [
    "host", "port", "tls_version", "cipher", "not_after", "days_left", "names", "chain", "error",
]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("db1.example.com", ("db1.example.com", 5432)),
        ("db1.example.com:6432", ("db1.example.com", 6432)),
        ("  db1:5433 ", ("db1", 5433)),
        ("10.0.0.7:5432", ("10.0.0.7", 5432)),
        ("[::1]:5433", ("::1", 5433)),
        ("[2001:db8::7]", ("2001:db8::7", 5432)),
        ("2001:db8::7", ("2001:db8::7", 5432)),
        ("[fe80::1%eth0]:5432", ("fe80::1%eth0", 5432)),
        ("db1:65535", ("db1", 65535)),
    ],
)
def test_parse_target(text: str, expected: tuple[str, int]) -> None:
    assert parse_target(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        ":5432",
        "db1:",
        "db1:0",
        "db1:65536",
        "db1:http",
        "db1:-1",
        "[::1",
        "[::1]5432",
        "[::1]:",
        "a:b:c",
        "[]:5432",
    ],
)
def test_parse_target_refuses(text: str) -> None:
    with pytest.raises(InputError) as info:
        parse_target(text)
    assert repr(text) in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("target", ["db1.example.com:5432", "[::1]:5433", "10.0.0.7:6432"])
def test_format_target_round_trips(target: str) -> None:
    assert format_target(*parse_target(target)) == target


def test_chain_rows() -> None:
    chain = certfactory.article_chain()
    presented = tuple(c.cert for c in (chain.leaf, *chain.intermediates))
    result = ProbeResult("db1.example.com", 5432, "TLSv1.3", "TLS_AES_256_GCM_SHA384", presented)
    rows = chain_rows(result)
    assert rows == [
        {
            "sha256": c.fingerprint(hashes.SHA256()).hex(),
            "subject": rfc4514_dn(c.subject),
            "issuer": rfc4514_dn(c.issuer),
        }
        for c in presented
    ]
    assert all(len(r["sha256"]) == 64 and r["sha256"] == r["sha256"].lower() for r in rows)


def test_json_object_from_der_equals_chain_rows() -> None:
    chain = certfactory.article_chain()
    presented = [c.cert for c in (chain.leaf, *chain.intermediates)]
    ders = [c.public_bytes(serialization.Encoding.DER) for c in presented]
    end = presented[0].not_valid_after_utc
    now = (end - dt.timedelta(days=42, hours=1)).timestamp()
    obj = presented_object(
        "db1.example.com", 5432, ("TLSv1.3", "TLS_AES_128_GCM_SHA256", ders), now=now
    )
    assert list(obj) == JSON_KEYS
    expected = chain_rows(ProbeResult("db1.example.com", 5432, chain=tuple(presented)))
    assert json.loads(json.dumps(obj)) == {
        "host": "db1.example.com",
        "port": 5432,
        "tls_version": "TLSv1.3",
        "cipher": "TLS_AES_128_GCM_SHA256",
        "not_after": end.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "days_left": 42,
        "names": ["DNS:db1.example.com"],
        "chain": expected,
        "error": None,
    }


def test_a_failed_probe_as_json() -> None:
    error = "[::1]:5433: the server refused SSL (ssl = off?)"
    failed = ProbeResult("::1", 5433, error=error)
    assert not failed.ok and failed.target == "[::1]:5433"
    assert presented_object("::1", 5433, error) == {
        "host": "::1",
        "port": 5433,
        "tls_version": None,
        "cipher": None,
        "not_after": None,
        "days_left": None,
        "names": [],
        "chain": [],
        "error": error,
    }


_KEY = ec.generate_private_key(ec.SECP256R1())

# Names OpenSSL's decoding must render exactly as cryptography does (ASCII text values).
SAME = {
    "article": x509.Name([A(NameOID.COUNTRY_NAME, "US"), A(NameOID.COMMON_NAME, "RootCA")]),
    "escapes": x509.Name(
        [
            A(NameOID.COMMON_NAME, '#a,b+c"d\\e<f>g;h '),
            A(NameOID.ORGANIZATION_NAME, " lead"),
            A(NameOID.ORGANIZATIONAL_UNIT_NAME, " "),
            A(NameOID.LOCALITY_NAME, "nul\0inside"),
        ]
    ),
    "multi-valued": x509.Name(
        [
            RDN([A(NameOID.ORGANIZATIONAL_UNIT_NAME, "z"), A(NameOID.COMMON_NAME, "a")]),
            RDN([A(NameOID.COUNTRY_NAME, "US")]),
        ]
    ),
    "types": x509.Name(
        [
            A(NameOID.DOMAIN_COMPONENT, "example"),
            A(NameOID.USER_ID, "u"),
            A(NameOID.STREET_ADDRESS, "1 Main"),
            A(NameOID.STATE_OR_PROVINCE_NAME, "NY"),
            A(NameOID.EMAIL_ADDRESS, "dba@example.com"),
            A(NameOID.SERIAL_NUMBER, "42"),
            A(NameOID.JURISDICTION_COUNTRY_NAME, "US"),
            A(NameOID.BUSINESS_CATEGORY, "y"),
            A(NameOID.ORGANIZATION_IDENTIFIER, "oi"),
            A(x509.ObjectIdentifier("1.2.3.4.5"), "private"),
            A(NameOID.COMMON_NAME, "db1.example.com", _type=_ASN1Type.BMPString),
        ]
    ),
    "empty": x509.Name([]),
}
# Names where the two decoders can differ: OpenSSL's answer must be withheld.
WITHHELD = {
    "t61 accents": x509.Name([A(NameOID.COMMON_NAME, "caf\xe9", _type=_ASN1Type.T61String)]),
    "utf8 accents": x509.Name([A(NameOID.ORGANIZATION_NAME, "Zürich")]),
    "bit string": x509.Name(
        [
            A(NameOID.X500_UNIQUE_IDENTIFIER, b"\x00\x01", _type=_ASN1Type.BitString),
            A(NameOID.COMMON_NAME, "a"),
        ]
    ),
}


def _self_signed(name: x509.Name) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(_KEY.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(_KEY, hashes.SHA256())
    )


def _openssl_subject(cert: x509.Certificate, tmp_path: Path) -> object:
    """The subject as OpenSSL decodes it for Python's ssl module (the shape of get_info())."""
    path = tmp_path / "cert.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return ssl._ssl._test_decode_cert(str(path))["subject"]  # type: ignore[attr-defined]


@pytest.mark.parametrize("case", sorted(SAME))
def test_openssl_names_render_as_cryptography_does(case: str, tmp_path: Path) -> None:
    cert = _self_signed(SAME[case])
    assert rfc4514(_openssl_subject(cert, tmp_path)) == rfc4514_dn(cert.subject)  # type: ignore[arg-type]


@pytest.mark.parametrize("case", sorted(WITHHELD))
def test_names_the_decoders_may_disagree_on_go_to_cryptography(case: str, tmp_path: Path) -> None:
    cert = _self_signed(WITHHELD[case])
    try:
        subject = _openssl_subject(cert, tmp_path)
    except (ssl.SSLError, TypeError, ValueError):
        subject = None  # OpenSSL cannot decode it at all: also withheld
    if subject is not None:
        assert rfc4514(subject) is None  # type: ignore[arg-type]
    der = cert.public_bytes(serialization.Encoding.DER)
    [row] = presented_object("h", 1, ("TLSv1.3", "x", [der]))["chain"]
    assert row["subject"] == rfc4514_dn(cert.subject)


def test_probe_result_is_frozen() -> None:
    result = ProbeResult("db1", 5432)
    with pytest.raises(AttributeError):
        result.port = 1  # type: ignore[misc]


def test_email_address_by_name_in_both_decoders(tmp_path: Path) -> None:
    cert = _self_signed(SAME["types"])
    text = rfc4514(_openssl_subject(cert, tmp_path))  # type: ignore[arg-type]
    assert text is not None and "emailAddress=dba@example.com" in text
    assert "1.2.840.113549.1.9.1" not in text


class _Decoded:
    """An ``_ssl.Certificate`` stand-in: OpenSSL's decoding of a file, as ``get_info()``."""

    def __init__(self, cert: x509.Certificate, tmp_path: Path) -> None:
        path = tmp_path / "leaf.pem"
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self.info = ssl._ssl._test_decode_cert(str(path))  # type: ignore[attr-defined]

    def get_info(self) -> dict[str, object]:
        return self.info


@pytest.mark.parametrize(
    "sans",
    [
        ["db1.example.com", "127.0.0.1", "2001:db8::7"],
        [],
    ],
)
def test_leaf_not_after_and_names_agree_in_both_decoders(sans: list[str], tmp_path: Path) -> None:
    root = certfactory.make_ca("Root")
    leaf = certfactory.issue("db1.example.com", issuer=root, sans=sans or None, days=396)
    expected = (
        int(leaf.cert.not_valid_after_utc.timestamp()),
        [f"{'IP' if ':' in s or s[0].isdigit() else 'DNS'}:{s}" for s in sans],
    )
    assert leaf_validity(leaf.cert) == expected
    assert cert_validity(_Decoded(leaf.cert, tmp_path)) == expected
