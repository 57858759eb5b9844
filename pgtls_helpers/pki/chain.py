"""Order what a CA returned into a chain: leaf first, by issuer name and by signature.

The article orders certificates by reading subject and issuer lines. Names alone can be
fooled: two CA certificates may carry the same name with different keys (a re-keyed CA, a
test CA, an attacker's copy). Here a certificate's issuer is the one whose *key verifies its
signature*, among those with the right name; the Authority/Subject Key Identifiers only decide
which candidate is tried first.

>>> from pgtls_helpers.pki.chain import order_chain
>>> order_chain([]).path
()
"""

from __future__ import annotations

import datetime as _dt
import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, padding, rsa
from cryptography.x509.oid import NameOID

from pgtls_helpers.errors import InputError
from pgtls_helpers.pki.keys import describe_key

if TYPE_CHECKING:
    import pandas

__all__ = [
    "TABLE_COLUMNS",
    "ChainResult",
    "bundle_pem",
    "cert_label",
    "fingerprint",
    "inspection_table",
    "is_ca",
    "is_self_signed",
    "order_chain",
    "root_pem",
    "same_name",
    "signed_by",
    "table_rows",
]

Role = str  # "leaf" | "intermediate" | "root"


@dataclass(frozen=True)
class ChainResult:
    """The ordered chain and what was left over.

    Attributes:
        path: leaf first, each certificate followed by the one whose key signed it.
        roles: "leaf", "intermediate" or "root" for each member of ``path``.
        unused: given certificates that are not on the path, in the order given.
        missing_issuer: the issuer name of the last certificate when the path does not end at
            a self-signed root (that CA certificate was not found), else None.
        from_pool: the members of ``path`` that came from the pool, not from the input.
    """

    path: tuple[x509.Certificate, ...]
    roles: tuple[Role, ...]
    unused: tuple[x509.Certificate, ...] = ()
    missing_issuer: x509.Name | None = None
    from_pool: tuple[x509.Certificate, ...] = field(default=())

    @property
    def leaf(self) -> x509.Certificate | None:
        """The first certificate of the path, or None for an empty input."""
        return self.path[0] if self.path else None

    @property
    def root(self) -> x509.Certificate | None:
        """The self-signed root the path ends at, or None when it does not reach one."""
        if self.path and self.roles[-1] == "root":
            return self.path[-1]
        return None

    @property
    def intermediates(self) -> tuple[x509.Certificate, ...]:
        """The path without the leaf and the root, nearest the leaf first."""
        return tuple(c for c, r in zip(self.path, self.roles, strict=True) if r == "intermediate")

    @property
    def complete(self) -> bool:
        """True when the path runs from the leaf up to a self-signed root."""
        return bool(self.path) and self.missing_issuer is None


def order_chain(
    certs: Iterable[x509.Certificate],
    pool: Iterable[x509.Certificate] = (),
    *,
    leaf: x509.Certificate | None = None,
) -> ChainResult:
    """Order ``certs`` leaf first, completing the path from ``pool`` where needed.

    Args:
        certs: what the CA returned, in any order; duplicates are ignored.
        pool: further certificates the path may borrow issuers from (a trust store, a folder
            of intermediates); indexed by subject name, so thousands cost little.
        leaf: the certificate to start from. When None, the leaf is a certificate that
            issued none of the others, preferring one that is not a CA, then the one with
            the longest path by name, then the first given; other candidates end up unused.

    Returns:
        The :class:`ChainResult`.
    """
    given = list(dict.fromkeys(certs))  # certificates compare (and hash) by their DER
    if leaf is not None and leaf not in given:
        given.insert(0, leaf)
    given_set = set(given)
    pool_certs = [c for c in dict.fromkeys(pool) if c not in given_set]
    if not given:
        return ChainResult(path=(), roles=())

    own = _Index(given)
    pooled = _Index(pool_certs)
    start = leaf if leaf is not None else _pick_leaf(given, own, pooled)

    path = [start]
    seen = {start}
    pool_set = set(pool_certs)
    missing: x509.Name | None = None
    ends_at_root = False
    cur = start
    while True:
        if is_self_signed(cur):
            ends_at_root = True
            break
        nxt = _find_issuer(cur, own, pooled, seen)
        if nxt is None:
            missing = cur.issuer
            break
        seen.add(nxt)
        path.append(nxt)
        cur = nxt

    roles: list[Role] = ["intermediate"] * len(path)
    roles[0] = "leaf"
    if ends_at_root and len(path) > 1:
        roles[-1] = "root"
    return ChainResult(
        path=tuple(path),
        roles=tuple(roles),
        unused=tuple(c for c in given if c not in seen),
        missing_issuer=missing,
        from_pool=tuple(c for c in path if c in pool_set),
    )


def bundle_pem(result: ChainResult) -> bytes:
    """``server.crt`` content: the leaf, then the intermediates in signing order, no root.

    Raises:
        InputError: when there is no certificate at all.
    """
    if not result.path:
        raise InputError(
            "no certificate was found, so there is nothing to bundle; "
            "pass the files the CA returned"
        )
    members = [c for c, r in zip(result.path, result.roles, strict=True) if r != "root"]
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in members)


def root_pem(result: ChainResult) -> bytes:
    """``root.crt`` content: the self-signed root the chain ends at.

    Raises:
        InputError: when the chain does not reach a self-signed root.
    """
    root = result.root
    if root is None:
        missing = name_label(result.missing_issuer) if result.missing_issuer else "its root"
        raise InputError(
            f"the chain stops below {missing}, so there is no root certificate to write; "
            "add the CA's root certificate file or pass --pool with it (for example "
            "/etc/ssl/certs)"
        )
    return root.public_bytes(serialization.Encoding.PEM)


def table_rows(result: ChainResult, *, include_unused: bool = True) -> list[dict[str, Any]]:
    """One plain dict per certificate: the columns of :func:`inspection_table`."""
    rows: list[dict[str, Any]] = []
    now = _dt.datetime.now(_dt.UTC)
    members: list[tuple[int | None, str, x509.Certificate]] = [
        (i, r, c) for i, (c, r) in enumerate(zip(result.path, result.roles, strict=True))
    ]
    if include_unused:
        members += [(None, "unused", c) for c in result.unused]
    for pos, role, cert in members:
        na = cert.not_valid_after_utc
        rows.append(
            {
                "position": pos,
                "role": role,
                "subject": cert.subject.rfc4514_string(),
                "issuer": cert.issuer.rfc4514_string(),
                "serial": format(cert.serial_number, "x"),
                "not_before": cert.not_valid_before_utc,
                "not_after": na,
                "days_left": (na - now).days,
                "key": _describe_key(cert),
                "signature_algorithm": _sig_alg_name(cert),
                "ski": _ski(cert),
                "aki": _aki(cert),
                "sha256": fingerprint(cert),
                "sans": ", ".join(_san_strings(cert)),
            }
        )
    return rows


def inspection_table(result: ChainResult, *, include_unused: bool = True) -> pandas.DataFrame:
    """The chain as a pandas DataFrame for a notebook (unused certificates last).

    Columns: position, role, subject, issuer, serial, not_before, not_after, days_left, key,
    signature_algorithm, ski, aki, sha256, sans.
    """
    import pandas as pd

    frame = pd.DataFrame(table_rows(result, include_unused=include_unused), columns=TABLE_COLUMNS)
    frame["position"] = frame["position"].astype("Int64")
    return frame


TABLE_COLUMNS = (
    "position",
    "role",
    "subject",
    "issuer",
    "serial",
    "not_before",
    "not_after",
    "days_left",
    "key",
    "signature_algorithm",
    "ski",
    "aki",
    "sha256",
    "sans",
)


# --- single-certificate helpers (used by findings and the CLI too) ----------------------------


@functools.lru_cache(maxsize=8192)
def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 fingerprint as lowercase hex without separators."""
    return cert.fingerprint(hashes.SHA256()).hex()


def names_of(item: x509.Certificate | x509.CertificateSigningRequest) -> list[str]:
    """The DNS names (lowercased) and IP addresses a certificate or CSR names in its
    subjectAltName, in that order; none without the extension."""
    try:
        ext = item.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(v).lower() for v in ext.get_values_for_type(x509.DNSName)] + [
        str(v) for v in ext.get_values_for_type(x509.IPAddress)
    ]


def cert_label(cert: x509.Certificate) -> str:
    """How messages name a certificate: its CN in quotes, or its whole subject."""
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if cns:
        return f'"{cns[0].value!s}"'
    return name_label(cert.subject)


def is_ca(cert: x509.Certificate) -> bool:
    """Whether BasicConstraints says ``CA:TRUE``."""
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except (x509.ExtensionNotFound, ValueError):
        return False
    return bool(bc.ca)


def is_self_signed(cert: x509.Certificate) -> bool:
    """Subject equals issuer and the certificate's own key verifies its signature."""
    return same_name(cert.issuer, cert.subject, raw_names(cert)) and signed_by(cert, cert)


def same_name(a: x509.Name, b: x509.Name, raw: tuple[bytes, bytes] | None = None) -> bool:
    """Whether two names are equal the way OpenSSL compares them (case and spacing aside)."""
    if raw is not None and raw[0] == raw[1]:
        return True
    return a == b or _name_key(a) == _name_key(b)


def issued_by(child: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether ``issuer`` issued ``child``: its subject is the child's issuer (as OpenSSL
    compares names) and its key verifies the child's signature. The one such test here."""
    return same_name(child.issuer, issuer.subject) and signed_by(child, issuer)


def signed_by(child: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether ``issuer``'s public key verifies ``child``'s signature.

    ``verify_directly_issued_by`` also compares the names byte for byte and refuses SHA-1
    and MD5; in those cases the signature is checked with the issuer's key directly, so that
    an old or differently encoded chain is still ordered (and then flagged by the checks).
    """
    try:
        child.verify_directly_issued_by(issuer)
        return True
    except InvalidSignature:
        return False
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return _verify_with_key(child, issuer.public_key())


# --- internals ---------------------------------------------------------------------------------


_NameKey = tuple[tuple[tuple[str, str], ...], ...]


def _name_key(name: x509.Name) -> _NameKey:
    """A name compared the way OpenSSL does: case and runs of spaces do not count.

    The string type (PrintableString or UTF8String) does not count either, which the DER
    bytes would make count.
    """
    return tuple(
        tuple(sorted((a.oid.dotted_string, _canon(a.value)) for a in rdn)) for rdn in name.rdns
    )


def _canon(value: str | bytes) -> str:
    if isinstance(value, bytes):
        return value.hex()
    return " ".join(value.split()).lower()


@functools.lru_cache(maxsize=8192)
def _subject_key(cert: x509.Certificate) -> _NameKey:
    return _name_key(cert.subject)


@functools.lru_cache(maxsize=8192)
def _issuer_key(cert: x509.Certificate) -> _NameKey:
    return _name_key(cert.issuer)


@functools.lru_cache(maxsize=8192)
def raw_names(cert: x509.Certificate) -> tuple[bytes, bytes]:
    """The DER of the issuer and subject names, cut out of the to-be-signed bytes.

    Parsing ``cert.subject`` builds Python objects for every attribute; a pool of thousands
    is indexed faster by these bytes. Equal bytes mean equal names; unequal bytes are
    compared again as names (:func:`same_name`) where it matters.
    """
    tbs = cert.tbs_certificate_bytes
    try:
        pos = _tlv(tbs, 0)[0]  # into the TBSCertificate SEQUENCE
        if tbs[pos] == 0xA0:  # [0] version
            pos = _tlv(tbs, pos)[1]
        pos = _tlv(tbs, pos)[1]  # serialNumber
        pos = _tlv(tbs, pos)[1]  # signature AlgorithmIdentifier
        issuer_end = _tlv(tbs, pos)[1]
        issuer = tbs[pos:issuer_end]
        pos = _tlv(tbs, issuer_end)[1]  # validity
        subject = tbs[pos : _tlv(tbs, pos)[1]]
    except IndexError:
        return (cert.issuer.public_bytes(), cert.subject.public_bytes())
    return issuer, subject


def _tlv(data: bytes, pos: int) -> tuple[int, int]:
    """(start of the value, end of the element) for the DER element at ``pos``."""
    length = data[pos + 1]
    start = pos + 2
    if length & 0x80:
        n = length & 0x7F
        length = int.from_bytes(data[start : start + n], "big")
        start += n
    end = start + length
    if end > len(data):
        raise IndexError("truncated DER")
    return start, end


class _Index:
    """Certificates by subject name: DER bytes first, canonical names when those miss."""

    def __init__(self, certs: Sequence[x509.Certificate]) -> None:
        self.certs = certs
        self.by_der: dict[bytes, list[x509.Certificate]] = {}
        for c in certs:
            self.by_der.setdefault(raw_names(c)[1], []).append(c)
        self._by_key: dict[_NameKey, list[x509.Certificate]] | None = None

    def exact(self, issuer_der: bytes) -> list[x509.Certificate]:
        return self.by_der.get(issuer_der, [])

    def alike(self, child: x509.Certificate) -> list[x509.Certificate]:
        if self._by_key is None:
            self._by_key = {}
            for c in self.certs:
                self._by_key.setdefault(_subject_key(c), []).append(c)
        return self._by_key.get(_issuer_key(child), [])


def _pick_leaf(given: list[x509.Certificate], own: _Index, pooled: _Index) -> x509.Certificate:
    # Count, per issuer name, how many *other* certificates name it (cheap: by DER bytes).
    issued: dict[bytes, int] = {}
    for c in given:
        issuer, subject = raw_names(c)
        if issuer != subject:
            issued[issuer] = issued.get(issuer, 0) + 1
    candidates = [c for c in given if issued.get(raw_names(c)[1], 0) == 0] or given

    def rank(item: tuple[int, x509.Certificate]) -> tuple[bool, int, int]:
        pos, cert = item
        return (is_ca(cert), -_name_depth(cert, own, pooled), pos)

    return min(enumerate(candidates), key=rank)[1]


def _name_depth(cert: x509.Certificate, own: _Index, pooled: _Index) -> int:
    """How far issuer names lead up from ``cert`` (cheap: no signatures are checked)."""
    depth = 0
    seen = {raw_names(cert)[1]}
    cur = cert
    while True:
        issuer = raw_names(cur)[0]
        if issuer in seen:
            return depth
        found = own.exact(issuer) or pooled.exact(issuer)
        if not found:
            return depth
        nxt = found[0]
        seen.add(issuer)
        depth += 1
        cur = nxt


def _find_issuer(
    child: x509.Certificate, own: _Index, pooled: _Index, seen: set[x509.Certificate]
) -> x509.Certificate | None:
    issuer_der = raw_names(child)[0]
    aki = aki_bytes(child)
    tried: set[x509.Certificate] = {child}
    # Exact names first, the input before the pool; then names equal only once canonicalized.
    for group in (
        lambda: own.exact(issuer_der),
        lambda: pooled.exact(issuer_der),
        lambda: own.alike(child),
        lambda: pooled.alike(child),
    ):
        candidates = [c for c in group() if c not in seen and c not in tried]
        if aki is not None:
            # A matching key identifier first, then certificates without one, then the rest.
            candidates.sort(key=lambda c: {True: 0, None: 1, False: 2}[_ski_matches(c, aki)])
        for cand in candidates:
            tried.add(cand)
            if signed_by(child, cand):
                return cand
    return None


def aki_bytes(cert: x509.Certificate) -> bytes | None:
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except (x509.ExtensionNotFound, ValueError):
        return None
    return aki.key_identifier


def ski_bytes(cert: x509.Certificate) -> bytes | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except (x509.ExtensionNotFound, ValueError):
        return None


def _ski_matches(cert: x509.Certificate, aki: bytes) -> bool | None:
    ski = ski_bytes(cert)
    return None if ski is None else ski == aki


def _verify_with_key(child: x509.Certificate, pub: object) -> bool:
    sig, tbs = child.signature, child.tbs_certificate_bytes
    try:
        params = child.signature_algorithm_parameters
        algo = child.signature_hash_algorithm
        if isinstance(pub, rsa.RSAPublicKey):
            pad = params if isinstance(params, (padding.PSS, padding.PKCS1v15)) else None
            if algo is None:
                return False
            pub.verify(sig, tbs, pad or padding.PKCS1v15(), algo)
        elif isinstance(pub, ec.EllipticCurvePublicKey):
            if algo is None:
                return False
            pub.verify(sig, tbs, ec.ECDSA(algo))
        elif isinstance(pub, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            pub.verify(sig, tbs)
        elif isinstance(pub, dsa.DSAPublicKey):
            if algo is None:
                return False
            pub.verify(sig, tbs, algo)
        else:
            return False
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return True


def san_entries(cert: x509.Certificate) -> list[x509.GeneralName]:
    try:
        return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except (x509.ExtensionNotFound, ValueError):
        return []


def _san_strings(cert: x509.Certificate) -> list[str]:
    out: list[str] = []
    for gn in san_entries(cert):
        if isinstance(gn, x509.DNSName):
            out.append(f"DNS:{gn.value}")
        elif isinstance(gn, x509.IPAddress):
            out.append(f"IP:{gn.value}")
        elif isinstance(gn, x509.RFC822Name):
            out.append(f"email:{gn.value}")
        elif isinstance(gn, x509.UniformResourceIdentifier):
            out.append(f"URI:{gn.value}")
    return out


def _ski(cert: x509.Certificate) -> str:
    ski = ski_bytes(cert)
    return ski.hex(":") if ski else ""


def _aki(cert: x509.Certificate) -> str:
    aki = aki_bytes(cert)
    return aki.hex(":") if aki else ""


def _sig_alg_name(cert: x509.Certificate) -> str:
    oid = cert.signature_algorithm_oid
    return getattr(oid, "_name", None) or oid.dotted_string


def _describe_key(cert: x509.Certificate) -> str:
    try:
        return describe_key(cert.public_key())
    except (ValueError, UnsupportedAlgorithm):
        return "unsupported key"


def name_label(name: x509.Name) -> str:
    cns = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    if cns:
        return f'"{cns[0].value!s}"'
    text = name.rfc4514_string()
    return f'"{text}"' if text else "an empty name"
