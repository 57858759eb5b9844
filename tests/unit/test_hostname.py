"""libpq's verify-full host-name rules, mirrored from PostgreSQL's own SSL test suite."""

from __future__ import annotations

import certfactory
import hostname_cases
import pytest
from cryptography import x509

from pgtls_helpers.pki.hostname import check_host, explain, is_ip_literal, matches_host


@pytest.fixture(scope="module")
def ca() -> certfactory.Issued:
    return certfactory.make_ca("Test CA for host names")


@pytest.fixture(scope="module")
def certs(ca: certfactory.Issued) -> dict[str, x509.Certificate]:
    return {name: hostname_cases.build(name, ca).cert for name in hostname_cases.CERTS}


@pytest.mark.parametrize("case", hostname_cases.CASES, ids=lambda c: c.id)
def test_matches_host_like_libpq(case: hostname_cases.Case, certs: dict) -> None:
    assert matches_host(certs[case.cert], case.host) is case.ok


@pytest.mark.parametrize(
    "case", [c for c in hostname_cases.CASES if c.libpq_says], ids=lambda c: c.id
)
def test_explain_quotes_what_libpq_says(case: hostname_cases.Case, certs: dict) -> None:
    text = explain(certs[case.cert], case.host)
    expected = case.libpq_says or ""
    # libpq starts with "server certificate for"; explain() says "The certificate for".
    assert expected.replace("server certificate for", "certificate for") in text


def test_explain_for_a_match_names_the_kind(certs: dict) -> None:
    assert explain(certs["server-multiple-alt-names"], "foo.wildcard.pg-ssltest.test") == (
        'host "foo.wildcard.pg-ssltest.test" matches the dNSName SAN '
        '"*.wildcard.pg-ssltest.test" (a one-label wildcard).'
    )
    assert "common name (CN)" in explain(certs["server-ip-cn-and-dns-alt-names"], "192.0.2.1")
    assert "iPAddress SAN" in explain(certs["server-ip-alt-names"], "192.000.002.001")


def test_explain_says_why_the_cn_was_ignored(certs: dict) -> None:
    text = explain(certs["server-cn-and-alt-names"], "common-name.pg-ssltest.test")
    assert "CN is not consulted" in text and "dNSName SANs" in text


def test_check_host_counts_names_like_libpq(certs: dict) -> None:
    chk = check_host(certs["server-multiple-alt-names"], "nope.example.com")
    assert (chk.matched, chk.names_examined, chk.cn_consulted) == (False, 3, False)
    assert chk.first_name == "dns1.alt-name.pg-ssltest.test"
    chk = check_host(certs["server-cn-and-ip-alt-names"], "common-name.pg-ssltest.test")
    assert (chk.matched, chk.matched_kind, chk.names_examined) == (True, "CN", 3)


def test_empty_host_never_matches(certs: dict) -> None:
    assert not matches_host(certs["server-cn-only"], "")
    assert "no host name" in explain(certs["server-cn-only"], "")


@pytest.mark.parametrize(
    ("host", "is_ip"),
    [
        ("127.0.0.1", True),
        ("127.1", True),  # inet_aton's short forms
        ("0x7f.1", True),
        ("017700000001", True),
        ("192.000.002.001", True),
        ("::1", True),
        ("2001:db8::0.0.0.1", True),
        ("db1.example.com", False),
        ("1.2.3.", False),
        ("08", False),  # not octal
        ("[::1]", False),
        ("2001:DB8::1/128", False),
        ("fe80::1%eth0", False),
        ("", False),
    ],
)
def test_is_ip_literal_follows_inet_aton_and_inet_pton(host: str, is_ip: bool) -> None:
    assert is_ip_literal(host) is is_ip


def test_cn_with_nul_bytes_fails_like_libpq(certs: dict) -> None:
    # A BMPString CN reaches libpq as UCS-2 bytes; libpq refuses names with embedded NULs.
    chk = check_host(certs["bmpstring-cn"], "db1.example.com")
    assert not chk.matched and chk.error is not None and "NUL" in chk.error
    assert "cannot match" in explain(certs["bmpstring-cn"], "db1.example.com")


def test_only_the_first_cn_counts(ca: certfactory.Issued) -> None:
    from cryptography.x509.oid import NameOID

    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "first.example.com"),
            x509.NameAttribute(NameOID.COMMON_NAME, "second.example.com"),
        ]
    )
    cert = certfactory.issue(subject, issuer=ca).cert
    assert matches_host(cert, "first.example.com")
    assert not matches_host(cert, "second.example.com")
