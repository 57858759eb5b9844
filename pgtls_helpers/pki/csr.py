"""Certificate signing requests: build, load, render readably, and write with the key.

A CSR carries the subject, the SANs and the public key, signed with the private key to prove
possession. The "challenge password" an interactive ``openssl req`` asks for is a CSR attribute
meant for revocation requests at some CAs; it is not the key's passphrase and PostgreSQL has no
use for it, so :func:`build_csr` leaves it out unless a CA's process asks for one.
"""

from __future__ import annotations

import contextlib
import hashlib

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed448, ed25519
from cryptography.x509.oid import AttributeOID, NameOID

from pgtls_helpers.errors import InputError
from pgtls_helpers.pki.keys import (
    PrivateKey,
    describe_key,
    key_size_bits,
)
from pgtls_helpers.pki.subject import SUBJECT_FIELDS, Subject

__all__ = [
    "build_csr",
    "csr_pem",
    "format_name",
    "load_csr",
    "render_csr",
    "spki_sha256",
]

_EXTENSION_REQUEST = x509.ObjectIdentifier("1.2.840.113549.1.9.14")

KEY_FILE = "server.key"
CSR_FILE = "server.csr"

# openssl's short names: the subject fields of a server CSR, and two that CA names carry
_SHORT_NAMES = {
    **{f.oid: f.short for f in SUBJECT_FIELDS},
    NameOID.DOMAIN_COMPONENT: "DC",
    NameOID.SERIAL_NUMBER: "serialNumber",
}


def build_csr(
    subject: Subject, key: PrivateKey, *, challenge_password: bytes | None = None
) -> x509.CertificateSigningRequest:
    """A CSR for ``subject`` signed by ``key`` (SHA-256 for RSA and ECDSA).

    The subject's SANs (the CN included) go into a non-critical SubjectAlternativeName
    extension. A challenge password attribute is added only when given: PostgreSQL cannot use
    it, and it travels to the CA in clear text inside the CSR.

    Raises:
        InputError: a subject field is out of bounds (the subject is re-checked here).
    """
    checked = subject.validate(for_verify_full=False)
    builder = x509.CertificateSigningRequestBuilder().subject_name(checked.to_x509_name())
    san = checked.san_extension()
    if len(san):
        builder = builder.add_extension(san, critical=False)
    if challenge_password is not None:
        builder = builder.add_attribute(AttributeOID.CHALLENGE_PASSWORD, challenge_password)
    algorithm = (
        None
        if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey)
        else hashes.SHA256()
    )
    return builder.sign(key, algorithm)  # type: ignore[arg-type]


def load_csr(data: bytes, source: str = "CSR") -> x509.CertificateSigningRequest:
    """Load a CSR from PEM (text around the block, as ``openssl req -text`` writes, is fine) or DER.

    Raises:
        InputError: ``data`` is not a CSR; the message names ``source`` and what it is instead.
    """
    if not data.strip():
        raise InputError(f"{source} is empty; it should hold a certificate signing request.")
    try:
        if b"-----BEGIN" in data:
            if b"CERTIFICATE REQUEST-----" not in data:
                raise InputError(f"{source} {_not_a_csr_reason(data)}.")
            return x509.load_pem_x509_csr(data)
        return x509.load_der_x509_csr(data)
    except ValueError as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"{source} {_not_a_csr_reason(data)}.") from exc


def csr_pem(csr: x509.CertificateSigningRequest) -> bytes:
    """The CSR as PEM, the form CAs ask for."""
    return csr.public_bytes(serialization.Encoding.PEM)


def spki_sha256(public_key: object) -> str:
    """SHA-256 of the DER SubjectPublicKeyInfo in lower-case hex.

    The same value as ``openssl pkey -in server.key -pubout -outform DER | sha256sum``, so the
    key and the CSR (and later the certificate) can be matched by eye.
    """
    der = public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def format_name(name: x509.Name) -> str:
    """A name the way ``openssl -subject`` prints it, in certificate order.

    >>> from pgtls_helpers.pki.subject import make_subject
    >>> format_name(make_subject("db1.example.com", country="DE").to_x509_name())
    'C=DE, CN=db1.example.com'
    """
    parts = []
    for rdn in name.rdns:
        for attr in rdn:
            label = _SHORT_NAMES.get(attr.oid) or attr.oid.dotted_string
            value = attr.value if isinstance(attr.value, str) else attr.value.hex()
            parts.append(f"{label}={value}")
    return ", ".join(parts)


def render_csr(csr: x509.CertificateSigningRequest) -> str:
    """The parts of ``openssl req -text`` that matter, one per line."""
    rows: list[tuple[str, str]] = [("Subject", format_name(csr.subject) or "(empty)")]
    try:
        public = csr.public_key()
        name, bits = describe_key(public), key_size_bits(public)
        size = f"{name} bits" if name.endswith(f" {bits}") else f"{name} ({bits} bits)"
        rows.append(("Public key", size))
        spki = spki_sha256(public)
    except UnsupportedAlgorithm:
        rows.append(("Public key", "(a key type not supported here)"))
        spki = "(unknown key type)"
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        rows.append(("Subject alt names", ", ".join(_general_name(g) for g in san) or "(none)"))
    except x509.ExtensionNotFound:
        rows.append(("Subject alt names", "(none; clients will compare the CN)"))
    others = [
        _oid_name(ext.oid)
        for ext in csr.extensions
        if not isinstance(ext.value, x509.SubjectAlternativeName)
    ]
    if others:
        rows.append(("Other extensions", ", ".join(others)))
    attrs = []
    for attr in csr.attributes:
        if attr.oid == AttributeOID.CHALLENGE_PASSWORD:
            attrs.append("challengePassword (set; PostgreSQL does not use it)")
        elif attr.oid != _EXTENSION_REQUEST:  # the extensions, shown above
            attrs.append(_oid_name(attr.oid))
    rows.append(("Attributes", ", ".join(attrs) if attrs else "none (no challenge password)"))
    rows.append(("Signature algorithm", _signature_algorithm_name(csr)))
    rows.append(("Signature valid", "yes" if _signature_valid(csr) else "NO"))
    rows.append(("SPKI SHA-256", spki))
    width = max(len(label) for label, _ in rows) + 2
    lines = ["Certificate signing request"]
    lines += [f"  {label + ':':<{width}}{value}" for label, value in rows]
    return "\n".join(lines)


# --- internals -------------------------------------------------------------------------------


def _general_name(g: x509.GeneralName) -> str:
    if isinstance(g, x509.DNSName):
        return f"DNS:{g.value}"
    if isinstance(g, x509.IPAddress):
        return f"IP:{g.value}"
    if isinstance(g, x509.RFC822Name):
        return f"email:{g.value}"
    if isinstance(g, x509.UniformResourceIdentifier):
        return f"URI:{g.value}"
    return type(g).__name__


def _oid_name(oid: x509.ObjectIdentifier) -> str:
    name = oid._name
    return name if name and name != "Unknown OID" else oid.dotted_string


def _signature_algorithm_name(csr: x509.CertificateSigningRequest) -> str:
    return _oid_name(csr.signature_algorithm_oid)


def _signature_valid(csr: x509.CertificateSigningRequest) -> bool:
    try:
        return bool(csr.is_signature_valid)
    except (UnsupportedAlgorithm, ValueError, InvalidSignature):
        return False


def _not_a_csr_reason(data: bytes) -> str:
    if b"CERTIFICATE-----" in data:
        return "is a certificate, not a certificate signing request"
    if b"PRIVATE KEY-----" in data:
        return "is a private key, not a certificate signing request"
    head = data.lstrip()[:512].lower()
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head:
        return "looks like an HTML page, not a certificate signing request"
    if data[:1] == b"\x30":
        with contextlib.suppress(ValueError):
            x509.load_der_x509_certificate(data)
            return "is a certificate, not a certificate signing request"
    return "is not a PEM or DER certificate signing request"
