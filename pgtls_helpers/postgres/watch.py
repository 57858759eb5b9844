"""``pgtls watch``: what many servers serve, whether it is trusted, how long it lasts.

Per target, with many targets at once: the SSLRequest handshake and the presented chain
(:mod:`pgtls_helpers.postgres.wire`), PostgreSQL 17's direct TLS (tried where the SSLRequest
handshake selected ALPN ``postgresql``, as only 17 and later do) and the plaintext posture
(:mod:`pgtls_helpers.postgres.watch_wire`), optionally the certificate on disk; then one status and
stable reason codes:

========  =====================================================================================
status    reasons
========  =====================================================================================
ok        (none)
warning   ``expires-soon`` (within the warning days), ``plaintext-accepted``, ``weak-protocol``
          (below TLS 1.2), ``on-disk-differs``
critical  ``expired``, ``expires-soon`` (within the critical days), ``incomplete-chain``,
          ``untrusted``, ``hostname-mismatch``, ``no-ssl``
unknown   ``unreachable``, ``timeout``, ``not-postgres``
========  =====================================================================================

Every element of the presented chain counts (and the trust anchor from ``--root``), not only
the leaf: an intermediate that expires first is what breaks clients first.

The module runs past 500 lines because targets, results, classification and orchestration are
read together; the classification functions are pure (values in, reasons out) and can move
into the pure layer as they are.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import hashlib
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509

from pgtls_helpers.errors import InputError
from pgtls_helpers.pki.chain import is_ca, is_self_signed, same_name, signed_by
from pgtls_helpers.pki.hostname import check_host, explain
from pgtls_helpers.postgres.watch_wire import direct_tls, plaintext_posture, served_vs_disk
from pgtls_helpers.postgres.wire import (
    ALPN,
    DEFAULT_PORT,
    WireError,
    cert_der,
    format_target,
    handshake_alpn,
    parse_target,
)

__all__ = [
    "REASONS",
    "STATUSES",
    "ChainElement",
    "Target",
    "TargetResult",
    "WatchOptions",
    "classify",
    "load_roots",
    "parse_targets",
    "summary",
    "watch",
]

STATUSES = ("ok", "warning", "critical", "unknown")
#: Every reason code with its status; ``expires-soon`` is a warning or critical by its days.
REASONS: dict[str, str] = {
    "expired": "critical",
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
}
_WEAK = {"SSLv2", "SSLv3", "TLSv1", "TLSv1.1"}
_WIRE_REASONS = {"timeout": "timeout", "not-postgres": "not-postgres", "no-ssl": "no-ssl"}


@dataclass(frozen=True)
class Target:
    """One server to watch: ``host`` is also the name checked with libpq's verify-full rules."""

    host: str
    port: int = DEFAULT_PORT

    @property
    def text(self) -> str:
        """``host:port``, with brackets around an IPv6 address."""
        return format_target(self.host, self.port)


def parse_targets(args: Iterable[str] = (), targets_file: str | Path | None = None) -> list[Target]:
    """Targets from the command line and a file (one a line, ``#`` comments), duplicates once.

    >>> [t.text for t in parse_targets(["db1", "db2:6432", "db1:5432"])]
    ['db1:5432', 'db2:6432']

    Raises:
        InputError: a target is not ``HOST[:PORT]``, the file cannot be read, or nothing is
            left to watch.
    """
    found: list[Target] = []
    for text in args:
        found.append(Target(*parse_target(text)))
    if targets_file is not None:
        path = Path(targets_file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise InputError(f"{path}: no such targets file; give one HOST[:PORT] a line") from None
        except UnicodeDecodeError:
            raise InputError(
                f"{path}: not a text file; give one HOST[:PORT] a line ('#' starts a comment)"
            ) from None
        except OSError as exc:
            raise InputError(f"{path}: cannot be read ({exc.strerror}); check the path") from None
        for number, line in enumerate(lines, 1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            try:
                found.append(Target(*parse_target(text)))
            except InputError as exc:
                raise InputError(f"{path} line {number}: {exc}") from None
    if not found:
        raise InputError("no targets: give HOST[:PORT] arguments or --targets-file FILE")
    return list(dict.fromkeys(found))


def load_roots(path: str | Path) -> tuple[x509.Certificate, ...]:
    """The trust anchors in a ``root.crt`` (PEM, one or more certificates; or one DER).

    Raises:
        InputError: the file is missing or holds no certificate.
    """
    file = Path(path)
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise InputError(
            f"{file}: cannot read the root certificate ({exc.strerror}); give the CA's root.crt"
        ) from None
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        try:
            certs = [x509.load_der_x509_certificate(data)]
        except ValueError:
            raise InputError(
                f"{file}: no certificate in it; --root takes the CA's root certificate (PEM)"
            ) from None
    return tuple(certs)


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
            "hostname_ok": self.hostname_ok,
            "plaintext": self.plaintext,
            "on_disk_sha256": self.on_disk_sha256,
            "error": self.error,
        }


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
    return cert.subject.rfc4514_string() or "(empty subject)"


def _role(cert: x509.Certificate, index: int) -> str:
    if index == 0:
        return "leaf"
    return "root" if is_self_signed(cert) else "intermediate"


def _issued_by(child: x509.Certificate, issuer: x509.Certificate) -> bool:
    return same_name(child.issuer, issuer.subject) and signed_by(child, issuer)


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
    issuer = top.issuer.rfc4514_string()
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
    """cryptography's RFC 5280 verdict on the chain alone (the name is libpq's business)."""
    from cryptography.x509 import verification as v

    leaf = chain[0]
    try:
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names: list[x509.GeneralName] = [
            n for n in sans if isinstance(n, x509.DNSName | x509.IPAddress)
        ]
    except (x509.ExtensionNotFound, ValueError):
        names = []
    builder = v.PolicyBuilder().store(v.Store(list(roots))).time(at)
    try:
        if names:
            name = names[0]
            subject = (
                v.DNSName(name.value) if isinstance(name, x509.DNSName) else v.IPAddress(name.value)
            )
            builder.build_server_verifier(subject).verify(leaf, list(chain[1:]))
        elif hasattr(v, "ExtensionPolicy"):  # cryptography 45+: a CN-only leaf, as libpq allows
            builder.extension_policies(
                ca_policy=v.ExtensionPolicy.webpki_defaults_ca(),
                ee_policy=v.ExtensionPolicy.permit_all(),
            ).build_client_verifier().verify(leaf, list(chain[1:]))
        else:
            return "the leaf has no subjectAltName, which this cryptography cannot verify"
    except v.VerificationError as exc:
        return str(exc)
    except (ValueError, TypeError) as exc:
        return f"cannot be verified ({exc})"
    return None


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
    members = [(c, _role(c, i)) for i, c in enumerate(chain)]
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
    at: _dt.datetime | None = None,
) -> tuple[list[tuple[str, str]], bool | None, bool | None, int | None]:
    """The reasons (code, sentence) for a completed handshake, ``verified``, ``hostname_ok``
    and the worst element's days left."""
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
    return found, verified, host_check.matched, days


def _status(reasons: Sequence[tuple[str, str]], days: int | None, crit_days: int) -> str:
    worst = 0
    for code, _ in reasons:
        severity = REASONS[code]
        if code == "expires-soon" and days is not None and days >= crit_days:
            severity = "warning"
        worst = max(worst, status_rank(severity))
    return STATUSES[worst]


# --- orchestration: the wire, many targets at once ------------------------------------------


@dataclass
class _Cache:
    """Parsed certificates and their rows, shared by every target (fleets share chains)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    certs: dict[bytes, x509.Certificate] = field(default_factory=dict)

    def load(self, der: bytes) -> x509.Certificate:
        cert = self.certs.get(der)
        if cert is None:
            cert = x509.load_der_x509_certificate(der)
            with self.lock:
                cert = self.certs.setdefault(der, cert)
        return cert


def _element(cert: x509.Certificate, role: str, now: _dt.datetime) -> ChainElement:
    from cryptography.hazmat.primitives.serialization import Encoding

    end = cert.not_valid_after_utc
    return ChainElement(
        sha256=hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest(),
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        not_after=end,
        days_left=(end - now).days,
        role=role,
    )


def check_target(
    target: Target, options: WatchOptions, cache: _Cache | None = None
) -> TargetResult:
    """Every check for one target; never raises for a misbehaving server."""
    cache = cache or _Cache()
    now = options.now or _dt.datetime.now(_dt.UTC)
    host, port = target.host, target.port
    base: dict[str, Any] = {"target": target.text, "host": host, "port": port}
    try:
        version, cipher, presented, alpn = handshake_alpn(host, port, options.timeout)
    except WireError as exc:
        reason = _WIRE_REASONS.get(exc.kind, "no-ssl" if exc.kind == "handshake" else "unreachable")
        sentence = str(exc)
        if reason != "no-ssl":
            return TargetResult(
                **base,
                status="unknown",
                reasons=(reason,),
                details=(sentence,),
                error=f"{target.text}: {sentence}",
            )
        posture = plaintext_posture(host, port, options.timeout)
        reasons = [("no-ssl", sentence)]
        if posture.verdict == "accepted":
            reasons.append(
                ("plaintext-accepted", "pg_hba.conf lets a client start a login without TLS")
            )
        return TargetResult(
            **base,
            status=_status(reasons, None, options.crit_days),
            reasons=tuple(c for c, _ in reasons),
            details=tuple(s for _, s in reasons),
            plaintext=posture.verdict,
            error=f"{target.text}: {sentence}",
        )
    try:
        chain = [cache.load(cert_der(c)) for c in presented]
    except ValueError as exc:
        sentence = f"the server presented a certificate that cannot be parsed ({exc})"
        return TargetResult(
            **base,
            status="critical",
            reasons=("untrusted",),
            details=(sentence,),
            error=f"{target.text}: {sentence}",
        )
    negotiation = ["sslrequest"]
    # Only a server that selects ALPN "postgresql" after SSLRequest (PostgreSQL 17 and later)
    # can speak direct TLS; older ones ignore ALPN and are spared a connection.
    if alpn == ALPN and direct_tls(host, port, options.timeout).supported:
        negotiation.append("direct")
    posture = plaintext_posture(host, port, options.timeout)
    on_disk_leaf: x509.Certificate | None = None
    disk_note: str | None = None
    if options.on_disk:
        disk = served_vs_disk(
            host,
            port,
            timeout=options.timeout,
            user=options.user,
            dbname=options.dbname,
            root_path=options.root_path,
        )
        if disk.leaf_der is not None:
            on_disk_leaf = cache.load(disk.leaf_der)
        else:
            disk_note = f"{target.text}: --on-disk: {disk.error}"
    reasons, verified, hostname_ok, days = classify(
        target,
        tls_version=version,
        chain=chain,
        options=options,
        plaintext=posture.verdict,
        on_disk_leaf=on_disk_leaf,
        at=now,
    )
    return TargetResult(
        **base,
        status=_status(reasons, days, options.crit_days),
        reasons=tuple(c for c, _ in reasons),
        details=tuple(s for _, s in reasons),
        tls_version=version,
        cipher=cipher,
        negotiation=tuple(negotiation),
        chain=tuple(_element(c, _role(c, i), now) for i, c in enumerate(chain)),
        verified=verified,
        hostname_ok=hostname_ok,
        plaintext=posture.verdict,
        error=disk_note,
        on_disk_sha256=None if on_disk_leaf is None else _element(on_disk_leaf, "leaf", now).sha256,
        days_left=days,
    )


def watch(targets: Sequence[Target], options: WatchOptions | None = None) -> list[TargetResult]:
    """Check every target, ``options.concurrency`` at a time; results in the order given."""
    opts = options or WatchOptions()
    if opts.now is None:
        opts = dataclasses.replace(opts, now=_dt.datetime.now(_dt.UTC))
    cache = _Cache()
    if len(targets) <= 1 or opts.concurrency == 1:
        return [check_target(t, opts, cache) for t in targets]
    with ThreadPoolExecutor(
        max_workers=min(opts.concurrency, len(targets)), thread_name_prefix="pgtls-watch"
    ) as pool:
        return list(pool.map(lambda t: check_target(t, opts, cache), targets))
