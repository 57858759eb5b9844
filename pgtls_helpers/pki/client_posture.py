"""What ``pgtls watch`` concludes about client certificates, CRLs and a server's sessions.

Pure values in, status and reasons out, as :mod:`pgtls_helpers.pki.posture` does for servers:

=====================  ========  =============================================================
kind                   status    reasons
=====================  ========  =============================================================
client-certificate     warning   ``expires-soon`` (within the warning days)
                       critical  ``expired``, ``not-yet-valid``, ``expires-soon`` (within the
                                 critical days), ``no-certificate``, ``no-key``,
                                 ``key-mismatch``, ``key-readable-by-others``
                       unknown   ``unreadable`` (a link, another owner, not a certificate)
crl                    critical  ``crl-expired`` (past nextUpdate), ``crl-not-yet-valid``
                       unknown   ``unreadable``
=====================  ========  =============================================================

A CRL past its nextUpdate is critical whatever the days: the server's OpenSSL then refuses
every client certificate the CRL's issuer signed, and libpq shows the client the misleading
``sslv3 alert certificate expired`` (measured on PostgreSQL 15), though the certificate is valid.

The session inventory counts ``pg_stat_ssl`` rows by issuer; a client certificate is *known*
when its serial and issuer are those of a listed client user's certificate.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from cryptography import x509

from pgtls_helpers.pki.client import rfc4514_dn, stat_ssl_dn

__all__ = [
    "CLIENT_REASONS",
    "CRL_EXPIRED_ALERT",
    "CRL_EXPIRED_ALERT_NEW",
    "CRL_REASONS",
    "ClientCertResult",
    "CrlResult",
    "SessionGroup",
    "SessionInventory",
    "judge_client_cert",
    "judge_crl",
    "session_inventory",
]

CLIENT_REASONS: dict[str, str] = {
    "expired": "critical",
    "not-yet-valid": "critical",
    "expires-soon": "critical",
    "no-certificate": "critical",
    "no-key": "critical",
    "key-mismatch": "critical",
    "key-readable-by-others": "critical",
    "unreadable": "unknown",
}
CRL_REASONS: dict[str, str] = {
    "crl-expired": "critical",
    "crl-not-yet-valid": "critical",
    "unreadable": "unknown",
}
#: What libpq prints for a certificate login the server refuses because its CRL is stale
#: (OpenSSL 3.0, as Debian 12's libpq has it; newer OpenSSL, 3.5 here, prints the second).
CRL_EXPIRED_ALERT = "sslv3 alert certificate expired"
CRL_EXPIRED_ALERT_NEW = "ssl/tls alert certificate expired"
_RANK = {"ok": 0, "warning": 1, "critical": 2, "unknown": 3}
_STATUSES = ("ok", "warning", "critical", "unknown")


def _when(value: _dt.datetime | None) -> str | None:
    return None if value is None else value.strftime("%Y-%m-%dT%H:%M:%SZ")


def _status(
    reasons: Sequence[tuple[str, str]], table: dict[str, str], days: int | None, crit: int
) -> str:
    worst = 0
    for code, _ in reasons:
        severity = table[code]
        if code == "expires-soon" and days is not None and days >= crit:
            severity = "warning"
        worst = max(worst, _RANK[severity])
    return _STATUSES[worst]


@dataclass(frozen=True)
class ClientCertResult:
    """A client OS user's ``~/.postgresql/postgresql.crt`` and ``postgresql.key``.

    ``days_left`` is the whole days left of the certificate in the file that expires first
    (libpq sends them all); ``subject``, ``issuer`` and ``serial`` are the first one's (the
    client's own). ``key_matches`` is None when the key could not be compared (absent,
    passphrase-protected); ``error`` says why when that is not a reason.
    """

    kind: ClassVar[str] = "client-certificate"
    os_user: str
    path: str
    status: str
    reasons: tuple[str, ...] = ()
    details: tuple[str, ...] = ()
    subject: str | None = None
    issuer: str | None = None
    serial: int | None = None
    sha256: str | None = None
    not_after: _dt.datetime | None = None
    days_left: int | None = None
    key_matches: bool | None = None
    error: str | None = None

    @property
    def name(self) -> str:
        return self.os_user

    def as_json(self) -> dict[str, Any]:
        """The documented JSON object; ``serial`` as a decimal string, as pg_stat_ssl has it."""
        return {
            "kind": self.kind,
            "os_user": self.os_user,
            "path": self.path,
            "status": self.status,
            "reasons": list(self.reasons),
            "details": list(self.details),
            "subject": self.subject,
            "issuer": self.issuer,
            "serial": None if self.serial is None else str(self.serial),
            "sha256": self.sha256,
            "not_after": _when(self.not_after),
            "days_left": self.days_left,
            "key_matches": self.key_matches,
            "error": self.error,
        }


def judge_client_cert(
    os_user: str,
    path: str,
    certs: Sequence[x509.Certificate],
    *,
    sha256: str | None,
    key_matches: bool | None,
    key_problem: tuple[str, str] | None = None,
    key_note: str | None = None,
    warn_days: int,
    crit_days: int,
    now: _dt.datetime,
) -> ClientCertResult:
    """Status and reasons for the certificates of a client's ``postgresql.crt`` (leaf first).

    ``key_problem`` is a reason about the key file found by the caller (``no-key``,
    ``key-readable-by-others``, ``unreadable``); ``key_matches`` False adds ``key-mismatch``.
    """
    if not certs:
        reason = ("no-certificate", f"{path} does not exist: libpq sends no client certificate")
        return ClientCertResult(
            os_user, path, _status([reason], CLIENT_REASONS, None, crit_days), (reason[0],),
            (reason[1],),
        )  # fmt: skip
    leaf = certs[0]
    found: list[tuple[str, str]] = []
    worst = min(certs, key=lambda c: c.not_valid_after_utc)
    role = "certificate" if worst is leaf else f"intermediate {rfc4514_dn(worst.subject)}"
    end = worst.not_valid_after_utc
    days = (end - now).days
    if end <= now:
        found.append(
            ("expired", f"the client {role} expired on {end:%Y-%m-%d}: the server refuses it")
        )
    elif days < warn_days:
        found.append(
            ("expires-soon", f"the client {role} expires on {end:%Y-%m-%d}, in {days} days")
        )
    early = [c for c in certs if c.not_valid_before_utc > now]
    if early:
        first = max(early, key=lambda c: c.not_valid_before_utc)
        found.append(
            (
                "not-yet-valid",
                f"{rfc4514_dn(first.subject)} is not valid before "
                f"{first.not_valid_before_utc:%Y-%m-%d %H:%M} UTC",
            )
        )
    if key_problem is not None:
        found.append(key_problem)
    if key_matches is False:
        found.append(
            (
                "key-mismatch",
                f"{path.rsplit('/', 1)[0]}/postgresql.key is not the key of postgresql.crt: "
                "libpq refuses to connect (key values mismatch)",
            )
        )
    return ClientCertResult(
        os_user=os_user,
        path=path,
        status=_status(found, CLIENT_REASONS, days, crit_days),
        reasons=tuple(c for c, _ in found),
        details=tuple(s for _, s in found),
        subject=rfc4514_dn(leaf.subject),
        issuer=rfc4514_dn(leaf.issuer),
        serial=leaf.serial_number,
        sha256=sha256,
        not_after=end,
        days_left=days,
        key_matches=key_matches,
        error=key_note,
    )


def unreadable_client(os_user: str, path: str, sentence: str) -> ClientCertResult:
    """A client file that was not read (a link, another owner, not a certificate)."""
    return ClientCertResult(
        os_user, path, "unknown", ("unreadable",), (sentence,), error=f"{os_user}: {sentence}"
    )


@dataclass(frozen=True)
class CrlResult:
    """One CRL: from a ``--crl`` file (``target`` None) or a server's ``ssl_crl_file``.

    ``days_left`` is the whole days until nextUpdate (negative once past, None without one).
    """

    kind: ClassVar[str] = "crl"
    source: str
    path: str
    status: str
    reasons: tuple[str, ...] = ()
    details: tuple[str, ...] = ()
    target: str | None = None
    issuer: str | None = None
    this_update: _dt.datetime | None = None
    next_update: _dt.datetime | None = None
    days_left: int | None = None
    revoked: int | None = None
    error: str | None = None

    @property
    def name(self) -> str:
        return self.source

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "source": self.source,
            "target": self.target,
            "path": self.path,
            "status": self.status,
            "reasons": list(self.reasons),
            "details": list(self.details),
            "issuer": self.issuer,
            "this_update": _when(self.this_update),
            "next_update": _when(self.next_update),
            "days_left": self.days_left,
            "revoked": self.revoked,
            "error": self.error,
        }


def judge_crl(
    crl: x509.CertificateRevocationList,
    *,
    source: str,
    path: str,
    target: str | None = None,
    now: _dt.datetime,
) -> CrlResult:
    """Status and reasons for one CRL (its nextUpdate and thisUpdate against ``now``)."""
    issuer = rfc4514_dn(crl.issuer)
    nxt = crl.next_update_utc
    this = crl.last_update_utc
    found: list[tuple[str, str]] = []
    if nxt is not None and nxt <= now:
        found.append(
            (
                "crl-expired",
                f"the CRL of {issuer} was due on {nxt:%Y-%m-%d %H:%M} UTC (nextUpdate): the "
                "server's OpenSSL now refuses every client certificate it covers, and libpq "
                f'reports "{CRL_EXPIRED_ALERT}" (newer OpenSSL: "{CRL_EXPIRED_ALERT_NEW}") '
                "though the certificate is valid; publish a new CRL and reload the server",
            )
        )
    if this > now:
        found.append(
            (
                "crl-not-yet-valid",
                f"the CRL of {issuer} is not valid before {this:%Y-%m-%d %H:%M} UTC "
                "(thisUpdate): the server refuses the client certificates it covers until then",
            )
        )
    return CrlResult(
        source=source,
        path=path,
        status=_status(found, CRL_REASONS, None, 0),
        reasons=tuple(c for c, _ in found),
        details=tuple(s for _, s in found),
        target=target,
        issuer=issuer,
        this_update=this,
        next_update=nxt,
        days_left=None if nxt is None else (nxt - now).days,
        revoked=len(crl),
    )


def unreadable_crl(source: str, path: str, sentence: str, target: str | None = None) -> CrlResult:
    """A CRL file that could not be read or parsed."""
    return CrlResult(
        source, path, "unknown", ("unreadable",), (sentence,), target=target,
        error=f"{source}: {sentence}",
    )  # fmt: skip


@dataclass(frozen=True)
class SessionGroup:
    """The sessions that present a client certificate from one issuer (``pg_stat_ssl``)."""

    issuer_dn: str  # as pg_stat_ssl.issuer_dn shows it: /C=US/O=.../CN=...
    client_cert_sessions: int
    known: int  # of which the certificate is a listed client user's (serial and issuer)
    fewest_days_left: int | None  # among the known ones

    def as_json(self) -> dict[str, Any]:
        return {
            "issuer_dn": self.issuer_dn,
            "client_cert_sessions": self.client_cert_sessions,
            "known": self.known,
            "fewest_days_left": self.fewest_days_left,
        }


@dataclass(frozen=True)
class SessionInventory:
    """A server's client sessions now: over TLS, over TCP without it, on the Unix socket
    (``error`` says why they were not read: a role without ``pg_read_all_stats`` sees only its
    own)."""

    tls: int = 0
    without_tls: int = 0
    unix_socket: int = 0
    by_issuer: tuple[SessionGroup, ...] = ()
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "tls": self.tls,
            "without_tls": self.without_tls,
            "unix_socket": self.unix_socket,
            "by_issuer": [g.as_json() for g in self.by_issuer],
            "error": self.error,
        }


#: One row of :data:`pgtls_helpers.postgres.watch_login.SESSIONS_SQL`: ssl, over TCP,
#: client_serial as text, issuer_dn.
SessionRow = tuple[bool, bool, str | None, str | None]


def session_inventory(
    rows: Sequence[SessionRow], known: Sequence[x509.Certificate], now: _dt.datetime
) -> SessionInventory:
    """Count sessions by issuer, and the fewest days left of the known client certificates.

    >>> inv = session_inventory([(True, True, "7", "/CN=CA"), (False, True, None, None)], [],
    ...                         _dt.datetime(2026, 1, 1, tzinfo=_dt.UTC))
    >>> inv.tls, inv.without_tls, [(g.issuer_dn, g.client_cert_sessions) for g in inv.by_issuer]
    (1, 1, [('/CN=CA', 1)])
    """
    by_serial = {(stat_ssl_dn(c.issuer), c.serial_number): c for c in known}
    tls = plain = local = 0
    groups: dict[str, list[int | None]] = {}
    for ssl, tcp, serial, issuer in rows:
        if not ssl:
            plain, local = (plain + 1, local) if tcp else (plain, local + 1)
            continue
        tls += 1
        if serial is None or issuer is None:
            continue
        cert = by_serial.get((issuer, int(serial)))
        days = None if cert is None else (cert.not_valid_after_utc - now).days
        groups.setdefault(issuer, []).append(days)
    return SessionInventory(
        tls=tls,
        without_tls=plain,
        unix_socket=local,
        by_issuer=tuple(
            SessionGroup(
                issuer_dn=issuer,
                client_cert_sessions=len(days),
                known=sum(d is not None for d in days),
                fewest_days_left=min((d for d in days if d is not None), default=None),
            )
            for issuer, days in sorted(groups.items())
        ),
    )
