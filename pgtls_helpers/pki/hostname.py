"""Host names as libpq checks them in ``sslmode=verify-full``.

This follows ``pgtls_verify_peer_name_matches_certificate_guts`` in
``src/interfaces/libpq/fe-secure-openssl.c`` and the helpers in ``fe-secure-common.c`` of
PostgreSQL 15 and later (15, 16, 17 and 18 share these rules):

* The host is an *IP literal* when the C library's ``inet_aton`` (IPv4, including forms such
  as ``127.1`` or ``0x7f.0.0.1``) or ``inet_pton(AF_INET6)`` accepts it; otherwise it is a
  *DNS name*. We call the same C functions through :mod:`socket`, so the answer is the one
  libpq gives on this machine.
* The SANs are walked in certificate order. Every dNSName is compared as a string (so a
  dNSName ``192.0.2.1`` matches the host ``192.0.2.1``), every iPAddress as an address. The
  first match, or the first unusable entry, ends the walk.
* The first CN is consulted only when the certificate has no SAN of the host's kind
  (dNSName for a name, iPAddress for an IP literal) and no SAN matched. So an IP host still
  falls back to the CN when the SANs hold only dNSNames, and a name still falls back to the
  CN when they hold only iPAddresses.
* Comparison folds ASCII case only (``pg_strcasecmp``). A wildcard is a leading ``*.``; the
  ``*`` covers at least one character and no dot before the last one, so ``*.example.com``
  matches ``db.example.com`` but neither ``example.com`` nor ``a.b.example.com``.
* A name with an embedded NUL byte, or an iPAddress that is neither 4 nor 16 bytes long,
  fails the check outright.

PostgreSQL 14 and older differ: they ignore iPAddress SANs entirely and consult the CN only
when the certificate has no dNSName SAN at all (even for an IP host).

>>> from pgtls_helpers.pki.hostname import _wildcard_match
>>> _wildcard_match(b"*.example.com", b"DB1.Example.COM")
True
>>> _wildcard_match(b"*.example.com", b"a.b.example.com")
False
>>> _wildcard_match(b"*.example.com", b"example.com")
False
>>> is_ip_literal("127.1"), is_ip_literal("2001:db8::1"), is_ip_literal("db1.example.com")
(True, True, False)
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID

__all__ = ["HostCheck", "check_host", "explain", "is_ip_literal", "matches_host"]

_IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class HostCheck:
    """What libpq's verify-full check concludes for one certificate and one host.

    Attributes:
        host: the host name as the client writes it.
        matched: True when libpq would accept the certificate for this host.
        matched_name: the certificate name that matched, or None.
        matched_kind: "dNSName", "iPAddress" or "CN" for the matching name, or None.
        names_examined: how many names libpq compared (what its error message counts).
        first_name: the first name compared (what libpq's error message quotes), or None.
        cn_consulted: whether the CN was compared at all.
        cn_skipped_because: why the CN was not compared, or None when it was.
        error: a failure that is not a plain mismatch (embedded NUL, odd address length,
            unreadable SAN extension, empty host), or None.
    """

    host: str
    matched: bool
    matched_name: str | None
    matched_kind: str | None
    names_examined: int
    first_name: str | None
    cn_consulted: bool
    cn_skipped_because: str | None
    error: str | None


def is_ip_literal(host: str) -> bool:
    """Whether libpq treats ``host`` as an IP address (``inet_aton`` or ``inet_pton``).

    >>> is_ip_literal("192.000.002.001"), is_ip_literal("2130706433")
    (True, True)
    >>> is_ip_literal("[::1]"), is_ip_literal("2001:DB8::1/128"), is_ip_literal("1.2.3.")
    (False, False, False)
    """
    return inet_aton(host) is not None or inet_pton6(host) is not None


def matches_host(cert: x509.Certificate, host: str) -> bool:
    """Whether libpq in ``sslmode=verify-full`` accepts ``cert`` for ``host``.

    Only the name check; the chain's trust is judged elsewhere.
    """
    return check_host(cert, host).matched


def explain(cert: x509.Certificate, host: str) -> str:
    """One sentence saying why ``cert`` does or does not match ``host`` under verify-full."""
    chk = check_host(cert, host)
    if chk.matched:
        how = {
            "dNSName": "the dNSName SAN",
            "iPAddress": "the iPAddress SAN",
            "CN": "the common name (CN)",
        }[chk.matched_kind or "CN"]
        wild = " (a one-label wildcard)" if (chk.matched_name or "").startswith("*.") else ""
        return f'host "{host}" matches {how} "{chk.matched_name}"{wild}.'
    if chk.error is not None:
        return f'host "{host}" cannot match: {chk.error}.'
    if chk.names_examined == 0:
        return (
            f'host "{host}" cannot match: the certificate has no dNSName or iPAddress SAN '
            "and no CN (libpq says: could not get server's host name from server certificate)."
        )
    others = chk.names_examined - 1
    listed = f'"{chk.first_name}"'
    if others == 1:
        listed += " (and 1 other name)"
    elif others > 1:
        listed += f" (and {others} other names)"
    sentence = f'the certificate for {listed} does not match host name "{host}"'
    if chk.cn_skipped_because:
        sentence += f"; {chk.cn_skipped_because}"
    return sentence[0].upper() + sentence[1:] + "."


def check_host(cert: x509.Certificate, host: str) -> HostCheck:
    """Run libpq's verify-full name check step by step and report what happened."""
    if not host:
        return _result(host, error="no host name was given (libpq requires one for verify-full)")
    host_b = host.encode("utf-8")
    host_is_ip = is_ip_literal(host)
    host_kind = "iPAddress" if host_is_ip else "dNSName"

    try:
        san_ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        sans: list[x509.GeneralName] = list(san_ext.value)
    except x509.ExtensionNotFound:
        sans = []
    except ValueError as exc:
        # OpenSSL refuses such a certificate during the handshake as well.
        return _result(host, error=f"the certificate's extensions cannot be parsed ({exc})")

    examined = 0
    first_name: str | None = None
    check_cn = True
    for gn in sans:
        if isinstance(gn, x509.DNSName):
            kind = "dNSName"
        elif isinstance(gn, x509.IPAddress):
            kind = "iPAddress"
        else:
            continue
        if kind == host_kind:
            check_cn = False
        examined += 1
        if kind == "dNSName":
            assert isinstance(gn, x509.DNSName)
            shown = gn.value
            if first_name is None:
                first_name = shown
            if "\x00" in gn.value:
                return _result(
                    host,
                    examined=examined,
                    first_name=first_name,
                    skipped="",
                    error="a dNSName in the certificate contains a NUL "
                    "byte (rejected to prevent spoofing)",
                )
            hit = _name_match(gn.value.encode("utf-8"), host_b)
        else:
            assert isinstance(gn, x509.IPAddress)
            value = gn.value
            if not isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
                return _result(
                    host,
                    examined=examined,
                    first_name=first_name,
                    skipped="",
                    error=f"the certificate holds an iPAddress SAN of invalid length ({value})",
                )
            shown = str(value)
            if first_name is None:
                first_name = shown
            hit = _ip_match(value, host)
        if hit:
            return HostCheck(host, True, shown, kind, examined, first_name, False, None, None)

    if not check_cn:
        reason = f"the CN is not consulted because the certificate has {host_kind} SANs" + (
            " (add the host as a SAN)" if _first_cn(cert) is not None else ""
        )
        return _result(host, examined=examined, first_name=first_name, skipped=reason)

    cn_attr = _first_cn(cert)
    if cn_attr is None:
        return _result(
            host, examined=examined, first_name=first_name, skipped="the certificate has no CN"
        )
    cn_bytes = _raw_value(cn_attr)
    cn_text = str(cn_attr.value)
    examined += 1
    if first_name is None:
        first_name = cn_text
    if b"\x00" in cn_bytes:
        return _result(
            host,
            examined=examined,
            first_name=first_name,
            cn=True,
            error="the certificate's CN contains a NUL byte (rejected to prevent spoofing)",
        )
    if _name_match(cn_bytes, host_b):
        return HostCheck(host, True, cn_text, "CN", examined, first_name, True, None, None)
    return _result(host, examined=examined, first_name=first_name, cn=True)


def _result(
    host: str,
    *,
    examined: int = 0,
    first_name: str | None = None,
    cn: bool = False,
    skipped: str | None = None,
    error: str | None = None,
) -> HostCheck:
    return HostCheck(host, False, None, None, examined, first_name, cn, skipped or None, error)


def _first_cn(cert: x509.Certificate) -> x509.NameAttribute | None:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return attrs[0] if attrs else None


def _raw_value(attr: x509.NameAttribute) -> bytes:
    """The CN's bytes as OpenSSL hands them to libpq (the string's own encoding)."""
    value = attr.value
    if isinstance(value, bytes):
        return value
    kind = getattr(getattr(attr, "_type", None), "name", "UTF8String")
    if kind == "BMPString":
        return value.encode("utf-16-be")
    if kind == "UniversalString":
        return value.encode("utf-32-be")
    if kind == "T61String":
        return value.encode("latin-1", errors="replace")
    return value.encode("utf-8")


def _ascii_lower(data: bytes) -> bytes:
    # pg_strcasecmp folds A-Z; bytes with the high bit set stay as they are in the C locale.
    return data.translate(_LOWER)


_LOWER = bytes(range(256)).translate(
    bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", b"abcdefghijklmnopqrstuvwxyz")
)


def _name_match(name: bytes, host: bytes) -> bool:
    return _ascii_lower(name) == _ascii_lower(host) or _wildcard_match(name, host)


def _wildcard_match(pattern: bytes, string: bytes) -> bool:
    """``wildcard_certificate_match`` from fe-secure-common.c, byte for byte.

    >>> _wildcard_match(b"*.0.0.1", b"127.0.0.1")  # a dNSName compared with an IP host
    True
    >>> _wildcard_match(b"db*.example.com", b"db1.example.com")
    False
    """
    lenpat, lenstr = len(pattern), len(string)
    if lenpat < 3 or pattern[:2] != b"*.":
        return False
    if lenpat > lenstr:
        return False
    if _ascii_lower(pattern[1:]) != _ascii_lower(string[lenstr - lenpat + 1 :]):
        return False
    # No dot may sit left of where the pattern (minus its '*') starts to match.
    dot = string.find(b".")
    return not (0 <= dot < lenstr - lenpat)


def _ip_match(value: _IPAddr, host: str) -> bool:
    if isinstance(value, ipaddress.IPv4Address):
        packed = inet_aton(host)
    else:
        packed = inet_pton6(host)
    return packed is not None and packed == value.packed


def inet_aton(host: str) -> bytes | None:
    try:
        return socket.inet_aton(host)
    except (OSError, ValueError, UnicodeError):
        return None


def inet_pton6(host: str) -> bytes | None:
    try:
        return socket.inet_pton(socket.AF_INET6, host)
    except (OSError, ValueError, UnicodeError):
        return None
