"""``pgtls watch``: what many servers serve, whether it is trusted, how long it lasts.

Per target, with many targets at once: the SSLRequest handshake and the presented chain
(:mod:`pgtls_helpers.postgres.wire`), PostgreSQL 17's direct TLS (tried where the SSLRequest
handshake selected ALPN ``postgresql``, as only 17 and later do) and the plaintext posture
(:mod:`pgtls_helpers.postgres.watch_wire`), optionally, through one login
(:mod:`pgtls_helpers.postgres.watch_login`), the certificate and the CRLs on disk and the sessions
by issuer; then one status and stable reason codes:

========  =====================================================================================
status    reasons
========  =====================================================================================
ok        (none)
warning   ``expires-soon`` (within the warning days), ``plaintext-accepted``, ``weak-protocol``
          (below TLS 1.2), ``on-disk-differs``
critical  ``expired``, ``expires-soon`` (within the critical days), ``incomplete-chain``,
          ``untrusted``, ``hostname-mismatch``, ``no-ssl``
unknown   ``unreachable``, ``timeout``, ``not-postgres``, ``on-disk-unreadable`` (``--on-disk``
          could not log in or read the files)
========  =====================================================================================

Every element of the presented chain counts (and the trust anchor from ``--root``), not only
the leaf: an intermediate that expires first is what breaks clients first.

Targets, options, results and the classification are pure values and live in
:mod:`pgtls_helpers.pki.posture`; this module reads the targets file and the roots, and talks
to the servers.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509

from pgtls_helpers.errors import InputError
from pgtls_helpers.pki.client import rfc4514_dn
from pgtls_helpers.pki.client_posture import CrlResult, SessionInventory, session_inventory
from pgtls_helpers.pki.posture import (
    WIRE_REASONS,
    ChainElement,
    Target,
    TargetResult,
    WatchOptions,
    classify,
    role_of,
    status_of,
)
from pgtls_helpers.pki.target import parse_target
from pgtls_helpers.postgres.watch_clients import crls_in
from pgtls_helpers.postgres.watch_login import server_facts
from pgtls_helpers.postgres.watch_wire import direct_tls, plaintext_posture
from pgtls_helpers.postgres.wire import ALPN, WireError, cert_der, handshake_alpn


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
        subject=rfc4514_dn(cert.subject),
        issuer=rfc4514_dn(cert.issuer),
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
    # One deadline for every connection to this target: --timeout bounds the target, not
    # each read, or a server trickling bytes could hold a run for as long as it likes.
    deadline = time.monotonic() + options.timeout
    try:
        version, cipher, presented, alpn = handshake_alpn(
            host, port, options.timeout, deadline=deadline
        )
    except WireError as exc:
        reason = WIRE_REASONS.get(exc.kind, "no-ssl" if exc.kind == "handshake" else "unreachable")
        sentence = str(exc)
        if reason != "no-ssl":
            return TargetResult(
                **base,
                status="unknown",
                reasons=(reason,),
                details=(sentence,),
                error=f"{target.text}: {sentence}",
            )
        posture = plaintext_posture(host, port, options.timeout, deadline=deadline)
        reasons = [("no-ssl", sentence)]
        if posture.verdict == "accepted":
            reasons.append(
                ("plaintext-accepted", "pg_hba.conf lets a client start a login without TLS")
            )
        return TargetResult(
            **base,
            status=status_of(reasons, None, options.crit_days),
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
    if alpn == ALPN and direct_tls(host, port, options.timeout, deadline=deadline).supported:
        negotiation.append("direct")
    posture = plaintext_posture(host, port, options.timeout, deadline=deadline)
    on_disk_leaf: x509.Certificate | None = None
    on_disk_error: str | None = None
    login_note: str | None = None
    crls: tuple[CrlResult, ...] = ()
    sessions: SessionInventory | None = None
    if options.on_disk or options.sessions:
        facts = server_facts(
            host,
            port,
            timeout=options.timeout,
            user=options.user,
            dbname=options.dbname,
            root_path=options.root_path,
            on_disk=options.on_disk,
            sessions=options.sessions,
        )
        if facts.leaf_der is not None:
            on_disk_leaf = cache.load(facts.leaf_der)
        on_disk_error = facts.on_disk_error
        found: list[CrlResult] = []
        if facts.crl_data is not None and facts.crl_path:
            found += crls_in(
                facts.crl_data,
                source=f"{target.text} ssl_crl_file",
                path=facts.crl_path,
                now=now,
                target=target.text,
            )
        for name, data in facts.crl_dir_files or ():
            found += crls_in(
                data,
                source=f"{target.text} ssl_crl_dir",
                path=f"{facts.crl_dir}/{name}",
                now=now,
                target=target.text,
            )
        crls = tuple(found)
        if facts.sessions is not None:
            sessions = session_inventory(facts.sessions, options.client_certs, now)
        elif options.sessions:
            sessions = SessionInventory(error=facts.error or "not read")
        if facts.error is not None:
            flags = " ".join(
                f for f, on in (("--on-disk", options.on_disk), ("--sessions", options.sessions))
                if on
            )  # fmt: skip
            login_note = f"{target.text}: {flags}: {facts.error}"
    reasons, verified, hostname_ok, days = classify(
        target,
        tls_version=version,
        chain=chain,
        options=options,
        plaintext=posture.verdict,
        on_disk_leaf=on_disk_leaf,
        on_disk_error=on_disk_error,
        at=now,
    )
    return TargetResult(
        **base,
        status=status_of(reasons, days, options.crit_days),
        reasons=tuple(c for c, _ in reasons),
        details=tuple(s for _, s in reasons),
        tls_version=version,
        cipher=cipher,
        negotiation=tuple(negotiation),
        chain=tuple(_element(c, role_of(c, i), now) for i, c in enumerate(chain)),
        verified=verified,
        hostname_ok=hostname_ok,
        plaintext=posture.verdict,
        error=login_note,
        on_disk_sha256=None if on_disk_leaf is None else _element(on_disk_leaf, "leaf", now).sha256,
        days_left=days,
        crls=crls,
        sessions=sessions,
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
