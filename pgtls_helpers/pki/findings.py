"""Checks on an ordered chain, each result a :class:`Finding` a DBA can act on.

One module of a little over 500 lines: every check, its code and its advice are read together
when a new finding is added.

>>> Finding("warning", "expires-soon", 'The certificate "db1" expires in 12 days.').code
'expires-soon'
>>> CODES["missing-issuer"].split(";")[0]
'Add the missing CA certificate to the files read'
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import dsa, ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from pgtls_helpers.errors import PreflightError
from pgtls_helpers.pki import hostname
from pgtls_helpers.pki.chain import (
    ChainResult,
    aki_bytes,
    cert_label,
    fingerprint,
    is_ca,
    name_label,
    raw_names,
    same_name,
    san_entries,
    signed_by,
    ski_bytes,
)
from pgtls_helpers.pki.keys import PrivateKey, PublicKey, public_key_matches

__all__ = [
    "ADD_TO_FILES",
    "CODES",
    "Finding",
    "Severity",
    "check_chain",
    "has_errors",
    "raise_for_errors",
    "reasons",
]

Severity = Literal["error", "warning", "info"]

_ORDER: dict[str, int] = {"error": 0, "warning": 1, "info": 2}


@dataclass(frozen=True)
class Finding:
    """One result of a check.

    Attributes:
        severity: "error" (the chain will not work as it is), "warning", or "info".
        code: a stable name from :data:`CODES`.
        message: one sentence naming the certificate and the fix.
    """

    severity: Severity
    code: str
    message: str

    @property
    def is_error(self) -> bool:
        """True when the finding stops the change."""
        return self.severity == "error"


CODES: dict[str, str] = {
    "missing-issuer": "Add the missing CA certificate to the files read; the CA publishes its "
    "intermediate and root certificates.",
    "bad-signature": "A certificate with the right issuer name did not sign this one; get the "
    "issuer certificate that belongs to this chain from the CA.",
    "not-a-ca": "A certificate that signs others must be a CA (basicConstraints CA:TRUE, "
    "keyCertSign); ask the CA for its proper intermediate certificate.",
    "expired": "Renew the certificate: create a new CSR and have the CA sign it.",
    "not-yet-valid": "Wait until the start date, or check the clock of the machine and the dates "
    "the CA used.",
    "insecure-hba-rule": "Use hostssl with a password or certificate method, or set "
    "allow_insecure_rules: true if this rule is intended.",
    "expires-soon": "Plan the renewal now: a new CSR, the CA's signature, and an install before "
    "the end date.",
    "key-mismatch": "The certificate was issued for a different private key; use the key the CSR "
    "was made with, or have the CA sign a CSR made with this key.",
    "hostname-mismatch": "Clients using sslmode=verify-full with this host name will be refused; "
    "have the host added as a SAN, or connect with a name the certificate lists.",
    "no-server-auth": "The certificate is not allowed for TLS servers; ask the CA for a server "
    "certificate (Extended Key Usage serverAuth).",
    "weak-key": "Make a new key of at least RSA 2048 (or ECDSA P-256) and a new CSR; "
    "OpenSSL refuses shorter keys at its default security level.",
    "weak-signature": "Ask the CA to reissue the certificate signed with SHA-256; OpenSSL refuses "
    "SHA-1 and MD5 signatures at its default security level.",
    "no-leaf": "Every certificate given is a CA certificate; add the server's own certificate "
    "(the one the CA issued for the CSR) to the files.",
    "leaf-is-ca": "The first certificate is a CA certificate, not a server certificate; check "
    "that the server's own certificate is among the files.",
    "unused-certificate": "The file is not needed for this chain; leave it out of server.crt.",
    "private-key-in-bundle": "A private key was among the CA's files; it was set aside and never "
    "shown. Keep keys out of certificate bundles and check how that file was handled.",
    "skipped-input": "A file that holds no certificate was set aside; nothing to do unless a "
    "certificate was expected there.",
    "no-san": "libpq matches the CN when there are no SANs, but JDBC, .NET and browsers do not; "
    "ask the CA to reissue the certificate with the host names as SANs.",
    "chain-rejected": "OpenSSL, as libpq uses it, refuses the chain for a reason the other checks "
    "did not name; read its reason and ask the CA for a chain that verifies.",
    "strict-profile": "libpq accepts the chain; clients with a strict RFC 5280 / web PKI profile "
    "may not. Ask the CA for a conforming chain before such clients connect.",
    "server-cannot-load": "The server's OpenSSL refuses the key or signature at its security "
    "level; ask the CA for a certificate with a stronger key or signature.",
}

_WEAK_HASHES = (hashes.SHA1, hashes.MD5)

#: How a missing CA certificate is added, in the words of whoever reads the finding: each
#: caller passes its own (``ca_files`` for the runbook, ``--pool`` for ``pgtls chain``), so the
#: advice only ever names what that reader can change.
ADD_TO_FILES = "add its file to the files read"


def check_chain(
    result: ChainResult,
    *,
    key: PrivateKey | PublicKey | None = None,
    hosts: Iterable[str] = (),
    now: _dt.datetime | None = None,
    expires_soon_days: int = 30,
    verify: bool = True,
    add: str = ADD_TO_FILES,
) -> list[Finding]:
    """Everything worth knowing about an ordered chain, errors first.

    Args:
        result: from :func:`pgtls_helpers.chain.order_chain`.
        key: the server's private key (or its public key) the leaf must belong to.
        hosts: the host names clients put in ``host=`` with ``sslmode=verify-full``.
        now: the time to judge validity at (timezone-aware); the current time by default.
        expires_soon_days: how close an end date must be to earn ``expires-soon``.
        verify: on a complete chain, also ask OpenSSL, as libpq uses it, for the trust
            verdict (see :func:`pgtls_helpers.pki.verdict.trust_verdict`).
    """
    at = now if now is not None else _dt.datetime.now(_dt.UTC)
    hosts = list(hosts)
    out: list[Finding] = []
    if not result.path:
        return [
            Finding(
                "error",
                "missing-issuer",
                "No certificate was found in the input; pass the files the CA returned.",
            )
        ]
    leaf = result.path[0]
    if _no_leaf(result):
        # without the server's own certificate there is nothing to match a key or a host name
        # against: only the structure and dates of the CA certificates are worth reporting
        out.append(
            Finding(
                "error",
                "no-leaf",
                f"All {len(result.path) + len(result.unused)} certificates given are CA "
                f"certificates (the path starts at {cert_label(leaf)}), so the server's own "
                "certificate is missing; add the certificate the CA issued for the CSR.",
            )
        )
        out += _structure(result, add)
        for cert, role in zip(result.path, result.roles, strict=True):
            out += _validity(cert, role, at, expires_soon_days)
            out += _strength(cert, role)
        return sorted(out, key=lambda f: _ORDER[f.severity])

    out += _structure(result, add)
    for cert, role in zip(result.path, result.roles, strict=True):
        out += _validity(cert, role, at, expires_soon_days)
        out += _strength(cert, role)
    if key is not None and not public_key_matches(key, leaf):
        out.append(
            Finding(
                "error",
                "key-mismatch",
                f"The certificate {cert_label(leaf)} does not belong to the given private key; "
                "use the key its CSR was made with, or have a CSR from this key signed.",
            )
        )
    for host in hosts:
        if not hostname.matches_host(leaf, host):
            out.append(
                Finding(
                    "error",
                    "hostname-mismatch",
                    f'The certificate {cert_label(leaf)} will be refused for host "{host}" with '
                    f"sslmode=verify-full: {_lower_first(hostname.explain(leaf, host))}",
                )
            )
    out += _server_use(leaf, len(result.path))
    out += _unused(result)

    if verify and result.complete:
        from pgtls_helpers.pki.verdict import trust_verdict

        out = trust_verdict(result, out, at)
    return sorted(out, key=lambda f: _ORDER[f.severity])


def _no_leaf(result: ChainResult) -> bool:
    """Nothing given is a server certificate: the path starts at a CA, and no certificate left
    over is an end-entity one either."""
    return is_ca(result.path[0]) and all(is_ca(c) for c in result.unused)


def has_errors(findings: Iterable[Finding]) -> bool:
    """Whether any finding is an error (the command line then exits with status 1)."""
    return any(f.severity == "error" for f in findings)


# --- the checks --------------------------------------------------------------------------------


def verify_with_cryptography(
    result: ChainResult,
    host: str | None = None,
    at: _dt.datetime | None = None,
    *,
    add: str = ADD_TO_FILES,
) -> Finding | None:
    """cryptography's own RFC 5280 verdict on the chain, as a finding, or None when it passes.

    The path's root is the only trust anchor, its intermediates are offered as untrusted
    certificates. ``host`` is the server name to check (an IP literal becomes an iPAddress);
    when None, the leaf's first SAN is used so that only the chain is judged.
    """
    from cryptography.x509 import DNSName, IPAddress
    from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

    leaf, root = result.leaf, result.root
    if leaf is None:
        return Finding("error", "chain-rejected", "There is no certificate to verify.")
    if root is None:
        return Finding(
            "error",
            "chain-rejected",
            f"The chain of {cert_label(leaf)} cannot be verified because it does not reach a "
            f"self-signed root; get the CA's root certificate and {add}.",
        )
    subject = _verifier_subject(leaf, host)
    if subject is None and is_ca(leaf):
        return Finding(
            "error",
            "no-leaf",
            f"The path starts at the CA certificate {cert_label(leaf)}; there is no server "
            "certificate to verify.",
        )
    if subject is None:
        # libpq accepts a CN-only certificate: only clients with RFC 5280 rules refuse it
        return Finding(
            "warning",
            "no-san",
            f"The certificate {cert_label(leaf)} has no subjectAltName: libpq still matches "
            "its CN, but RFC 5280 verifiers refuse it; ask the CA to reissue it with the "
            "server's host names as SANs.",
        )
    when = at if at is not None else _dt.datetime.now(_dt.UTC)
    try:
        verifier = (
            PolicyBuilder()
            .store(Store([root]))
            .time(when)
            .build_server_verifier(
                DNSName(subject) if isinstance(subject, str) else IPAddress(subject)
            )
        )
        verifier.verify(leaf, list(result.path[1:-1]))
    except VerificationError as exc:
        return Finding(
            "error",
            "chain-rejected",
            f"The RFC 5280 verifier (cryptography) rejects the chain of {cert_label(leaf)} for "
            f"{host or subject}: {exc}; fix what it names or ask the CA for a conforming "
            "certificate.",
        )
    except (ValueError, TypeError) as exc:
        return Finding(
            "error",
            "chain-rejected",
            f"The RFC 5280 verifier (cryptography) cannot check the chain of "
            f"{cert_label(leaf)}: {exc}.",
        )
    return None


def _structure(result: ChainResult, add: str) -> list[Finding]:
    out: list[Finding] = []
    path = result.path
    for child, issuer in zip(path, path[1:], strict=False):
        out += _not_a_ca(issuer, child)
    last = path[-1]
    if result.missing_issuer is None:
        return out
    missing = result.missing_issuer
    same = [c for c in result.unused if same_name(c.subject, missing)]
    if same_name(last.subject, last.issuer, raw_names(last)) and not signed_by(last, last):
        out.append(
            Finding(
                "error",
                "bad-signature",
                f"The self-signature of {cert_label(last)} does not verify, so the file is damaged "
                "or altered; get the certificate again from the CA.",
            )
        )
    aki = aki_bytes(last)
    for other in same:
        if aki is not None and aki == ski_bytes(other):
            out.append(
                Finding(
                    "error",
                    "bad-signature",
                    f"The signature of {cert_label(last)} does not verify with the key of its "
                    f"issuer {name_label(missing)} (the key identifiers match), so the "
                    "certificate is damaged or altered; get it again from the CA.",
                )
            )
        else:
            out.append(
                Finding(
                    "error",
                    "bad-signature",
                    f"The signature of {cert_label(last)} does not verify with the key of the "
                    f"certificate named {name_label(missing)} "
                    f"(sha256 {fingerprint(other)[:16]}…), "
                    "which has the right name but a different key; get the matching "
                    f"{name_label(missing)} certificate from the CA and drop this one.",
                )
            )
    if same:
        text = (
            f"No certificate among the files signed {cert_label(last)}, so the chain stops "
            f"there; get the {name_label(missing)} certificate that belongs to it and {add}."
        )
    else:
        text = (
            f"The issuer {name_label(missing)} of {cert_label(last)} is not among the files, "
            f"so the chain stops there; get the CA certificate {name_label(missing)} and {add}."
        )
    out.append(Finding("error", "missing-issuer", text))
    return out


def _not_a_ca(issuer: x509.Certificate, child: x509.Certificate) -> list[Finding]:
    try:
        bc: x509.BasicConstraints | None = issuer.extensions.get_extension_for_class(
            x509.BasicConstraints
        ).value
    except x509.ExtensionNotFound:
        bc = None
    except ValueError:
        bc = None
    if bc is None or not bc.ca:
        why = "has no basicConstraints extension" if bc is None else "says CA:FALSE"
        return [
            Finding(
                "error",
                "not-a-ca",
                f"{_cap(cert_label(issuer))} signed {cert_label(child)} but {why}, so clients will "
                "not accept it as an issuer; ask the CA for its proper intermediate certificate.",
            )
        ]
    try:
        ku: x509.KeyUsage | None = issuer.extensions.get_extension_for_class(x509.KeyUsage).value
    except (x509.ExtensionNotFound, ValueError):
        ku = None
    if ku is not None and not ku.key_cert_sign:
        return [
            Finding(
                "error",
                "not-a-ca",
                f"{_cap(cert_label(issuer))} signed {cert_label(child)} but its key usage lacks "
                "keyCertSign, so clients will not accept it as an issuer; ask the CA for its "
                "proper intermediate certificate.",
            )
        ]
    return []


def _validity(cert: x509.Certificate, role: str, at: _dt.datetime, soon_days: int) -> list[Finding]:
    nb, na = cert.not_valid_before_utc, cert.not_valid_after_utc
    label = f"the {role} certificate {cert_label(cert)}"
    if at > na:
        fix = "renew it with a new CSR" if role == "leaf" else "get the current one from the CA"
        return [
            Finding("error", "expired", f"{_cap(label)} expired on {na:%Y-%m-%d %H:%M} UTC; {fix}.")
        ]
    if at < nb:
        return [
            Finding(
                "error",
                "not-yet-valid",
                f"{_cap(label)} is not valid before {nb:%Y-%m-%d %H:%M} UTC; wait until then or "
                "check this machine's clock.",
            )
        ]
    left = na - at
    if left <= _dt.timedelta(days=soon_days):
        days = left.days
        return [
            Finding(
                "warning",
                "expires-soon",
                f"{_cap(label)} expires in {days} day{'s' if days != 1 else ''} "
                f"({na:%Y-%m-%d} UTC); plan its renewal now.",
            )
        ]
    return []


def _strength(cert: x509.Certificate, role: str) -> list[Finding]:
    out: list[Finding] = []
    try:
        pub = cert.public_key()
    except (ValueError, UnsupportedAlgorithm):
        pub = None
    weak = ""
    if isinstance(pub, rsa.RSAPublicKey) and pub.key_size < 2048:
        weak = f"RSA {pub.key_size}"
    elif isinstance(pub, dsa.DSAPublicKey) and pub.key_size < 2048:
        weak = f"DSA {pub.key_size}"
    elif isinstance(pub, ec.EllipticCurvePublicKey) and pub.curve.key_size < 224:
        weak = f"ECDSA {pub.curve.key_size}-bit"
    if weak:
        fix = (
            "make a new key (RSA 2048 or more, or ECDSA P-256) and a new CSR"
            if role == "leaf"
            else "ask the CA for a chain with stronger keys"
        )
        out.append(
            Finding(
                "error",
                "weak-key",
                f"The {role} certificate {cert_label(cert)} has a {weak} key, which OpenSSL "
                f"refuses at its default security level; {fix}.",
            )
        )
    # A root's own signature is never checked by clients (the root is trusted as it is).
    if role != "root":
        try:
            algo = cert.signature_hash_algorithm
        except UnsupportedAlgorithm:
            algo = None
        if isinstance(algo, _WEAK_HASHES):
            out.append(
                Finding(
                    "error",
                    "weak-signature",
                    f"The {role} certificate {cert_label(cert)} is signed with "
                    f"{algo.name.upper()}, which OpenSSL refuses at its default security level; "
                    "ask the CA to reissue it signed with SHA-256.",
                )
            )
    return out


def _server_use(leaf: x509.Certificate, path_len: int) -> list[Finding]:
    out: list[Finding] = []
    try:
        eku: x509.ExtendedKeyUsage | None = leaf.extensions.get_extension_for_class(
            x509.ExtendedKeyUsage
        ).value
    except (x509.ExtensionNotFound, ValueError):
        eku = None
    if eku is not None and ExtendedKeyUsageOID.SERVER_AUTH not in eku:
        uses = ", ".join(getattr(o, "_name", o.dotted_string) for o in eku) or "nothing"
        out.append(
            Finding(
                "error",
                "no-server-auth",
                f"The certificate {cert_label(leaf)} is limited to {uses} (Extended Key Usage "
                "without serverAuth), so clients refuse it for a server; ask the CA for a server "
                "certificate.",
            )
        )
    if is_ca(leaf) and path_len > 1:
        out.append(
            Finding(
                "warning",
                "leaf-is-ca",
                f"The first certificate {cert_label(leaf)} is a CA certificate; check that the "
                "server's own certificate is among the files.",
            )
        )
    return out


def _unused(result: ChainResult) -> list[Finding]:
    out: list[Finding] = []
    on_path = {raw_names(c)[1] for c in result.path}
    on_path_names = [c.subject for c in result.path]
    leaf = cert_label(result.path[0])
    for cert in result.unused:
        label = f"The certificate {cert_label(cert)}"
        if raw_names(cert)[1] in on_path or (
            len(result.unused) <= _CANON_LIMIT
            and any(same_name(cert.subject, n) for n in on_path_names)
        ):
            out.append(
                Finding(
                    "warning",
                    "unused-certificate",
                    f"{label} (sha256 {fingerprint(cert)[:16]}…) has the same name as a "
                    "certificate on the path but a different key, so it signed nothing here; "
                    "leave it out of server.crt and ask the CA which one is current.",
                )
            )
        elif result.missing_issuer is not None:
            out.append(
                Finding(
                    "info",
                    "unused-certificate",
                    f"{label} is not connected to the path from {leaf}, which stops early (see "
                    "missing-issuer); it may fit once the missing certificate is added.",
                )
            )
        else:
            out.append(
                Finding(
                    "info",
                    "unused-certificate",
                    f"{label} is not on the path from {leaf}; leave it out of server.crt.",
                )
            )
    return out


# Beyond this many unused certificates (a whole trust store), same-name look-alikes are found
# by their exact DER name only.
_CANON_LIMIT = 200


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:] if text and text[0].isalpha() else text


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:] if text[:1].isupper() else text


def _verifier_subject(
    leaf: x509.Certificate, host: str | None
) -> str | ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if host is not None:
        # An IP literal as libpq reads it (inet_aton accepts "127.1" too).
        packed4, packed6 = hostname.inet_aton(host), hostname.inet_pton6(host)
        if packed4 is not None:
            return ipaddress.IPv4Address(packed4)
        if packed6 is not None:
            return ipaddress.IPv6Address(packed6)
        return host
    for gn in san_entries(leaf):
        if isinstance(gn, x509.DNSName):
            return gn.value.replace("*.", "wildcard.", 1) if gn.value.startswith("*.") else gn.value
        if isinstance(gn, x509.IPAddress) and not isinstance(
            gn.value, ipaddress.IPv4Network | ipaddress.IPv6Network
        ):
            return gn.value
    return None


def raise_for_errors(findings: Sequence[Finding], *, what: str) -> None:
    """Raise :class:`PreflightError` naming every error finding (``what``: what was stopped)."""
    errors = [f for f in findings if f.is_error]
    if errors:
        raise PreflightError(f"{what}: {reasons(errors)}")


def reasons(findings: Iterable[Finding]) -> str:
    """The findings as one text, each led by its code (what the record and a search key use):
    each message is a sentence ending in a full stop, so they are set one after the other (a
    ``"; "`` join would print ``".;"``).

    >>> reasons([Finding("error", "expired", "It expired; renew it."), Finding("error", "x", "B")])
    'expired: It expired; renew it. x: B.'
    """
    return " ".join(f"{f.code}: {_sentence(f.message)}" for f in findings)


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith((".", "?", "!")) else text + "."
