"""What ``pgtls watch`` concludes from what it observed: pure values in, status and reasons out.

Targets, options and results are plain values; :func:`classify` turns a completed handshake
(the presented chain, the TLS version, the plaintext posture, the leaf on disk) into stable
reason codes, and every element of the chain counts, not only the leaf.
"""

from __future__ import annotations

import datetime as _dt
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from pgtls_helpers.errors import InputError
from pgtls_helpers.pki.chain import is_ca, is_self_signed, issued_by
from pgtls_helpers.pki.client import rfc4514_dn
from pgtls_helpers.pki.client_posture import CrlResult, SessionInventory
from pgtls_helpers.pki.hostname import check_host, explain
from pgtls_helpers.pki.target import DEFAULT_PORT, format_target

STATUSES = ("ok", "warning", "critical", "unknown")
#: Every reason code with its status; ``expires-soon`` is a warning or critical by its days.
REASONS: dict[str, str] = {
    "expired": "critical",
    "not-yet-valid": "critical",
    "expires-soon": "critical",
    "incomplete-chain": "critical",
    "untrusted": "critical",
    "hostname-mismatch": "critical",
    "no-ssl": "critical",
    "plaintext-accepted": "warning",
    "weak-protocol": "warning",
    "on-disk-differs": "warning",
    "unreachable": "unknown",
    "timeout": "unknown",
    "not-postgres": "unknown",
    "on-disk-unreadable": "unknown",
}
_WEAK = {"SSLv2", "SSLv3", "TLSv1", "TLSv1.1"}
WIRE_REASONS = {"timeout": "timeout", "not-postgres": "not-postgres", "no-ssl": "no-ssl"}


@dataclass(frozen=True)
class Target:
    """One server to watch: ``host`` is also the name checked with libpq's verify-full rules."""

    host: str
    port: int = DEFAULT_PORT

    @property
    def text(self) -> str:
        """``host:port``, with brackets around an IPv6 address."""
        return format_target(self.host, self.port)


@dataclass(frozen=True)
class WatchOptions:
    """How to watch: the thresholds, the trust anchors and the network limits."""

    roots: tuple[x509.Certificate, ...] | None = None
    root_path: str | None = None
    warn_days: int = 30
    crit_days: int = 15
    timeout: float = 5.0
    concurrency: int = 32
    on_disk: bool = False
    user: str | None = None
    dbname: str = "postgres"
    now: _dt.datetime | None = None
    #: with a login: count the sessions of ``pg_stat_ssl`` by issuer
    sessions: bool = False
    #: the listed client users' certificates, to know a session's certificate by its serial
    client_certs: tuple[x509.Certificate, ...] = ()

    def __post_init__(self) -> None:
        if not 0 <= self.crit_days <= self.warn_days:
            raise InputError(
                f"--crit-days {self.crit_days} and --warn-days {self.warn_days}: give "
                "0 <= critical days <= warning days"
            )
        if not self.timeout > 0:
            raise InputError(f"--timeout {self.timeout:g}: give a number of seconds above zero")
        if self.concurrency < 1:
            raise InputError(f"--concurrency {self.concurrency}: give at least 1")


@dataclass(frozen=True)
class ChainElement:
    """One presented certificate, as the formats show it."""

    sha256: str
    subject: str
    issuer: str
    not_after: _dt.datetime
    days_left: int
    role: str  # leaf, intermediate or root

    def as_json(self) -> dict[str, Any]:
        return {
            "sha256": self.sha256,
            "subject": self.subject,
            "issuer": self.issuer,
            "not_after": self.not_after.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "days_left": self.days_left,
            "role": self.role,
        }


@dataclass(frozen=True)
class TargetResult:
    """What ``watch`` found for one target; ``details`` explains each reason in a sentence."""

    target: str
    host: str
    port: int
    status: str
    reasons: tuple[str, ...] = ()
    details: tuple[str, ...] = ()
    tls_version: str | None = None
    cipher: str | None = None
    negotiation: tuple[str, ...] = ()
    chain: tuple[ChainElement, ...] = ()
    verified: bool | None = None
    hostname_ok: bool | None = None
    plaintext: str | None = None
    error: str | None = None
    on_disk_sha256: str | None = None
    days_left: int | None = None  # the worst element's, the trust anchor included
    crls: tuple[CrlResult, ...] = ()  # the server's ssl_crl_file, read with --on-disk
    sessions: SessionInventory | None = None  # with --sessions

    def as_json(self) -> dict[str, Any]:
        """The documented JSON object, keys in order."""
        return {
            "target": self.target,
            "host": self.host,
            "port": self.port,
            "status": self.status,
            "reasons": list(self.reasons),
            "details": list(self.details),
            "tls_version": self.tls_version,
            "cipher": self.cipher,
            "negotiation": list(self.negotiation),
            "chain": [e.as_json() for e in self.chain],
            "days_left": self.days_left,
            "verified": self.verified,
            "verifier": _verifier() if self.verified is not None else None,
            "hostname_ok": self.hostname_ok,
            "plaintext": self.plaintext,
            "on_disk_sha256": self.on_disk_sha256,
            "sessions": None if self.sessions is None else self.sessions.as_json(),
            "error": self.error,
        }


def _verifier() -> str:
    """Who decided ``verified``: the OpenSSL libpq uses (its version and library)."""
    from pgtls_helpers.pki import openssl

    return openssl.openssl_name()


def status_rank(status: str) -> int:
    """0 ok, 1 warning, 2 critical, 3 unknown (Nagios' and ``pgtls_status``'s numbers)."""
    return STATUSES.index(status)


def summary(results: Sequence[TargetResult]) -> dict[str, int]:
    """How many targets have each status."""
    counts = dict.fromkeys(STATUSES, 0)
    for result in results:
        counts[result.status] += 1
    return counts


# --- classification: pure, from what was observed -------------------------------------------


def _label(cert: x509.Certificate) -> str:
    return rfc4514_dn(cert.subject) or "(empty subject)"


def role_of(cert: x509.Certificate, index: int) -> str:
    if index == 0:
        return "leaf"
    return "root" if is_self_signed(cert) else "intermediate"


_issued_by = issued_by


def _chain_shape(
    chain: Sequence[x509.Certificate], roots: Sequence[x509.Certificate] | None
) -> tuple[str | None, str | None, x509.Certificate | None]:
    """(incomplete, untrusted, anchor): what is wrong with the presented order and its top."""
    for child, parent in zip(chain, chain[1:], strict=False):
        if not _issued_by(child, parent):
            return (
                f"the server presents {_label(parent)} after {_label(child)}, which it did not "
                "issue: server.crt is out of order or lacks a certificate in between",
                None,
                None,
            )
    if roots is None:
        return None, None, None
    top = chain[-1]
    if is_self_signed(top):
        if top in roots:
            return None, None, top
        return None, f"the chain ends at the root {_label(top)}, which --root does not hold", None
    anchor = next((r for r in roots if _issued_by(top, r)), None)
    if anchor is not None:
        return None, None, anchor
    issuer = rfc4514_dn(top.issuer)
    if len(chain) == 1 or not is_ca(top):
        return (
            f"the server presents {_label(top)} without its issuer {issuer}, and --root does "
            "not hold it: append the intermediate certificates to server.crt",
            None,
            None,
        )
    return (
        None,
        f"the chain ends at {_label(top)}, issued by {issuer}, which --root does not hold "
        "(a missing intermediate in server.crt, or not this CA's root)",
        None,
    )


def _verify(
    chain: Sequence[x509.Certificate], roots: Sequence[x509.Certificate], at: _dt.datetime
) -> str | None:
    """OpenSSL's verdict on the chain as libpq reaches it (:mod:`pgtls_helpers.pki.openssl`);
    the name is libpq's business (:mod:`pgtls_helpers.pki.hostname`)."""
    from pgtls_helpers.pki import openssl

    try:
        checked = openssl.verify(chain[0], list(chain[1:]), list(roots), at=at)
    except ValueError as exc:
        return f"cannot be verified ({exc})"
    if checked.ok:
        return None
    where = f" at depth {checked.depth} ({checked.subject})" if checked.subject else ""
    return f'OpenSSL, as libpq uses it, says "{checked.reason}"{where}'


@functools.lru_cache(maxsize=256)
def _verdict(
    chain: tuple[x509.Certificate, ...],
    roots: tuple[x509.Certificate, ...] | None,
    now: _dt.datetime,
) -> tuple[bool | None, str | None, str | None, x509.Certificate | None]:
    """(verified, incomplete, untrusted, anchor) for one chain; a fleet shares few chains, so
    each is judged once per run."""
    incomplete, untrusted, anchor = _chain_shape(chain, roots)
    if roots is None:
        return None, incomplete, None, None
    problem = _verify(chain, roots, now)
    if problem is not None and not untrusted and not incomplete:
        # An expired member is said as such; what still fails at a time when every member is
        # valid is distrust. (No common window at all: the expiry explains it, and the
        # signatures were checked with the chain's shape.)
        members = [*chain, *([anchor] if anchor is not None else [])]
        valid_at = max(c.not_valid_before_utc for c in members) + _dt.timedelta(seconds=1)
        ends = min(c.not_valid_after_utc for c in members)
        if valid_at < ends and _verify(chain, roots, valid_at) is not None:
            untrusted = f"the chain does not verify against --root: {problem}"
    return problem is None, incomplete, untrusted, anchor


def _worst(
    chain: tuple[x509.Certificate, ...],
    roots: tuple[x509.Certificate, ...] | None,
    now: _dt.datetime,
) -> tuple[x509.Certificate, str, int]:
    """The member that expires first (the trust anchor from --root included), its role, and
    its whole days left."""
    anchor = _verdict(chain, roots, now)[3]
    members = [(c, role_of(c, i)) for i, c in enumerate(chain)]
    if anchor is not None and anchor not in chain:
        members.append((anchor, "root (--root)"))
    cert, role = min(members, key=lambda m: m[0].not_valid_after_utc)
    return cert, role, (cert.not_valid_after_utc - now).days


def _chain_reasons(
    chain: tuple[x509.Certificate, ...],
    roots: tuple[x509.Certificate, ...] | None,
    warn_days: int,
    now: _dt.datetime,
) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    cert, role, days = _worst(chain, roots, now)
    end = cert.not_valid_after_utc
    if end <= now:
        found.append(("expired", f"the {role} {_label(cert)} expired on {end:%Y-%m-%d}"))
    elif days < warn_days:
        found.append(
            ("expires-soon", f"the {role} {_label(cert)} expires on {end:%Y-%m-%d}, in {days} days")
        )
    early = [c for c in chain if c.not_valid_before_utc > now]
    if early:  # libpq refuses it until then, as it refuses an expired one
        first = max(early, key=lambda c: c.not_valid_before_utc)
        found.append(
            (
                "not-yet-valid",
                f"the {role_of(first, chain.index(first))} {_label(first)} is not valid before "
                f"{first.not_valid_before_utc:%Y-%m-%d %H:%M} UTC",
            )
        )
    _, incomplete, untrusted, _ = _verdict(chain, roots, now)
    if incomplete:
        found.append(("incomplete-chain", incomplete))
    if untrusted:
        found.append(("untrusted", untrusted))
    return found


def classify(
    target: Target,
    *,
    tls_version: str | None,
    chain: Sequence[x509.Certificate],
    options: WatchOptions,
    plaintext: str | None = None,
    on_disk_leaf: x509.Certificate | None = None,
    on_disk_error: str | None = None,
    at: _dt.datetime | None = None,
) -> tuple[list[tuple[str, str]], bool | None, bool | None, int | None]:
    """The reasons (code, sentence) for a completed handshake, ``verified``, ``hostname_ok``
    and the worst element's days left; ``on_disk_error`` is why ``--on-disk`` read nothing
    (or not all), a reason of its own: what was asked is not known."""
    now = at or _dt.datetime.now(_dt.UTC)
    found: list[tuple[str, str]] = []
    if not chain:
        return (
            [("no-ssl", "the server completed the handshake without a certificate")],
            None,
            None,
            None,
        )
    found.extend(_chain_reasons(tuple(chain), options.roots, options.warn_days, now))
    verified = _verdict(tuple(chain), options.roots, now)[0]
    days = _worst(tuple(chain), options.roots, now)[2]
    host_check = check_host(chain[0], target.host)
    if not host_check.matched:
        found.append(("hostname-mismatch", explain(chain[0], target.host)))
    if tls_version in _WEAK:
        found.append(("weak-protocol", f"the server negotiated {tls_version}, below TLS 1.2"))
    if plaintext == "accepted":
        found.append(("plaintext-accepted", "pg_hba.conf lets a client start a login without TLS"))
    if on_disk_leaf is not None and on_disk_leaf != chain[0]:
        found.append(
            (
                "on-disk-differs",
                f"ssl_cert_file holds {_label(on_disk_leaf)} (until "
                f"{on_disk_leaf.not_valid_after_utc:%Y-%m-%d}) but the server still serves the "
                "old certificate: reload the server (SELECT pg_reload_conf())",
            )
        )
    if on_disk_error is not None:
        found.append(("on-disk-unreadable", f"--on-disk: {on_disk_error}"))
    return found, verified, host_check.matched, days


def status_of(reasons: Sequence[tuple[str, str]], days: int | None, crit_days: int) -> str:
    worst = 0
    for code, _ in reasons:
        severity = REASONS[code]
        if code == "expires-soon" and days is not None and days >= crit_days:
            severity = "warning"
        worst = max(worst, status_rank(severity))
    return STATUSES[worst]
