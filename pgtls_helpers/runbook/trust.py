"""The client-trust change of a CA rotation: roots added to, or removed from, each listed
client OS user's ``~/.postgresql/root.crt``, merged and deduplicated, with backups, then
proven by ``psql sslmode=verify-full`` as each user against the chain the server serves today.

The *trust* phase adds the new root beside the old one (``add_roots``); the *retire* phase
removes the old one (``remove_roots``: files, or SHA-256 fingerprints in hex, with or without
colons, any case) once every server has moved. A change that would leave a user unable to
verify what the server serves now is refused before any file is written.
"""

from __future__ import annotations

import re
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509

from pgtls_helpers.errors import InputError, PgtlsError, PreflightError, ServerError
from pgtls_helpers.pki import chain as chainmod
from pgtls_helpers.pki.findings import Finding, reasons
from pgtls_helpers.postgres import files
from pgtls_helpers.postgres.clients import ClientUser, ConnCheck, plan_client_root
from pgtls_helpers.postgres.lock import change_lock
from pgtls_helpers.runbook.common import (
    address_of,
    lock_directory,
    open_server,
    pem_of,
    rfc4514,
    save_step,
)
from pgtls_helpers.runbook.journal import (
    CHANGED_BACK,
    TRUST_STEP,
    FileChange,
    Journal,
    is_client_trust,
)
from pgtls_helpers.runbook.params import Params
from pgtls_helpers.runbook.record import pgtls_command
from pgtls_helpers.runbook.renewal import cert_row, user_roots
from pgtls_helpers.runbook.undo import checked_journal, undo_change

__all__ = ["TrustResult", "client_trust", "parse_fingerprint", "rollback_trust", "trust_backout"]

_HEX = re.compile(r"^[0-9a-f]{64}$")


def parse_fingerprint(text: str) -> str | None:
    """A SHA-256 fingerprint as lowercase hex, from hex with or without colons, any case.

    >>> parse_fingerprint("AB:" * 31 + "CD") == "ab" * 31 + "cd"
    True
    >>> parse_fingerprint("not-a-fingerprint") is None
    True
    """
    plain = text.strip().replace(":", "").lower()
    return plain if _HEX.match(plain) else None


def load_certs(path: Path, what: str) -> list[x509.Certificate]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{what}: {path}: {exc.strerror}; list root certificate files") from None
    try:
        certs = (
            list(x509.load_pem_x509_certificates(data))
            if b"-----BEGIN" in data
            else [x509.load_der_x509_certificate(data)]
        )
    except ValueError:
        raise InputError(f"{what}: {path} holds no certificate (PEM or DER)") from None
    for cert in certs:
        try:
            ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            ca = False
        if not ca:
            raise InputError(
                f"{what}: {path} holds {chainmod.cert_label(cert)}, which is not a CA "
                "certificate; list the CA's root certificate"
            )
    return certs


def _removals(params: Params) -> set[str]:
    out: set[str] = set()
    for item in params.remove_roots:
        fp = parse_fingerprint(item)
        if fp:
            out.add(fp)
        elif Path(item).exists():
            out |= {chainmod.fingerprint(c) for c in load_certs(Path(item), "remove_roots")}
        else:
            raise InputError(
                f"remove_roots: '{item}' is neither a file nor a SHA-256 fingerprint (64 hex "
                "digits, colons allowed)"
            )
    return out


@dataclass(frozen=True)
class TrustResult:
    """The plan per user, and (when applied) what was written and the proof."""

    served: list[dict[str, Any]]
    added: list[dict[str, Any]]
    removed: list[str]
    plan: list[dict[str, Any]]
    preflight: list[Finding]
    installed: files.InstallResult | None = None
    checks: list[ConnCheck] = field(default_factory=list)
    applied: bool = False
    planned: list[dict[str, object]] = field(default_factory=list)  # for the record

    @property
    def verdict(self) -> str | None:
        if not self.applied:
            return None
        return "pass" if self.checks and all(c.passed for c in self.checks) else "fail"

    def summary(self) -> dict[str, Any]:
        return {
            "served": self.served,
            "added": self.added,
            "removed": self.removed,
            "plan": self.plan,
            "planned_files": self.planned,
            "preflight": [f.__dict__ for f in self.preflight],
            "applied": self.applied,
            "installed": self.installed.as_dicts() if self.installed else [],
            "checks": [c.as_dict() for c in self.checks],
            "verdict": self.verdict,
        }


def _verifies(served: list[x509.Certificate], roots: list[x509.Certificate]) -> str | None:
    """Why libpq's OpenSSL would refuse the served chain with ``roots`` as root.crt (None: it
    verifies), the verdict of :mod:`pgtls_helpers.pki.openssl`."""
    from pgtls_helpers.pki import openssl

    checked = openssl.verify(served[0], served[1:], roots)
    return None if checked.ok else checked.reason


def client_trust(params: Params) -> TrustResult:
    """Plan, and with ``apply`` make, the root.crt change for every listed client OS user.

    Raises:
        InputError: no users, nothing to add or remove, or a listed file is not a CA's root.
        PreflightError: a user would no longer verify the chain served now (nothing written).
        ServerError: a user's psql with verify-full failed afterwards (files restored).
    """
    from pgtls_helpers.postgres.clients import psql_as_user, resolve_client_users
    from pgtls_helpers.postgres.probe import probe

    users = resolve_client_users(params.client_system_users)
    if not users:
        raise InputError(
            "client_system_users is empty: list the client OS users whose root.crt changes"
        )
    if not params.add_roots and not params.remove_roots:
        raise InputError(
            "add_roots and remove_roots are both empty: list the new root to trust (add_roots) "
            "or the old one to retire (remove_roots)"
        )
    add: list[x509.Certificate] = []
    for item in params.add_roots:
        add += load_certs(Path(item), "add_roots")
    remove = _removals(params)
    hostaddr = address_of(params.server_host)
    now = probe(hostaddr, params.server_port, timeout=5.0)
    if not now.ok or not now.chain:
        raise PreflightError(
            f"{params.server_host}:{params.server_port} presents no certificate "
            f"({now.error or 'no chain'}); the client-trust change proves itself against the "
            "chain the server serves, so the server must serve TLS"
        )
    served = list(now.chain)
    preflight: list[Finding] = []
    plans, rows = [], []
    for user in users:
        current, after, plan = _plan_user(user, add, remove)
        if not after:
            preflight.append(
                Finding("error", "no-roots-left", f"{user.name}'s root.crt would hold no root")
            )
        elif (why := _verifies(served, after)) is not None:
            preflight.append(
                Finding(
                    "error",
                    "would-not-verify",
                    f"after this change {user.name} would no longer trust the chain "
                    f"{params.server_host}:{params.server_port} serves now (issued by "
                    f'{rfc4514(served[-1].issuer)}; OpenSSL, as libpq uses it: "{why}"); keep '
                    "that root until the server serves the new chain",
                )
            )
        plans.append(plan)
        rows.append(
            {
                **plan.describe(),
                "user": user.name,
                "roots before": [chainmod.cert_label(c) for c in current],
                "roots after": [chainmod.cert_label(c) for c in after],
            }
        )
    result = TrustResult(
        served=[cert_row(c) for c in served],
        added=[cert_row(c) for c in add],
        removed=sorted(remove),
        plan=rows,
        preflight=preflight,
        planned=[{**p.record(), "user": u.name} for u, p in zip(users, plans, strict=True)],
    )
    errors = [f for f in preflight if f.severity == "error"]
    if errors or not params.apply:
        save_step(params, "client_trust", result.summary())
        if errors:
            raise PreflightError(f"no root.crt was changed: {reasons(errors)}")
        return result
    with ExitStack() as stack:
        # one change holds the lock from its first write until its proof is in (or undone)
        if any(p.action != "unchanged" for p in plans):
            _lock(params, stack)
        installed = _apply(params, users, plans, add, remove)
        # each client's own login (its role and ~/.pgpass): a refused login still proves the TLS
        checks = [
            psql_as_user(
                u,
                params.conninfo(),
                host=params.hosts[0],
                hostaddr=hostaddr,
                role=params.client_roles.get(u.name),
            )
            for u in users
        ]
        done = TrustResult(
            result.served,
            result.added,
            result.removed,
            rows,
            preflight,
            installed,
            checks,
            applied=True,
            planned=result.planned,
        )
        save_step(params, "client_trust", done.summary())
        failed = [c for c in checks if not c.passed]
        if failed:
            if installed.changed:
                undo_change(params, server=None, reason="undone")
            raise ServerError(
                "verify-full failed after the change ("
                + "; ".join(f"{c.check}: {c.detail}" for c in failed)
                + "); every root.crt was restored from its backup"
            )
    return done


def _plan_user(
    user: ClientUser, add: list[x509.Certificate], remove: set[str]
) -> tuple[list[x509.Certificate], list[x509.Certificate], files.PlannedFile]:
    """The user's roots now, after the change, and the root.crt write that makes it so."""
    current = user_roots(user)
    seen: set[str] = set()
    after: list[x509.Certificate] = []
    for cert in [*current, *add]:
        fp = chainmod.fingerprint(cert)
        if fp in seen or fp in remove:
            continue
        seen.add(fp)
        after.append(cert)
    return current, after, plan_client_root(user, b"".join(pem_of(c) for c in after))


def _apply(
    params: Params,
    users: list[ClientUser],
    plans: list[files.PlannedFile],
    add: list[x509.Certificate],
    remove: set[str],
) -> files.InstallResult:
    """Write the planned root.crt files (the caller holds the change lock), each journaled
    before it is written (a killed change rolls back like any other); a user whose file
    changed while we waited is planned again, and refused if the plan would differ."""
    if all(p.action == "unchanged" for p in plans):
        return files.InstallResult(tuple(Journal.unchanged(p) for p in plans))
    for user, planned in zip(users, plans, strict=True):
        _current, _after, again = _plan_user(user, add, remove)
        if again.data != planned.data:
            raise PreflightError(
                f"{user.root_crt}: changed while this change waited for the lock; no "
                "root.crt was changed, run the trust change again to plan it afresh"
            )
    journal = Journal.begin(
        params.work,
        TRUST_STEP,
        {"server": f"{params.server_host}:{params.server_port}", "kind": "client-trust"},
        backing_up=[planned.target for planned in plans],
    )
    done = []
    try:
        for user, planned in zip(users, plans, strict=True):
            journal.client_dir(user)
            done.append(journal.write_file(plan_client_root(user, planned.data)))
    except Exception:
        undo_change(params, server=None, reason="undone")
        raise
    journal.end("ok")
    return files.InstallResult(tuple(done))


def _lock(params: Params, stack: ExitStack, *, take: bool = True) -> None:
    """The server's change lock (see :func:`pgtls_helpers.runbook.common.lock_directory`);
    when the runbook's role cannot log in from here, the lock file in the work root. With
    ``take`` False (a dry run) the lock is only looked at, and nothing is created."""
    try:
        server = stack.enter_context(open_server(params))
        facts = server.facts()
    except PgtlsError:
        if take:
            params.work.create()
        root = params.work.path.parent
        stack.enter_context(change_lock(root, None, None, params.change_id, take=take))
        return
    directory, owner = lock_directory(params, facts)
    stack.enter_context(change_lock(directory, owner, server, params.change_id, take=take))


def _trust_journal(params: Params) -> list[FileChange]:
    """The change's journal, checked (:func:`checked_journal`) and a client-trust change's."""
    entries, changes, _before = checked_journal(params)
    if not is_client_trust(entries):
        raise PreflightError(
            f"{params.work.journal}: the journal of change {params.change_id} is not a "
            f"client-trust change's; roll it back with {pgtls_command()} rollback PARAMS.yaml"
        )
    return changes


def rollback_trust(params: Params) -> list[Path]:
    """Back out a client-trust change, applied or killed half-way: every root.crt back from
    its backup (bytes, owner, mode), a ``~/.postgresql`` it made removed once empty; the
    journal is kept, renamed, for the record."""
    with ExitStack() as stack:
        _lock(params, stack)
        _trust_journal(params)
        undone = undo_change(params, server=None, reason="rolled-back")
    return [r.target for r in undone.restored if r.action in CHANGED_BACK]


def trust_backout(params: Params) -> list[FileChange]:
    """What :func:`rollback_trust` would put back, in its order, after the same checks and
    with the same refusals (the change lock only looked at); nothing is written."""
    with ExitStack() as stack:
        _lock(params, stack, take=False)
        changes = _trust_journal(params)
    return list(reversed(changes))
