"""Throwaway certificates for tests: keys, CAs, chains, and the odd ones a CA sometimes returns.

Everything is built in memory with pyca/cryptography and written only when a test asks
(:func:`write_pem`, :func:`write_der`, :meth:`Issued.write_key`). Import it from any test as
``import certfactory`` (``tests/conftest.py`` puts this directory on ``sys.path``).

Typical use::

    chain = certfactory.make_chain(leaf_cn="db1.example.com")    # root -> one intermediate -> leaf
    chain.leaf.cert, chain.leaf.key, chain.root.cert, chain.intermediates[0].cert
    certfactory.write_pem(tmp_path / "bundle.pem", *chain.leaf_first())

    art = certfactory.article_chain()  # RootCA -> IntermediateCA_BAR -> IntermediateCA_FOO -> leaf
    decoy = certfactory.decoy_of(art.intermediates[0])   # same subject name, different key

    root = certfactory.make_ca("Test Root")
    leaf = certfactory.issue("db1.example.com", issuer=root, expired=True)
    old = certfactory.issue("db1.example.com", issuer=root, hash_name="sha1", key_type="rsa2048")

Key types: ``rsa1024`` (for weak-key checks), ``rsa2048``, ``rsa3072``, ``rsa4096``,
``ecdsa-p256`` (the default: fast), ``ecdsa-p384``, ``ed25519``.

cryptography refuses to sign with SHA-1 or MD5, so :func:`issue` with ``hash_name="sha1"`` or
``"md5"`` signs with SHA-256 first and then re-signs the to-be-signed bytes with the old digest
(RSA issuers only); the result is a well-formed certificate whose ``signature_hash_algorithm``
is SHA-1 (or MD5) and whose signature verifies with ``openssl verify -auth_level 0``. Note that
cryptography's ``cert.verify_directly_issued_by()`` raises ``ValueError("Unsupported signature
algorithm")`` for those, not ``InvalidSignature``. :func:`tamper_signature` makes a certificate
whose signature does not verify at all.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "KEY_TYPES",
    "Chain",
    "Issued",
    "PrivateKey",
    "article_chain",
    "decoy_of",
    "issue",
    "make_ca",
    "make_chain",
    "make_key",
    "name",
    "pem",
    "tamper_signature",
    "write_der",
    "write_pem",
]

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey

KEY_TYPES = ("rsa1024", "rsa2048", "rsa3072", "rsa4096", "ecdsa-p256", "ecdsa-p384", "ed25519")

UTC = _dt.UTC


def make_key(key_type: str = "ecdsa-p256") -> PrivateKey:
    """A fresh private key of one of :data:`KEY_TYPES`."""
    if key_type.startswith("rsa"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[3:]))
    if key_type == "ecdsa-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ecdsa-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unknown key type {key_type!r}; one of {', '.join(KEY_TYPES)}")


def name(cn: str | None = None, **attrs: str) -> x509.Name:
    """An ``x509.Name``; keywords are ``NameOID`` members in lower case (``organization_name``).

    >>> name("db1.example.com", organization_name="Example").rfc4514_string()
    'CN=db1.example.com,O=Example'
    >>> name().rfc4514_string()
    ''
    """
    parts = [x509.NameAttribute(getattr(NameOID, k.upper()), v) for k, v in attrs.items()]
    if cn is not None:
        parts.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(parts)


@dataclass(frozen=True)
class Issued:
    """A certificate and the private key of its subject."""

    cert: x509.Certificate
    key: PrivateKey = field(repr=False)

    @property
    def subject(self) -> x509.Name:
        return self.cert.subject

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def cert_der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    def key_pem(self, passphrase: bytes | None = None, *, traditional: bool = False) -> bytes:
        """The private key as PEM: PKCS#8 by default, ``traditional=True`` for "BEGIN RSA/EC"."""
        enc: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(passphrase)
            if passphrase
            else serialization.NoEncryption()
        )
        fmt = (
            serialization.PrivateFormat.TraditionalOpenSSL
            if traditional
            else serialization.PrivateFormat.PKCS8
        )
        return self.key.private_bytes(serialization.Encoding.PEM, fmt, enc)

    def write_cert(self, path: Path | str) -> Path:
        return write_pem(path, self.cert)

    def write_key(self, path: Path | str, passphrase: bytes | None = None) -> Path:
        p = Path(path)
        p.write_bytes(self.key_pem(passphrase))
        p.chmod(0o600)
        return p


@dataclass(frozen=True)
class Chain:
    """``root`` -> ``intermediates`` (in signing order, root side first) -> ``leaf``."""

    root: Issued
    intermediates: tuple[Issued, ...]
    leaf: Issued

    def leaf_first(self, *, with_root: bool = True) -> list[x509.Certificate]:
        """Leaf, then intermediates nearest the leaf first, then (unless told not to) the root."""
        certs = [self.leaf.cert] + [i.cert for i in reversed(self.intermediates)]
        return certs + [self.root.cert] if with_root else certs

    def root_first(self) -> list[x509.Certificate]:
        return list(reversed(self.leaf_first()))

    @property
    def issuer_of_leaf(self) -> Issued:
        return self.intermediates[-1] if self.intermediates else self.root


def issue(
    subject: str | x509.Name | None,
    *,
    issuer: Issued | None = None,
    key: PrivateKey | None = None,
    key_type: str = "ecdsa-p256",
    is_ca: bool = False,
    path_length: int | None = None,
    basic_constraints: bool = True,
    key_usage: bool = True,
    sans: Sequence[str] | None = None,
    eku: Sequence[x509.ObjectIdentifier] | None = None,
    not_before: _dt.datetime | None = None,
    not_after: _dt.datetime | None = None,
    days: int = 365,
    expired: bool = False,
    not_yet_valid: bool = False,
    hash_name: str = "sha256",
    ski: bool = True,
    aki: bool = True,
    serial: int | None = None,
    extra_extensions: Iterable[tuple[x509.ExtensionType, bool]] = (),
) -> Issued:
    """Issue one certificate.

    Args:
        subject: a CN string (``name(cn)``), a full ``x509.Name``, or ``None`` for an empty name.
        issuer: the signing CA; ``None`` makes the certificate self-signed.
        key: the subject's key; a fresh ``key_type`` key when ``None``.
        is_ca: BasicConstraints ``ca=True`` (with ``path_length``) and CA key usage.
        basic_constraints: ``False`` leaves the BasicConstraints extension out entirely
            (a "CA" that is not a CA).
        key_usage: ``False`` leaves KeyUsage out.
        sans: DNS names and IP literals for a SubjectAlternativeName (``None``: no extension;
            an IP literal becomes an ``IPAddress`` entry).
        eku: ExtendedKeyUsage OIDs (``None``: no extension, which TLS stacks read as "any
            use"; :func:`make_chain` gives its leaf ``[SERVER_AUTH]`` by default).
        not_before, not_after: explicit validity (timezone-aware); otherwise
            ``now - 1 day`` .. ``now + days``.
        expired: validity ended yesterday (started ``days`` before that).
        not_yet_valid: validity starts in ten days.
        hash_name: ``sha256``, ``sha384``, ``sha512``, or ``sha1``/``md5`` (RSA issuers only).
        ski, aki: include SubjectKeyIdentifier / AuthorityKeyIdentifier.
        serial: the serial number; random when ``None``.
        extra_extensions: further ``(extension, critical)`` pairs.
    """
    key = key if key is not None else make_key(key_type)
    subj = subject if isinstance(subject, x509.Name) else name(subject)
    signer_key = issuer.key if issuer else key
    issuer_name = issuer.cert.subject if issuer else subj
    now = _dt.datetime.now(UTC).replace(microsecond=0)
    if expired:
        nb, na = now - _dt.timedelta(days=days + 1), now - _dt.timedelta(days=1)
    elif not_yet_valid:
        nb, na = now + _dt.timedelta(days=10), now + _dt.timedelta(days=10 + days)
    else:
        nb, na = now - _dt.timedelta(days=1), now + _dt.timedelta(days=days)
    nb = not_before or nb
    na = not_after or na

    b = (
        x509.CertificateBuilder()
        .subject_name(subj)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(serial if serial is not None else x509.random_serial_number())
        .not_valid_before(nb)
        .not_valid_after(na)
    )
    if basic_constraints:
        b = b.add_extension(
            x509.BasicConstraints(ca=is_ca, path_length=path_length if is_ca else None),
            critical=True,
        )
    if key_usage:
        b = b.add_extension(
            x509.KeyUsage(
                digital_signature=not is_ca,
                content_commitment=False,
                key_encipherment=(not is_ca) and isinstance(key, rsa.RSAPrivateKey),
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=is_ca,
                crl_sign=is_ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    if sans is not None:
        b = b.add_extension(x509.SubjectAlternativeName(_general_names(sans)), critical=False)
    if eku is not None:
        b = b.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    if ski:
        b = b.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
    if aki:
        b = b.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_key.public_key()),
            critical=False,
        )
    for ext, critical in extra_extensions:
        b = b.add_extension(ext, critical=critical)

    cert = _sign(b, signer_key, hash_name)
    return Issued(cert=cert, key=key)


def make_ca(
    subject: str | x509.Name,
    *,
    issuer: Issued | None = None,
    key_type: str = "ecdsa-p256",
    **kwargs: object,
) -> Issued:
    """A CA certificate: self-signed root when ``issuer`` is ``None``, else an intermediate.

    Further keyword arguments go to :func:`issue` (``basic_constraints=False``, ``expired=True``…).
    """
    kwargs.setdefault("days", 3650)
    return issue(subject, issuer=issuer, key_type=key_type, is_ca=True, **kwargs)  # type: ignore[arg-type]


SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH
CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH


def make_chain(
    *,
    leaf_cn: str | None = "db1.example.com",
    leaf_sans: Sequence[str] | None = ("db1.example.com",),
    intermediates: Sequence[str] = ("Test Intermediate CA",),
    root_name: str = "Test Root CA",
    key_type: str = "ecdsa-p256",
    leaf_key_type: str | None = None,
    leaf_key: PrivateKey | None = None,
    **leaf_kwargs: object,
) -> Chain:
    """Root -> each name in ``intermediates`` in turn -> a server leaf.

    ``leaf_kwargs`` go to :func:`issue` for the leaf only (``expired=True``, ``eku=[...]``,
    ``hash_name="sha1"``…). The leaf gets ``eku=[serverAuth]`` unless told otherwise.
    """
    root = make_ca(root_name, key_type=key_type)
    chain: list[Issued] = []
    parent = root
    for inter in intermediates:
        parent = make_ca(inter, issuer=parent, key_type=key_type)
        chain.append(parent)
    leaf_kwargs.setdefault("eku", [SERVER_AUTH])
    leaf = issue(
        leaf_cn,
        issuer=parent,
        key=leaf_key,
        key_type=leaf_key_type or key_type,
        sans=leaf_sans,
        **leaf_kwargs,  # type: ignore[arg-type]
    )
    return Chain(root=root, intermediates=tuple(chain), leaf=leaf)


def article_chain(
    leaf_cn: str = "db1.example.com", *, key_type: str = "ecdsa-p256", **leaf_kwargs: object
) -> Chain:
    """The article's shape: root -> IntermediateCA_BAR -> IntermediateCA_FOO -> server."""
    return make_chain(
        leaf_cn=leaf_cn,
        leaf_sans=(leaf_cn,),
        intermediates=("IntermediateCA_BAR", "IntermediateCA_FOO"),
        root_name="RootCA",
        key_type=key_type,
        **leaf_kwargs,  # type: ignore[arg-type]
    )


def decoy_of(ca: Issued, *, issuer: Issued | None = None, key_type: str = "ecdsa-p256") -> Issued:
    """A CA with exactly ``ca``'s subject name but a different key.

    Self-signed when ``issuer`` is ``None``; otherwise signed by ``issuer`` (pass the real
    issuer of ``ca`` to make a decoy that even chains upwards).
    """
    return make_ca(ca.cert.subject, issuer=issuer, key_type=key_type)


def pem(*certs: x509.Certificate | Issued) -> bytes:
    """Certificates concatenated as PEM."""
    return b"".join(
        (c.cert if isinstance(c, Issued) else c).public_bytes(serialization.Encoding.PEM)
        for c in certs
    )


def write_pem(path: Path | str, *certs: x509.Certificate | Issued, crlf: bool = False) -> Path:
    """Write certificates as one PEM file (``crlf=True`` for Windows line endings)."""
    data = pem(*certs)
    if crlf:
        data = data.replace(b"\n", b"\r\n")
    p = Path(path)
    p.write_bytes(data)
    return p


def write_der(path: Path | str, cert: x509.Certificate | Issued) -> Path:
    p = Path(path)
    p.write_bytes(
        (cert.cert if isinstance(cert, Issued) else cert).public_bytes(serialization.Encoding.DER)
    )
    return p


def tamper_signature(cert: x509.Certificate | Issued) -> x509.Certificate:
    """The same certificate with one bit of its signature flipped (a "bad-signature" case)."""
    der = bytearray(
        (cert.cert if isinstance(cert, Issued) else cert).public_bytes(serialization.Encoding.DER)
    )
    der[-1] ^= 0x01
    return x509.load_der_x509_certificate(bytes(der))


# --- internals -------------------------------------------------------------------------------


def _general_names(sans: Sequence[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for s in sans:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(s)))
        except ValueError:
            out.append(x509.DNSName(s))
    return out


_HASHES: dict[str, hashes.SHA256 | hashes.SHA384 | hashes.SHA512] = {
    "sha256": hashes.SHA256(),
    "sha384": hashes.SHA384(),
    "sha512": hashes.SHA512(),
}

# DER of the AlgorithmIdentifier OIDs (same length, so a byte swap keeps every length valid).
_OID_SHA256_RSA = bytes.fromhex("06092a864886f70d01010b")
_OID_OLD_RSA = {
    "sha1": (bytes.fromhex("06092a864886f70d010105"), hashes.SHA1()),
    "md5": (bytes.fromhex("06092a864886f70d010104"), hashes.MD5()),
}


def _sign(b: x509.CertificateBuilder, signer: PrivateKey, hash_name: str) -> x509.Certificate:
    if isinstance(signer, ed25519.Ed25519PrivateKey):
        return b.sign(signer, None)
    if hash_name in _HASHES:
        return b.sign(signer, _HASHES[hash_name])
    if hash_name not in _OID_OLD_RSA or not isinstance(signer, rsa.RSAPrivateKey):
        raise ValueError(f"cannot sign with {hash_name!r} using {type(signer).__name__}")
    oid, algo = _OID_OLD_RSA[hash_name]
    modern = b.sign(signer, hashes.SHA256())
    tbs = modern.tbs_certificate_bytes
    if tbs.count(_OID_SHA256_RSA) != 1:
        raise ValueError("unexpected to-be-signed layout")
    tbs = tbs.replace(_OID_SHA256_RSA, oid)
    sig = signer.sign(tbs, padding.PKCS1v15(), algo)
    alg_id = _der(0x30, oid + b"\x05\x00")
    der = _der(0x30, tbs + alg_id + _der(0x03, b"\x00" + sig))
    return x509.load_der_x509_certificate(der)


def _der(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + body


def csr_for(cn: str, names: Sequence[str]) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """A P-256 key and a PEM CSR for ``cn`` with ``names`` (IP addresses or DNS names) as SANs."""
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for n in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, csr.public_bytes(serialization.Encoding.PEM)
