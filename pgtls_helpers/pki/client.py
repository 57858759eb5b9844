"""Client certificates, as PostgreSQL's ``cert`` method and ``clientcert=verify-full`` see them.

A client proves who it is with a certificate a CA the server trusts signed. The server reads
three things from it: whether it may be used by a TLS client (its extended key usage), the
common name (compared with the role, or looked up in ``pg_ident.conf``), and, with
``clientname=DN``, the whole subject. The subject is written three ways, and the runbook shows
all three because each is what one place expects:

- RFC 4514 (``CN=alice,OU=dba,O=Example``): how the parameters give it, most specific first;
- as a ``clientname=DN`` map matches it (:func:`hba_dn`): OpenSSL's RFC 2253 printing, which is
  the same order, with bytes above 0x7f escaped;
- as ``pg_stat_ssl.client_dn`` shows it (:func:`stat_ssl_dn`): ``/O=Example/OU=dba/CN=alice``,
  in certificate order, cut at 63 bytes.

Pure: values in, values out.
"""

from __future__ import annotations

from collections.abc import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pgtls_helpers.errors import InputError
from pgtls_helpers.pki.keys import PrivateKey

__all__ = [
    "build_client_csr",
    "client_auth_problem",
    "client_subject",
    "common_name",
    "distinct",
    "hba_dn",
    "parse_dn",
    "pkcs8_der",
    "rfc4514_dn",
    "stat_ssl_dn",
    "subject_problem",
]

# OpenSSL's short names (OBJ_nid2sn), which both of the server's forms use
_SHORT = {
    NameOID.COUNTRY_NAME: "C",
    NameOID.STATE_OR_PROVINCE_NAME: "ST",
    NameOID.LOCALITY_NAME: "L",
    NameOID.ORGANIZATION_NAME: "O",
    NameOID.ORGANIZATIONAL_UNIT_NAME: "OU",
    NameOID.COMMON_NAME: "CN",
    NameOID.EMAIL_ADDRESS: "emailAddress",
    NameOID.DOMAIN_COMPONENT: "DC",
    NameOID.USER_ID: "UID",
    NameOID.SERIAL_NUMBER: "serialNumber",
    NameOID.STREET_ADDRESS: "street",
    NameOID.TITLE: "title",
    NameOID.GIVEN_NAME: "GN",
    NameOID.SURNAME: "SN",
}
# what a DN string in the parameters may name, in any of the spellings people type
_PARSE = {
    spelling: oid
    for name, oid in [
        *((short, oid) for oid, short in _SHORT.items()),
        ("E", NameOID.EMAIL_ADDRESS),
    ]
    for spelling in (name, name.upper(), name.lower())
}

# PostgreSQL keeps pg_stat_ssl.client_dn in NAMEDATALEN bytes, its terminating zero included
_STAT_SSL_BYTES = 63

UNSUPPORTED_CERTIFICATE = "sslv3 alert unsupported certificate"


def parse_dn(text: str, *, what: str = "subject") -> x509.Name:
    """The name an RFC 4514 string (most specific first) means, in certificate order.

    >>> name = parse_dn("CN=alice,OU=dba,O=Example")
    >>> [a.value for a in name]
    ['Example', 'dba', 'alice']
    >>> name.rfc4514_string()
    'CN=alice,OU=dba,O=Example'

    Raises:
        InputError: the string is not a DN, names an attribute not known here, or has no CN.
    """
    try:
        name = x509.Name.from_rfc4514_string(text.strip(), _PARSE)
    except ValueError as exc:
        why = str(exc) or (
            "an attribute not known here, or a character such as a quote that must be "
            "escaped with a backslash"
        )
        raise InputError(
            f"{what} {text!r} is not a distinguished name ({why}); write it as "
            "'CN=alice,OU=dba,O=Example'"
        ) from None
    if not name.get_attributes_for_oid(NameOID.COMMON_NAME):
        raise InputError(f"{what} {text!r} has no CN; the server compares the CN with the role")
    return name


def client_subject(role: str, subject: str | None = None) -> x509.Name:
    """A client's subject: ``CN=<role>``, or the DN ``subject`` gives.

    >>> client_subject("alice").rfc4514_string()
    'CN=alice'
    """
    if subject:
        return parse_dn(subject, what=f"the subject of role {role}")
    if not role.strip():
        raise InputError("a client has an empty role; name the role it logs in as")
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, role)])


def common_name(name: x509.Name) -> str | None:
    """The (last) CN of ``name``, as OpenSSL's lookup by NID returns it for the server."""
    cns = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(cns[-1].value) if cns else None


def rfc4514_dn(name: x509.Name) -> str:
    """RFC 4514, with ``emailAddress=`` rather than its dotted OID: the one way the records,
    ``pgtls watch`` and ``pgtls probe`` print a name (``postgres/wire.py``'s ``rfc4514`` gives the
    same string from OpenSSL's decoding, where cryptography is not loaded)."""
    return name.rfc4514_string({NameOID.EMAIL_ADDRESS: "emailAddress"})


def _escape(value: str, *, high: bool) -> str:
    """RFC 2253 escaping as OpenSSL's ``ASN1_STRFLGS_RFC2253`` does it (``high``: bytes
    above 0x7f as ``\\XX``, as ``ESC_MSB`` asks)."""
    out = []
    last = len(value) - 1
    for i, ch in enumerate(value):
        code = ord(ch)
        if ch in ',+"\\<>;' or (i == 0 and ch in "# ") or (i == last and ch == " "):
            out.append("\\" + ch)
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\{code:02X}")
        elif code > 0x7F and high:
            out.append("".join(f"\\{b:02X}" for b in ch.encode()))
        else:
            out.append(ch)
    return "".join(out)


def _label(attr: x509.NameAttribute[str | bytes]) -> str:
    return _SHORT.get(attr.oid) or attr.oid.dotted_string


def _text(attr: x509.NameAttribute[str | bytes]) -> str:
    value = attr.value
    return value if isinstance(value, str) else value.hex()


def hba_dn(name: x509.Name) -> str:
    """The subject as a ``clientname=DN`` line (or its ``pg_ident.conf`` map) must match it:
    OpenSSL's ``XN_FLAG_RFC2253`` printing, most specific first.

    >>> hba_dn(parse_dn("CN=alice,OU=dba,O=Example"))
    'CN=alice,OU=dba,O=Example'
    >>> hba_dn(parse_dn("CN=J\\\\, Doe,O=Exämple"))
    'CN=J\\\\, Doe,O=Ex\\\\C3\\\\A4mple'
    """
    # OpenSSL reverses the list of attributes, so those of a multi-valued RDN too
    rdns = []
    for rdn in reversed(name.rdns):
        attrs = reversed(list(rdn))
        rdns.append("+".join(f"{_label(a)}={_escape(_text(a), high=True)}" for a in attrs))
    return ",".join(rdns)


def stat_ssl_dn(name: x509.Name) -> str:
    """The subject as ``pg_stat_ssl.client_dn`` shows it: certificate order, ``/`` before each
    attribute, UTF-8 kept, cut at the 63 bytes the server keeps.

    >>> stat_ssl_dn(parse_dn("CN=alice,OU=dba,O=Example"))
    '/O=Example/OU=dba/CN=alice'
    """
    text = "".join(f"/{_label(a)}={_escape(_text(a), high=False)}" for a in name)
    raw = text.encode()
    if len(raw) <= _STAT_SSL_BYTES:
        return text
    return raw[:_STAT_SSL_BYTES].decode(errors="ignore")


def _ekus(cert: x509.Certificate) -> list[x509.ObjectIdentifier] | None:
    try:
        return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return None


def client_auth_problem(cert: x509.Certificate) -> str | None:
    """Why this certificate is not one a client may log in with (None: it is).

    The runbook asks for the clientAuth extended key usage. A certificate whose extended key
    usage leaves clientAuth out (a server's certificate, serverAuth only) is refused by the
    server's OpenSSL in the handshake, and libpq reports it as the server's alert
    ``sslv3 alert unsupported certificate``. A key usage without digitalSignature (or
    keyAgreement) is refused the same way.
    """
    ekus = _ekus(cert)
    if ekus is None:
        return (
            "it has no extendedKeyUsage, so nothing says it is meant for a client; ask the CA "
            "for a client certificate (extendedKeyUsage clientAuth)"
        )
    if ExtendedKeyUsageOID.CLIENT_AUTH not in ekus:
        usages = ", ".join(_eku_name(o) for o in ekus) or "none"
        return (
            f"its extendedKeyUsage is {usages}, without clientAuth, so the server refuses it in "
            f'the handshake (libpq: "{UNSUPPORTED_CERTIFICATE}"); ask the CA for a client '
            "certificate (extendedKeyUsage clientAuth)"
        )
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return None
    if not (usage.digital_signature or usage.key_agreement):
        return (
            "its keyUsage has neither digitalSignature nor keyAgreement, so the server refuses "
            f'it in the handshake (libpq: "{UNSUPPORTED_CERTIFICATE}"); ask the CA for a '
            "client certificate with digitalSignature"
        )
    return None


def _eku_name(oid: x509.ObjectIdentifier) -> str:
    names = {
        ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
        ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
        ExtendedKeyUsageOID.CODE_SIGNING: "codeSigning",
        ExtendedKeyUsageOID.EMAIL_PROTECTION: "emailProtection",
        ExtendedKeyUsageOID.TIME_STAMPING: "timeStamping",
        ExtendedKeyUsageOID.OCSP_SIGNING: "OCSPSigning",
        ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE: "anyExtendedKeyUsage",
    }
    return names.get(oid, oid.dotted_string)


def subject_problem(cert: x509.Certificate, wanted: x509.Name) -> str | None:
    """Why the certificate's subject is not the one the parameters ask for (None: it is).

    A CA may reorder or drop attributes; the server then sees another DN (and, for a lost or
    changed CN, another user), so anything but the same name is refused.
    """
    if cert.subject == wanted:
        return None
    have_cn, want_cn = common_name(cert.subject), common_name(wanted)
    if have_cn != want_cn:
        return (
            f"its CN is {have_cn!r}, not {want_cn!r}, so the server would take it for another "
            "user; ask the CA to keep the CSR's subject"
        )
    return (
        f"its subject is {rfc4514_dn(cert.subject)}, not {rfc4514_dn(wanted)} as asked, so a "
        "clientname=DN line or map would not match; ask the CA to keep the CSR's subject, or "
        "change the client's subject to what the CA issues"
    )


def build_client_csr(name: x509.Name, key: PrivateKey) -> x509.CertificateSigningRequest:
    """A client's CSR: the subject alone, signed with SHA-256 (no SANs: the server reads the
    subject only)."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(name)
    return builder.sign(key, hashes.SHA256())  # type: ignore[arg-type]


def pkcs8_der(key: PrivateKey) -> bytes:
    """The key as unencrypted PKCS#8 DER, the ``postgresql.pk8`` pgjdbc reads."""
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def distinct(certs: Iterable[x509.Certificate]) -> list[x509.Certificate]:
    """``certs`` without repeats, in first-seen order (certificates compare by DER)."""
    return list(dict.fromkeys(certs))
