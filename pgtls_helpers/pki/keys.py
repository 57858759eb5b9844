"""Private keys: generate, serialize, load, describe, and match against a certificate.

Key bytes and passphrases never appear in messages: errors name the file and what to do.
:func:`write_private_key` is the one function here that touches the filesystem; it creates the
file with mode 0600 from its first byte and never leaves a half-written key behind.

>>> key = generate_key("ecdsa-p256")
>>> describe_key(key.public_key()), key_size_bits(key.public_key())
('ECDSA P-256', 256)
>>> pem = serialize_key(key, b"secret")
>>> is_encrypted_pem(pem), b"secret" in pem
(True, False)
>>> describe_key(load_key(pem, b"secret").public_key())
'ECDSA P-256'
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
from typing import TypeAlias, cast

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa, x448, x25519
from cryptography.hazmat.primitives.asymmetric.types import (
    PrivateKeyTypes,
    PublicKeyTypes,
)

from pgtls_helpers.errors import InputError

__all__ = [
    "KEY_TYPES",
    "PrivateKey",
    "PublicKey",
    "describe_key",
    "generate_key",
    "is_encrypted_pem",
    "key_size_bits",
    "load_key",
    "passphrase_from_env",
    "public_key_matches",
    "serialize_key",
]

PrivateKey: TypeAlias = PrivateKeyTypes
PublicKey: TypeAlias = PublicKeyTypes

KEY_TYPES = ("rsa2048", "rsa3072", "rsa4096", "ecdsa-p256", "ecdsa-p384")

_CURVES: dict[str, type[ec.EllipticCurve]] = {
    "ecdsa-p256": ec.SECP256R1,
    "ecdsa-p384": ec.SECP384R1,
}
_CURVE_NAMES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----", re.DOTALL)
_KEY_LABELS = (
    b"PRIVATE KEY",
    b"ENCRYPTED PRIVATE KEY",
    b"RSA PRIVATE KEY",
    b"EC PRIVATE KEY",
    b"DSA PRIVATE KEY",
)


def generate_key(key_type: str = "rsa4096") -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    """A new private key of one of :data:`KEY_TYPES` (RSA 4096 as the article uses).

    Raises:
        InputError: ``key_type`` is not one of :data:`KEY_TYPES`.
    """
    if key_type in _CURVES:
        return ec.generate_private_key(_CURVES[key_type]())
    if key_type in KEY_TYPES:
        return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[3:]))
    raise InputError(f"Key type {key_type!r} is not supported; use one of {', '.join(KEY_TYPES)}.")


def serialize_key(key: PrivateKey, passphrase: bytes | None = None) -> bytes:
    """PKCS#8 PEM; encrypted with the best available scheme when a passphrase is given."""
    if passphrase is not None and not passphrase:
        raise InputError("The key passphrase is empty; set a non-empty passphrase or none at all.")
    enc: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)


def is_encrypted_pem(data: bytes) -> bool:
    """True when ``data`` holds a passphrase-protected PEM private key (PKCS#8 or OpenSSL style).

    >>> is_encrypted_pem(b"RSA PRIVATE KEY-----\\nProc-Type: 4,ENCRYPTED\\n")
    True
    >>> is_encrypted_pem(b"PRIVATE KEY-----\\nMIIE")
    False
    """
    if b"BEGIN ENCRYPTED PRIVATE KEY-----" in data:
        return True
    return b"PRIVATE KEY-----" in data and b"Proc-Type: 4,ENCRYPTED" in data


def load_key(
    data: bytes, passphrase: bytes | None = None, source: str = "key", *, validate: bool = True
) -> PrivateKey:
    """Load a private key from PEM (text around the block is fine) or DER.

    Args:
        data: the file's bytes.
        passphrase: for an encrypted key; ignored when the key is not encrypted.
        source: the file name used in error messages.
        validate: check an RSA key's private numbers (about a quarter of a second for RSA
            4096). Only comparing public halves, as key matching does, needs no such check.

    Raises:
        InputError: the data is not a usable private key, is encrypted and no (or the wrong)
            passphrase was given; the message names ``source``.
    """
    if not data.strip():
        raise InputError(f"{source} is empty; it should hold the server's private key.")
    skip = not validate
    if b"-----BEGIN" in data:
        block = _first_key_pem(data)
        if block is None:
            raise InputError(f"{source} {_not_a_key_reason(data)}.")
        encrypted = is_encrypted_pem(block)
        if encrypted and not passphrase:
            raise InputError(_encrypted_message(source))
        try:
            return serialization.load_pem_private_key(
                block, passphrase if encrypted else None, unsafe_skip_rsa_key_validation=skip
            )
        except ValueError as exc:
            if encrypted:
                raise InputError(_wrong_passphrase_message(source)) from exc
            raise InputError(f"{source} holds a private key block that is damaged.") from exc
        except UnsupportedAlgorithm as exc:
            raise InputError(f"{source} holds a private key of a type not supported here.") from exc
    try:
        return serialization.load_der_private_key(data, None, unsafe_skip_rsa_key_validation=skip)
    except TypeError as exc:  # DER EncryptedPrivateKeyInfo
        if not passphrase:
            raise InputError(_encrypted_message(source)) from exc
        try:
            return serialization.load_der_private_key(
                data, passphrase, unsafe_skip_rsa_key_validation=skip
            )
        except (ValueError, TypeError) as exc2:
            raise InputError(_wrong_passphrase_message(source)) from exc2
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise InputError(f"{source} {_not_a_key_reason(data)}.") from exc


def public_key_matches(key_or_public_key: PrivateKey | PublicKey, cert: x509.Certificate) -> bool:
    """True when ``cert`` carries the public half of the key (any key type).

    The article compares RSA moduli; comparing the whole SubjectPublicKeyInfo covers every key
    type and the exponent too.
    """
    public = _public(key_or_public_key)
    try:
        theirs = cert.public_key()
    except (UnsupportedAlgorithm, ValueError):
        return False
    return _spki(public) == _spki(theirs)


def describe_key(public_key: PublicKey | PrivateKey) -> str:
    """A short human name: "RSA 4096", "ECDSA P-256", "Ed25519".

    >>> describe_key(generate_key("ecdsa-p384"))
    'ECDSA P-384'
    """
    key = _public(public_key)
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"ECDSA {_CURVE_NAMES.get(key.curve.name, key.curve.name)}"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    if isinstance(key, ed448.Ed448PublicKey):
        return "Ed448"
    if isinstance(key, dsa.DSAPublicKey):
        return f"DSA {key.key_size}"
    if isinstance(key, x25519.X25519PublicKey):
        return "X25519"
    if isinstance(key, x448.X448PublicKey):
        return "X448"
    return type(key).__name__


def key_size_bits(public_key: PublicKey | PrivateKey) -> int:
    """The key size in bits (RSA modulus, curve size; 256 for Ed25519, 456 for Ed448)."""
    key = _public(public_key)
    if isinstance(key, rsa.RSAPublicKey | dsa.DSAPublicKey):
        return int(key.key_size)
    if isinstance(key, ec.EllipticCurvePublicKey):
        return int(key.curve.key_size)
    if isinstance(key, ed25519.Ed25519PublicKey | x25519.X25519PublicKey):
        return 256
    if isinstance(key, ed448.Ed448PublicKey):
        return 456
    if isinstance(key, x448.X448PublicKey):
        return 448
    return 0


def passphrase_from_env(var_name: str) -> bytes:
    """The passphrase held in environment variable ``var_name``, as UTF-8 bytes.

    Raises:
        InputError: the variable is not set or empty (the message names it, never a value).
    """
    value = os.environ.get(var_name)
    if not value:
        state = "is empty" if value == "" else "is not set"
        raise InputError(
            f"The environment variable {var_name} {state}; export it with the passphrase "
            "before running this step."
        )
    return value.encode("utf-8")


def passphrase_from_prompt(prompt: str = "Key passphrase: ") -> bytes:
    """Ask for a new passphrase twice on the terminal, without echo.

    Raises:
        InputError: no terminal, an empty answer, or the two answers differ.
    """
    import getpass
    import sys

    if not sys.stdin.isatty():
        raise InputError(
            "A passphrase prompt needs a terminal; give the passphrase through an environment "
            "variable (--passphrase-env) instead."
        )
    first = getpass.getpass(prompt)
    if not first:
        raise InputError("The passphrase is empty; leave the key unencrypted or type one.")
    if getpass.getpass("Again: ") != first:
        raise InputError("The two passphrases differ; nothing was written, try again.")
    return first.encode("utf-8")


# --- internals -------------------------------------------------------------------------------


def _public(key: PrivateKey | PublicKey) -> PublicKey:
    if hasattr(key, "private_bytes"):
        return cast(PrivateKey, key).public_key()
    return cast(PublicKey, key)


def _spki(public_key: PublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _encrypted_message(source: str) -> str:
    return (
        f"{source} is encrypted; give the passphrase through --password-env or the "
        "environment variable named by key_passphrase_env."
    )


def _wrong_passphrase_message(source: str) -> str:
    return (
        f"{source}: the passphrase does not open this key; check the environment variable "
        "that holds it."
    )


def _first_key_pem(data: bytes) -> bytes | None:
    for m in _PEM_BLOCK.finditer(data):
        if m.group(1) in _KEY_LABELS:
            return m.group(0).replace(b"\r\n", b"\n")
    return None


def _not_a_key_reason(data: bytes) -> str:
    labels = [m.group(1) for m in _PEM_BLOCK.finditer(data)]
    if b"CERTIFICATE" in labels or b"TRUSTED CERTIFICATE" in labels:
        return "is a certificate, not a private key"
    if b"CERTIFICATE REQUEST" in labels or b"NEW CERTIFICATE REQUEST" in labels:
        return "is a certificate signing request, not a private key"
    if b"PUBLIC KEY" in labels or b"RSA PUBLIC KEY" in labels:
        return "is a public key, not a private key"
    if b"OPENSSH PRIVATE KEY" in labels:
        return "is an OpenSSH key; PostgreSQL needs a PEM (PKCS#8 or PKCS#1) private key"
    if data[:1] == b"\x30":
        for loader, what in (
            (x509.load_der_x509_certificate, "is a certificate, not a private key"),
            (x509.load_der_x509_csr, "is a certificate signing request, not a private key"),
            (serialization.load_der_public_key, "is a public key, not a private key"),
        ):
            with contextlib.suppress(ValueError, UnsupportedAlgorithm):
                loader(data)
                return what
    head = data.lstrip()[:512].lower()
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head:
        return "looks like an HTML page, not a private key"
    if labels:
        return f"holds a PEM block labelled {labels[0].decode('ascii', 'replace')}, not a key"
    with contextlib.suppress(ValueError):
        base64.b64decode(data, validate=True)
        return "is base64 text without PEM header lines, not a private key"
    return "is not a PEM or DER private key"
