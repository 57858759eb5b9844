"""Host-name scenarios from PostgreSQL's ``src/test/ssl/t/001_ssltests.pl`` (15 and later).

Each certificate below mirrors one of ``src/test/ssl/conf/server-*.config``; each case is a
``host=`` that test connects with under ``sslmode=verify-full``, whether libpq accepts it, and
(for refusals) the text libpq's error message carries. The unit tests check
:func:`pgtls_helpers.hostname.matches_host` against them; the integration test checks real
libpq against the same table.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import certfactory
from cryptography import x509
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID

OU = "PostgreSQL test suite"

# name -> (CN or None, SAN entries in order as ("DNS"|"IP", value), or None for no extension)
CERTS: dict[str, tuple[str | None, tuple[tuple[str, str], ...] | None]] = {
    "server-cn-only": ("common-name.pg-ssltest.test", None),
    "server-ip-cn-only": ("192.0.2.1", None),
    "server-ip-in-dnsname": (None, (("DNS", "192.0.2.1"),)),
    "server-multiple-alt-names": (
        None,
        (
            ("DNS", "dns1.alt-name.pg-ssltest.test"),
            ("DNS", "dns2.alt-name.pg-ssltest.test"),
            ("DNS", "*.wildcard.pg-ssltest.test"),
        ),
    ),
    "server-single-alt-name": (None, (("DNS", "single.alt-name.pg-ssltest.test"),)),
    "server-ip-alt-names": (None, (("IP", "192.0.2.1"), ("IP", "2001:DB8::1"))),
    "server-cn-and-alt-names": (
        "common-name.pg-ssltest.test",
        (("DNS", "dns1.alt-name.pg-ssltest.test"), ("DNS", "dns2.alt-name.pg-ssltest.test")),
    ),
    "server-cn-and-ip-alt-names": (
        "common-name.pg-ssltest.test",
        (("IP", "192.0.2.1"), ("IP", "2001:DB8::1")),
    ),
    "server-ip-cn-and-alt-names": ("192.0.2.1", (("IP", "192.0.2.2"), ("IP", "2001:DB8::1"))),
    "server-ip-cn-and-dns-alt-names": (
        "192.0.2.1",
        (("DNS", "dns1.alt-name.pg-ssltest.test"), ("DNS", "dns2.alt-name.pg-ssltest.test")),
    ),
    "server-no-names": (None, None),
    # Not in 001_ssltests.pl: corners of the same code paths.
    "wildcard-cn-only": ("*.example.com", None),
    "ip-wildcard-dnsname": (None, (("DNS", "*.0.0.1"),)),
    "loopback-ip-san": ("db.example.com", (("IP", "127.0.0.1"),)),
    "mixed-case-dns": (None, (("DNS", "DB1.Example.COM"),)),
    "bmpstring-cn": ("BMP:db1.example.com", None),
}


@dataclass(frozen=True)
class Case:
    cert: str
    host: str
    ok: bool
    libpq_says: str | None = None  # part of libpq's error message for a refusal

    @property
    def id(self) -> str:
        return f"{self.cert}:{self.host}"


_DNS1 = "dns1.alt-name.pg-ssltest.test"

CASES: tuple[Case, ...] = (
    Case("server-cn-only", "common-name.pg-ssltest.test", True),
    Case(
        "server-cn-only",
        "wronghost.test",
        False,
        'server certificate for "common-name.pg-ssltest.test" does not match host name '
        '"wronghost.test"',
    ),
    Case("server-ip-cn-only", "192.0.2.1", True),
    Case(
        "server-ip-cn-only",
        "192.000.002.001",
        False,
        'server certificate for "192.0.2.1" does not match host name "192.000.002.001"',
    ),
    Case("server-ip-in-dnsname", "192.0.2.1", True),
    Case("server-multiple-alt-names", "dns1.alt-name.pg-ssltest.test", True),
    Case("server-multiple-alt-names", "dns2.alt-name.pg-ssltest.test", True),
    Case("server-multiple-alt-names", "foo.wildcard.pg-ssltest.test", True),
    Case(
        "server-multiple-alt-names",
        "wronghost.alt-name.pg-ssltest.test",
        False,
        f'server certificate for "{_DNS1}" (and 2 other names) does not match host name '
        '"wronghost.alt-name.pg-ssltest.test"',
    ),
    Case(
        "server-multiple-alt-names",
        "deep.subdomain.wildcard.pg-ssltest.test",
        False,
        f'server certificate for "{_DNS1}" (and 2 other names) does not match host name '
        '"deep.subdomain.wildcard.pg-ssltest.test"',
    ),
    Case("server-single-alt-name", "single.alt-name.pg-ssltest.test", True),
    Case(
        "server-single-alt-name",
        "wronghost.alt-name.pg-ssltest.test",
        False,
        'server certificate for "single.alt-name.pg-ssltest.test" does not match host name '
        '"wronghost.alt-name.pg-ssltest.test"',
    ),
    Case(
        "server-single-alt-name",
        "deep.subdomain.wildcard.pg-ssltest.test",
        False,
        'server certificate for "single.alt-name.pg-ssltest.test" does not match host name '
        '"deep.subdomain.wildcard.pg-ssltest.test"',
    ),
    Case("server-ip-alt-names", "192.0.2.1", True),
    Case("server-ip-alt-names", "192.000.002.001", True),
    Case(
        "server-ip-alt-names",
        "192.0.2.2",
        False,
        'server certificate for "192.0.2.1" (and 1 other name) does not match host name '
        '"192.0.2.2"',
    ),
    Case("server-ip-alt-names", "2001:DB8::1", True),
    Case("server-ip-alt-names", "2001:db8:0:0:0:0:0:1", True),
    Case("server-ip-alt-names", "2001:db8::0.0.0.1", True),
    Case(
        "server-ip-alt-names",
        "::1",
        False,
        'server certificate for "192.0.2.1" (and 1 other name) does not match host name "::1"',
    ),
    Case(
        "server-ip-alt-names",
        "2001:DB8::1/128",
        False,
        'server certificate for "192.0.2.1" (and 1 other name) does not match host name '
        '"2001:DB8::1/128"',
    ),
    Case("server-cn-and-alt-names", "dns1.alt-name.pg-ssltest.test", True),
    Case("server-cn-and-alt-names", "dns2.alt-name.pg-ssltest.test", True),
    Case(
        "server-cn-and-alt-names",
        "common-name.pg-ssltest.test",
        False,
        f'server certificate for "{_DNS1}" (and 1 other name) does not match host name '
        '"common-name.pg-ssltest.test"',
    ),
    Case("server-cn-and-ip-alt-names", "common-name.pg-ssltest.test", True),
    Case("server-cn-and-ip-alt-names", "192.0.2.1", True),
    Case("server-cn-and-ip-alt-names", "2001:db8::1", True),
    Case("server-ip-cn-and-alt-names", "192.0.2.2", True),
    Case("server-ip-cn-and-alt-names", "2001:db8::1", True),
    Case(
        "server-ip-cn-and-alt-names",
        "192.0.2.1",
        False,
        'server certificate for "192.0.2.2" (and 1 other name) does not match host name '
        '"192.0.2.1"',
    ),
    Case("server-ip-cn-and-dns-alt-names", "192.0.2.1", True),
    Case("server-ip-cn-and-dns-alt-names", "dns1.alt-name.pg-ssltest.test", True),
    Case("server-ip-cn-and-dns-alt-names", "dns2.alt-name.pg-ssltest.test", True),
    Case(
        "server-no-names",
        "common-name.pg-ssltest.test",
        False,
        "could not get server's host name from server certificate",
    ),
    # Corners: case folding, one-label wildcards, inet_aton forms, IP hosts vs dNSNames.
    Case("wildcard-cn-only", "DB1.EXAMPLE.COM", True),
    Case("wildcard-cn-only", "example.com", False),
    Case("wildcard-cn-only", "a.b.example.com", False),
    Case("wildcard-cn-only", ".example.com", False),
    Case("ip-wildcard-dnsname", "127.0.0.1", True),
    Case("loopback-ip-san", "127.1", True),
    Case("loopback-ip-san", "0x7f.0.0.1", True),
    Case("loopback-ip-san", "2130706433", True),
    Case("loopback-ip-san", "127.0.0.2", False),
    Case("loopback-ip-san", "db.example.com", True),  # only IP SANs: a name falls back to the CN
    Case("loopback-ip-san", "localhost", False),
    Case("wildcard-cn-only", "a..example.com", True),  # '*' may cover "a." (libpq's C code)
    Case("mixed-case-dns", "db1.example.com", True),
    # OpenSSL hands libpq a BMPString's UCS-2 bytes, whose NULs libpq refuses.
    Case("bmpstring-cn", "db1.example.com", False),
)


def build(cert_name: str, issuer: certfactory.Issued) -> certfactory.Issued:
    """Issue the server certificate ``cert_name`` from :data:`CERTS` under ``issuer``."""
    cn, sans = CERTS[cert_name]
    if cn is not None and cn.startswith("BMP:"):
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, OU),
                x509.NameAttribute(NameOID.COMMON_NAME, cn[4:], _ASN1Type.BMPString),
            ]
        )
    else:
        subject = certfactory.name(cn, organizational_unit_name=OU)
    extra: list[tuple[x509.ExtensionType, bool]] = []
    if sans is not None:
        general: list[x509.GeneralName] = [
            x509.DNSName(v) if kind == "DNS" else x509.IPAddress(ipaddress.ip_address(v))
            for kind, v in sans
        ]
        extra.append((x509.SubjectAlternativeName(general), False))
    return certfactory.issue(
        subject,
        issuer=issuer,
        sans=None,
        eku=[certfactory.SERVER_AUTH],
        extra_extensions=extra,
    )
