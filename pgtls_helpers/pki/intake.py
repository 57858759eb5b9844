"""Read whatever a CA returned: PEM, DER, PKCS#7, PKCS#12, or a directory of those.

Files are recognized by their content, never by their extension. PEM files may have text around
the blocks (``openssl x509 -text`` output, "Bag Attributes", a mail signature), CRLF line endings
and several certificates each; ``TRUSTED CERTIFICATE`` blocks are read too. A private key found
among the certificates is reported by its type and set aside; its bytes are never returned.
Anything unusable raises :class:`~pgtls_helpers.errors.InputError` with one sentence that names
the file and says what it looks like instead.

:func:`load_pool` reads large collections (a system trust store, a folder of intermediates)
leniently: unreadable files are counted, not fatal.

A little over 500 lines on purpose: the four formats share one accumulator and one set of
messages, and a reader follows one file from bytes to certificates here.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import re
import stat
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7, pkcs12
from cryptography.utils import CryptographyDeprecationWarning

from pgtls_helpers.errors import InputError
from pgtls_helpers.pki.keys import describe_key

__all__ = ["Intake", "PoolRead", "SourcedCert", "load_pool", "read_ca_response", "read_pool"]

MAX_FILE_BYTES = 10 * 1024 * 1024

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 .#]+)-----(.*?)-----END \1-----", re.DOTALL)
_CERT_LABELS = {b"CERTIFICATE", b"X509 CERTIFICATE", b"X.509 CERTIFICATE"}
_PKCS7_LABELS = {b"PKCS7", b"PKCS #7 SIGNED DATA", b"CMS"}
_KEY_LABELS = {
    b"PRIVATE KEY",
    b"ENCRYPTED PRIVATE KEY",
    b"RSA PRIVATE KEY",
    b"EC PRIVATE KEY",
    b"DSA PRIVATE KEY",
    b"OPENSSH PRIVATE KEY",
}
_OTHER_LABELS = {
    b"CERTIFICATE REQUEST": "a certificate signing request",
    b"NEW CERTIFICATE REQUEST": "a certificate signing request",
    b"X509 CRL": "a certificate revocation list",
    b"PUBLIC KEY": "a public key",
    b"RSA PUBLIC KEY": "a public key",
    b"EC PARAMETERS": "EC parameters",
    b"DH PARAMETERS": "DH parameters",
}
_NOT_A_FORMAT = "is not PEM, DER, PKCS#7 or PKCS#12"


@dataclass(frozen=True)
class SourcedCert:
    """A certificate and where it came from: ``"bundle.p7b#2"`` (the second in that file)."""

    cert: x509.Certificate
    source: str


@dataclass(frozen=True)
class Intake:
    """Everything read from a CA response, duplicates removed (by DER), in reading order.

    Attributes:
        certificates: the distinct certificates with their sources.
        duplicates: sources dropped because an earlier certificate had the same DER.
        private_keys: one sentence per private key found and set aside (type only).
        skipped: one sentence per file or object that was not a certificate.
    """

    certificates: tuple[SourcedCert, ...]
    duplicates: tuple[str, ...] = ()
    private_keys: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()

    @property
    def certs(self) -> list[x509.Certificate]:
        """Just the certificates, in reading order."""
        return [sc.cert for sc in self.certificates]

    def source_of(self, cert: x509.Certificate) -> str | None:
        """Where ``cert`` was read from, or ``None`` when it is not part of this intake."""
        return next((sc.source for sc in self.certificates if sc.cert == cert), None)


@dataclass(frozen=True)
class PoolRead:
    """A pool of candidate issuers: distinct certificates plus what could not be read."""

    certificates: tuple[x509.Certificate, ...]
    files: int = 0
    unreadable: tuple[str, ...] = ()


def read_ca_response(
    paths: Sequence[str | os.PathLike[str]], password: bytes | None = None
) -> Intake:
    """Read certificate files and directories as a CA returned them.

    Args:
        paths: files (any supported format) and directories (read non-recursively, sorted by
            name).
        password: opens PKCS#12 files; never appears in messages.

    Raises:
        InputError: a named file is missing, unreadable, or holds no certificate; a directory
            holds no certificate. The sentence names the file and what it looks like instead.
    """
    if not paths:
        raise InputError("No files were given; name the files or directory the CA returned.")
    acc = _Accumulator()
    with _quiet_loader_warnings():
        for raw in paths:
            name = os.fspath(raw)
            try:
                is_dir = stat.S_ISDIR(os.stat(name).st_mode)
            except FileNotFoundError:
                what = "is a broken symbolic link" if os.path.islink(name) else "does not exist"
                raise InputError(f"{name} {what}; check the path.") from None
            except OSError as exc:
                raise InputError(f"{name} cannot be read ({exc.strerror}).") from exc
            if is_dir:
                _read_directory(name, password, acc)
                continue
            try:
                parsed = _parse(_read(name), password)
            except _Unreadable as exc:
                raise InputError(f"{name} {exc.reason}.") from exc.__cause__
            if not parsed.certs:
                raise InputError(f"{name} {_no_certificate_reason(parsed)}.")
            acc.add(name, parsed)
    return acc.result()


def read_pool(paths: Iterable[str | os.PathLike[str]]) -> PoolRead:
    """Read a pool leniently: every certificate in every readable file, duplicates dropped.

    Directories are read non-recursively. Files that are not certificates (keys, CSRs, text,
    broken links) are counted in ``unreadable`` and otherwise ignored.
    """
    seen: dict[x509.Certificate, None] = {}
    unreadable: list[str] = []
    files = 0
    with _quiet_loader_warnings():
        for raw in paths:
            name = os.fspath(raw)
            if os.path.isdir(name):
                try:
                    entries = sorted(os.scandir(name), key=lambda e: e.name)
                except OSError:
                    unreadable.append(name)
                    continue
                targets = [e.path for e in entries if not _is_dir(e)]
            else:
                targets = [name]
            for target in targets:
                files += 1
                try:
                    certs = _pool_file_certs(_read(target))
                except _Unreadable:
                    unreadable.append(target)
                    continue
                if not certs:
                    unreadable.append(target)
                for cert in certs:
                    seen.setdefault(cert, None)
    return PoolRead(certificates=tuple(seen), files=files, unreadable=tuple(unreadable))


def load_pool(paths: Iterable[str | os.PathLike[str]]) -> list[x509.Certificate]:
    """The distinct certificates of :func:`read_pool`, in reading order."""
    return list(read_pool(paths).certificates)


# --- internals -------------------------------------------------------------------------------


class _Unreadable(Exception):
    """A file's content is not usable; ``reason`` completes "<file> ..."."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class _Parsed:
    certs: list[x509.Certificate] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)  # "an RSA 4096 private key"
    others: list[str] = field(default_factory=list)  # "a certificate signing request"


@dataclass
class _Accumulator:
    seen: dict[x509.Certificate, str] = field(default_factory=dict)
    certificates: list[SourcedCert] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    private_keys: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def add(self, name: str, parsed: _Parsed) -> None:
        many = len(parsed.certs) > 1
        for i, cert in enumerate(parsed.certs, start=1):
            source = f"{name}#{i}" if many else name
            if cert in self.seen:
                self.duplicates.append(source)
            else:
                self.seen[cert] = source
                self.certificates.append(SourcedCert(cert=cert, source=source))
        for desc in parsed.keys:
            self.private_keys.append(f"{name}: {desc} was found and set aside")
        for desc in parsed.others:
            self.skipped.append(f"{name}: {desc} was set aside")

    def result(self) -> Intake:
        return Intake(
            certificates=tuple(self.certificates),
            duplicates=tuple(self.duplicates),
            private_keys=tuple(self.private_keys),
            skipped=tuple(self.skipped),
        )


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _is_file(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_file()
    except OSError:
        return False


def _read_directory(path: str, password: bytes | None, acc: _Accumulator) -> None:
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
    except OSError as exc:
        raise InputError(f"{path} cannot be read ({exc.strerror}); check its permissions.") from exc
    before = len(acc.seen) + len(acc.duplicates)
    for entry in entries:
        name = os.path.join(path, entry.name)
        if _is_dir(entry):
            acc.skipped.append(f"{name}: a directory, not searched")
            continue
        if not _is_file(entry):
            acc.skipped.append(f"{name}: not a regular file (a broken link?)")
            continue
        try:
            parsed = _parse(_read(entry.path), password)
        except _Unreadable as exc:
            acc.skipped.append(f"{name}: {exc.reason}")
            continue
        acc.add(name, parsed)
    if len(acc.seen) + len(acc.duplicates) == before:
        raise InputError(
            f"{path} holds no certificates ({len(entries)} entries read); point to the files "
            "the CA returned."
        )


def _read(path: str) -> bytes:
    """A regular file's bytes, at most :data:`MAX_FILE_BYTES`; devices and FIFOs are refused
    before they are opened (``/dev/zero`` never ends, opening a FIFO blocks)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise _Unreadable(
                "is not a regular file (a device, FIFO or socket); give the certificate file "
                "the CA returned"
            )
        with open(path, "rb", buffering=0) as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise _Unreadable(
                    "is not a regular file; give the certificate file the CA returned"
                )
            if st.st_size > MAX_FILE_BYTES:
                raise _Unreadable(
                    f"is {st.st_size // (1024 * 1024)} MB, over the 10 MB a certificate file "
                    "could need"
                )
            data = f.read(MAX_FILE_BYTES + 1)
            if len(data) > MAX_FILE_BYTES:
                raise _Unreadable("grew past 10 MB while being read; not a certificate file")
            return data
    except PermissionError as exc:
        raise _Unreadable("cannot be read (permission denied)") from exc
    except OSError as exc:
        raise _Unreadable(f"cannot be read ({exc.strerror})") from exc


@contextlib.contextmanager
def _quiet_loader_warnings() -> Iterator[None]:
    """Silence loader warnings about inputs we accept on purpose.

    Some trusted roots carry a zero or negative serial number, and PKCS#7 files written by
    ``openssl crl2pkcs7`` and many CA portals are BER (unsorted SETs), not strict DER.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*serial number.*", category=CryptographyDeprecationWarning
        )
        warnings.filterwarnings(
            "ignore", message="PKCS#7 certificates could not be parsed as DER", category=UserWarning
        )
        yield


def _no_certificate_reason(parsed: _Parsed) -> str:
    if parsed.keys:
        return "is a private key, not a certificate (give a key with --key)"
    if "a certificate signing request" in parsed.others:
        return "looks like a certificate signing request, not a certificate"
    if parsed.others:
        return f"holds {parsed.others[0]}, not a certificate"
    return "holds no certificates"


def _parse(data: bytes, password: bytes | None) -> _Parsed:
    if not data.strip():
        raise _Unreadable("is empty")
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        try:
            data = data.decode("utf-16").encode("ascii")
        except (UnicodeError, ValueError) as exc:
            raise _Unreadable(f"is UTF-16 text and {_NOT_A_FORMAT}") from exc
    if b"-----BEGIN" in data:
        return _parse_pem(data)
    if data[:1] == b"\x30":
        return _parse_der(data, password)
    head = data.lstrip()[:1024].lower()
    if head.startswith((b"<!doctype html", b"<html", b"<?xml")) or b"<html" in head:
        raise _Unreadable(
            "looks like an HTML page, not a certificate file (a login or error page?)"
        )
    stripped = b"".join(data.split())
    if stripped:
        with contextlib.suppress(binascii.Error, ValueError):
            der = base64.b64decode(stripped, validate=True)
            if der[:1] == b"\x30":
                with contextlib.suppress(_Unreadable):
                    return _parse_der(der, password)
    raise _Unreadable(_NOT_A_FORMAT)


def _parse_pem(data: bytes) -> _Parsed:
    begins = data.count(b"-----BEGIN ")
    if (
        begins
        == data.count(b"-----BEGIN CERTIFICATE-----")
        == data.count(b"-----END CERTIFICATE-----")
    ):
        with contextlib.suppress(ValueError):  # damaged blocks: the slow path names them
            certs = x509.load_pem_x509_certificates(data)
            if len(certs) == begins:
                return _Parsed(certs=certs)
    out = _Parsed()
    blocks = 0
    for blocks, m in enumerate(_PEM_BLOCK.finditer(data), start=1):
        label, body = m.group(1), m.group(2)
        if label in _CERT_LABELS or label == b"TRUSTED CERTIFICATE":
            der = _b64(body)
            if label == b"TRUSTED CERTIFICATE":
                der = der[: _tlv_end(der) or len(der)]
            try:
                out.certs.append(x509.load_der_x509_certificate(der))
            except ValueError as exc:
                raise _Unreadable(
                    f"has a {label.decode()} block (block {blocks}) that is damaged; "
                    "download the file again"
                ) from exc
        elif label in _PKCS7_LABELS:
            try:
                out.certs.extend(pkcs7.load_der_pkcs7_certificates(_b64(body)))
            except ValueError as exc:
                raise _Unreadable(f"has a PKCS7 block (block {blocks}) that is damaged") from exc
        elif label in _KEY_LABELS:
            out.keys.append(_describe_private_key(label, m.group(0)))
        else:
            out.others.append(
                _OTHER_LABELS.get(label, f"a PEM block labelled {label.decode(errors='replace')}")
            )
    if data.count(b"-----BEGIN ") > blocks:
        raise _Unreadable("has a PEM block that is cut off (no matching END line)")
    if not blocks:
        raise _Unreadable(f"has a broken PEM header and {_NOT_A_FORMAT}")
    return out


def _parse_der(data: bytes, password: bytes | None) -> _Parsed:
    end = _tlv_end(data)
    if end is None:
        raise _Unreadable(_NOT_A_FORMAT)
    trailing = data[end:]
    der = data[:end] if not trailing.strip(b"\x00\r\n\t ") else data
    inner = _first_inner(der)
    out = _Parsed()
    if inner == b"\x02\x01\x03":  # PFX version 3: PKCS#12
        return _parse_pkcs12(der, password)
    if inner[:1] == b"\x06":  # ContentInfo: PKCS#7
        try:
            out.certs.extend(pkcs7.load_der_pkcs7_certificates(der))
        except ValueError as exc:
            raise _Unreadable(f"is a PKCS#7 structure without certificates ({exc})") from exc
        return out
    with contextlib.suppress(ValueError):
        out.certs.append(x509.load_der_x509_certificate(der))
        return out
    with contextlib.suppress(ValueError):
        x509.load_der_x509_csr(der)
        out.others.append("a certificate signing request")
        return out
    with contextlib.suppress(ValueError):
        x509.load_der_x509_crl(der)
        out.others.append("a certificate revocation list")
        return out
    try:
        key = serialization.load_der_private_key(der, None, unsafe_skip_rsa_key_validation=True)
    except TypeError:
        out.keys.append("an encrypted private key")
        return out
    except (ValueError, UnsupportedAlgorithm):
        raise _Unreadable(_NOT_A_FORMAT) from None
    out.keys.append(_with_article(f"{describe_key(key)} private key"))
    return out


def _parse_pkcs12(der: bytes, password: bytes | None) -> _Parsed:
    candidates: list[bytes | None] = [password] if password else []
    candidates += [None, b""]
    last: Exception | None = None
    for candidate in candidates:
        try:
            p12 = pkcs12.load_pkcs12(der, candidate)
            break
        except (ValueError, TypeError) as exc:
            last = exc
    else:
        if password:
            raise _Unreadable(
                "is a PKCS#12 file that the given password does not open; check --password-env"
            ) from last
        raise _Unreadable("is a PKCS#12 file that needs a password (--password-env)") from last
    out = _Parsed()
    if p12.cert is not None:
        out.certs.append(p12.cert.certificate)
    out.certs.extend(c.certificate for c in p12.additional_certs)
    if p12.key is not None:
        out.keys.append(_with_article(f"{describe_key(p12.key)} private key"))
    return out


def _pool_file_certs(data: bytes) -> list[x509.Certificate]:
    try:
        return _parse(data, None).certs
    except ValueError:
        raise _Unreadable("unreadable") from None


def _describe_private_key(label: bytes, block: bytes) -> str:
    if label == b"OPENSSH PRIVATE KEY":
        return "an OpenSSH private key"
    if label == b"ENCRYPTED PRIVATE KEY" or b"Proc-Type: 4,ENCRYPTED" in block:
        return "an encrypted private key"
    try:
        key = serialization.load_pem_private_key(
            block.replace(b"\r\n", b"\n"), None, unsafe_skip_rsa_key_validation=True
        )
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return "an unreadable private key"
    return _with_article(f"{describe_key(key)} private key")


def _with_article(noun: str) -> str:
    """'an RSA 4096 private key', 'an ECDSA P-256 private key', 'a DSA 2048 private key'."""
    return f"{'an' if noun[:1] in 'AEFHILMNORSXaeiou' else 'a'} {noun}"


def _b64(body: bytes) -> bytes:
    lines = [ln for ln in body.splitlines() if b":" not in ln]  # drop RFC 1421 headers
    try:
        return base64.b64decode(b"".join(b"".join(lines).split()))
    except (binascii.Error, ValueError) as exc:
        raise _Unreadable("has a PEM block whose base64 text is damaged") from exc


def _header_len(data: bytes, offset: int = 0) -> tuple[int, int] | None:
    """(header length, content length) of the DER TLV at ``offset``, or None."""
    if len(data) < offset + 2:
        return None
    first = data[offset + 1]
    if first < 0x80:
        return 2, first
    n = first & 0x7F
    if n == 0 or n > 4 or len(data) < offset + 2 + n:
        return None
    return 2 + n, int.from_bytes(data[offset + 2 : offset + 2 + n], "big")


def _tlv_end(data: bytes) -> int | None:
    hl = _header_len(data)
    if hl is None or hl[0] + hl[1] > len(data):
        return None
    return hl[0] + hl[1]


def _first_inner(der: bytes) -> bytes:
    hl = _header_len(der)
    if hl is None:
        return b""
    return der[hl[0] : hl[0] + 3]
