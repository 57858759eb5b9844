"""Renewal and CA rotation on a server that already serves TLS.

Step 3 asks :func:`assess` what is served now against what will be served: a renewal (same
root), a renewal whose intermediates change, or a CA rotation (a different root), with the
checks that belong to each (a shorter validity, dropped names, a new root the listed clients do
not trust yet, a passphrase key that cannot be re-read at reload). Step 1 asks
:func:`installed_key` for the key to re-sign with ``reuse_key``. Step 4 wraps its reload in a
:class:`ReloadWatch`: a client connecting with ``verify-full`` in a loop across the reload, the
served fingerprints before and after, and, when the server did not take the new certificate,
proof that the old one is served again after the restore.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from pgtls_helpers.errors import PgtlsError, PreflightError
from pgtls_helpers.pki import chain as chainmod
from pgtls_helpers.pki import keys
from pgtls_helpers.pki.findings import Finding
from pgtls_helpers.pki.subject import SUBJECT_FIELDS
from pgtls_helpers.postgres import files
from pgtls_helpers.postgres.clients import ClientUser, read_client_file
from pgtls_helpers.runbook.common import (
    address_of,
    key_passphrase,
    open_server,
    pem_of,
    rfc4514,
    ssl_targets,
)
from pgtls_helpers.runbook.params import Params

if TYPE_CHECKING:
    from pgtls_helpers.postgres.probe import ProbeResult
    from pgtls_helpers.postgres.server import ServerFacts

__all__ = [
    "LoopResult",
    "ReloadWatch",
    "RenewalPlan",
    "assess",
    "cert_row",
    "ClientLoop",
    "inherit_names",
    "installed_key",
    "names_of",
    "read_roots",
    "user_roots",
    "trusts",
]

# How many verify-full connections the runbook's own client makes across a renewal's reload.
LOOP_MIN_CONNECTIONS = 200


def cert_row(cert: x509.Certificate, *, now: datetime | None = None) -> dict[str, Any]:
    """A certificate as the plan and the record show it: fingerprint, names, days left."""
    now = now or datetime.now(timezone.utc)
    return {
        "sha256": chainmod.fingerprint(cert),
        "subject": rfc4514(cert.subject),
        "issuer": rfc4514(cert.issuer),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "days_left": (cert.not_valid_after_utc - now).days,
    }


names_of = chainmod.names_of  # the one SAN reader, under its old name here


def read_roots(path: Path) -> list[x509.Certificate]:
    """The certificates of a ``root.crt`` (none when it is missing or holds none)."""
    try:
        data = path.read_bytes()
    except OSError:
        return []
    try:
        return list(x509.load_pem_x509_certificates(data))
    except ValueError:
        return []


def user_roots(user: ClientUser) -> list[x509.Certificate]:
    """The certificates of a client's ``~/.postgresql/root.crt``, read the client-home way
    (no link followed, non-blocking, size capped: a FIFO or a device there is refused)."""
    if not user.root_crt.parent.exists():
        return []
    data = read_client_file(user.root_crt, user.uid)
    try:
        return list(x509.load_pem_x509_certificates(data)) if data else []
    except ValueError:
        return []


def trusts(user: ClientUser, root: x509.Certificate) -> bool:
    """Whether ``root`` is in the user's ``~/.postgresql/root.crt``."""
    want = chainmod.fingerprint(root)
    return any(chainmod.fingerprint(c) == want for c in user_roots(user))


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """``issuer`` issued ``cert``, or is that very certificate (a root held as itself)."""
    return chainmod.fingerprint(cert) == chainmod.fingerprint(issuer) or chainmod.issued_by(
        cert, issuer
    )


@dataclass(frozen=True)
class RenewalPlan:
    """What is served now next to what will be served, and what kind of change that is."""

    kind: str  # "renewal", "renewal, intermediates change", "CA rotation", "no change"
    served: list[dict[str, Any]]  # the chain presented now, leaf first
    new: list[dict[str, Any]]  # the chain that will be presented
    served_root: str | None
    new_root: str | None
    names_added: list[str]
    names_dropped: list[str]
    subject_before: str
    subject_after: str
    clients: list[dict[str, Any]] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    @property
    def rotation(self) -> bool:
        return self.kind == "CA rotation"

    def summary(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["findings"] = [f.__dict__ for f in self.findings]
        return out


def assess(
    params: Params,
    facts: ServerFacts,
    new_chain: Sequence[x509.Certificate],
    new_root: x509.Certificate | None,
    users: Sequence[ClientUser],
    *,
    encrypted_key: bool,
) -> RenewalPlan | None:
    """Compare the chain served now with ``new_chain`` (leaf first, as it will be served).

    None when the server serves no TLS yet (a first install, not a renewal). Errors (the
    change must not go on): a shorter validity without ``allow_shorter_validity``; a CA
    rotation while a listed client lacks the new root, or without ``new_root: accept``; an
    encrypted key the server could not re-read at reload.
    """
    from pgtls_helpers.postgres.probe import probe

    if not facts.ssl:
        return None
    now = probe(address_of(params.server_host), params.server_port, timeout=5.0)
    if not now.ok or not now.chain:
        return None
    served = list(now.chain)
    leaf, old_leaf = new_chain[0], served[0]
    # names read back from the installed certificate (the served leaf when it is not readable)
    installed = _installed_leaf(Path(facts.ssl_cert_file)) or old_leaf
    before, after = names_of(installed), names_of(leaf)
    findings: list[Finding] = []
    placeholder = bool(ssl_targets(facts)[2])  # Debian's snakeoil: no client relies on it
    dropped = [] if placeholder else [n for n in before if n not in after]
    if dropped:
        findings.append(
            Finding(
                "warning" if params.allow_dropped_names else "error",
                "names-dropped",
                f"the new certificate no longer covers {', '.join(dropped)}; clients that "
                "connect with verify-full under those names would be refused; add them to "
                "subject_alt_names, or set allow_dropped_names: true if no client uses them",
            )
        )
    served_sha = [chainmod.fingerprint(c) for c in served]
    new_sha = [chainmod.fingerprint(c) for c in new_chain]
    roots = [*([new_root] if new_root else []), *(r for u in users for r in user_roots(u))]
    served_root = next((r for r in roots if _issued_by(served[-1], r)), None)
    # the served top certificate comes from the new root, directly or through the same CA
    same_root = new_root is not None and any(
        _issued_by(served[-1], c) for c in [*new_chain[1:], new_root]
    )
    if served_sha == new_sha:
        kind = "no change"
    elif placeholder:
        # a certificate shared with other services (Debian's snakeoil): a placeholder that no
        # client verifies, and one the runbook leaves in place; not a root clients move from
        kind = "first CA-signed certificate (the shared one stays in place)"
    elif same_root:
        kind = "renewal" if served_sha[1:] == new_sha[1:] else "renewal, intermediates change"
    else:
        kind = "CA rotation"
    replacing = kind in ("renewal", "renewal, intermediates change", "CA rotation")
    if replacing and leaf.not_valid_after_utc < old_leaf.not_valid_after_utc:
        days = (old_leaf.not_valid_after_utc - leaf.not_valid_after_utc).days
        findings.append(
            Finding(
                "warning" if params.allow_shorter_validity else "error",
                "shorter-validity",
                f"the new certificate expires on {leaf.not_valid_after_utc:%Y-%m-%d}, "
                f"{days} days before the one served now ({old_leaf.not_valid_after_utc:%Y-%m-%d})"
                + (
                    "; allowed by allow_shorter_validity"
                    if params.allow_shorter_validity
                    else "; set allow_shorter_validity: true if that is intended"
                ),
            )
        )
    clients = [
        {"user": u.name, "root.crt": str(u.root_crt), "trusts new root": bool(new_root)}
        for u in users
    ]
    if kind == "CA rotation" and new_root is not None:
        new_label = chainmod.cert_label(new_root)
        old_label = chainmod.cert_label(served_root) if served_root else rfc4514(served[-1].issuer)
        for row, user in zip(clients, users, strict=True):
            row["trusts new root"] = trusts(user, new_root)
            if not row["trusts new root"]:
                findings.append(
                    Finding(
                        "error",
                        "new-root-untrusted",
                        f"{user.name}'s {user.root_crt} does not hold the new root {new_label}: "
                        "every verify-full client of that user would be refused; add it first "
                        f"with the client-trust runbook (pgtls trust, add_roots: [{new_label} "
                        "file])",
                    )
                )
        findings.append(
            Finding(
                "warning" if params.new_root == "accept" else "error",
                "ca-rotation",
                f"the new chain comes from another root ({new_label}, the served one from "
                f"{old_label})"
                "; clients not listed in client_system_users are not checked here and refuse "
                "the new chain unless they trust the new root"
                + (
                    "; new_root: accept says they do"
                    if params.new_root == "accept"
                    else "; once they do, set new_root: accept"
                ),
            )
        )
    if kind != "no change" and encrypted_key:
        if _show(params, "ssl_passphrase_command_supports_reload") != "on":
            findings.append(
                Finding(
                    "error",
                    "passphrase-reload",
                    "the key is passphrase-protected and ssl_passphrase_command_supports_reload "
                    "is off, so the reload that serves the new certificate could not read it; "
                    "set ssl_passphrase_command_supports_reload = on (and reload) first",
                )
            )
    return RenewalPlan(
        kind=kind,
        served=[cert_row(c) for c in served],
        new=[cert_row(c) for c in new_chain],
        served_root=rfc4514(served_root.subject) if served_root else None,
        new_root=rfc4514(new_root.subject) if new_root else None,
        names_added=[n for n in after if n not in before],
        names_dropped=dropped,
        subject_before=rfc4514(installed.subject),
        subject_after=rfc4514(leaf.subject),
        clients=clients,
        findings=findings,
    )


def _installed_leaf(path: Path) -> x509.Certificate | None:
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())[0]
    except (OSError, ValueError, IndexError):
        return None


def _show(params: Params, name: str) -> str:
    with open_server(params) as server:
        return str(server.show(name))


# the subject fields a renewal inherits from the installed certificate (all but the CN)
_SUBJECT_FIELDS = {f.name: f.oid for f in SUBJECT_FIELDS if f.name != "common_name"}


def inherit_names(params: Params) -> Params:
    """A renewal re-uses the installed certificate's subject and names: each subject field the
    parameters leave empty, and the SANs when ``subject_alt_names`` is empty, come from the
    certificate the server is configured with (same CN only; the parameters always win).
    Unchanged when the server is not reachable, serves no TLS, or its file is not readable."""
    if params.subject_alt_names and all(getattr(params, f) for f in _SUBJECT_FIELDS):
        return params
    from pgtls_helpers.postgres.server import Server

    try:  # a short wait: the CSR of a first install must not depend on the server
        with Server({**params.conninfo(), "connect_timeout": 5}) as server:
            facts = server.facts()
    except PgtlsError:
        return params
    cert = _installed_leaf(Path(facts.ssl_cert_file)) if facts.ssl else None
    if cert is None:
        return params
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not cns or str(cns[0].value).lower() != params.common_name.lower():
        return params  # another name: a new server identity, not a renewal of this one
    changes: dict[str, Any] = {}
    for name, oid in _SUBJECT_FIELDS.items():
        attrs = cert.subject.get_attributes_for_oid(oid)
        if not getattr(params, name) and attrs:
            changes[name] = str(attrs[0].value)
    if not params.subject_alt_names:
        changes["subject_alt_names"] = tuple(
            n for n in names_of(cert) if n != params.common_name.lower()
        )
    return dataclasses.replace(params, **changes) if changes else params


def installed_key(params: Params) -> keys.PrivateKey:
    """``reuse_key``: the key the server uses now, read where it is (it is never copied)."""
    with open_server(params) as server:
        facts = server.facts()
    path = Path(facts.ssl_key_file)
    if not facts.ssl:
        raise PreflightError(
            "reuse_key: the server serves no TLS yet, so there is no installed key to re-use; "
            "set reuse_key: false"
        )
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PreflightError(
            f"reuse_key: {path} (ssl_key_file) is not readable here ({exc.strerror}); run as "
            "root or the server's OS user, or set reuse_key: false"
        ) from None
    passphrase = key_passphrase(params) if keys.is_encrypted_pem(data) else None
    return keys.load_key(data, passphrase, source=str(path))


# --------------------------------------------------------------------------- the client loop


@dataclass(frozen=True)
class LoopResult:
    """What a looping verify-full client saw: how many connections, how many failed."""

    connections: int
    failed: int
    seconds: float
    errors: list[str]

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class ClientLoop:
    """Connect with ``sslmode=verify-full`` again and again in a thread until stopped.

    ``with ClientLoop(...) as loop: ...`` then ``loop.result``; :meth:`stop` waits until at
    least ``at_least`` connections were made, so a short change still gets a real sample.
    """

    def __init__(
        self,
        conninfo: Mapping[str, Any],
        *,
        host: str,
        hostaddr: str | None,
        root_file: str | Path,
        at_least: int = 0,
    ) -> None:
        base = {k: v for k, v in conninfo.items() if k not in ("host", "hostaddr", "sslmode")}
        self.info = {
            **base,
            "host": host,
            **({"hostaddr": hostaddr} if hostaddr else {}),
            "sslmode": "verify-full",
            "sslrootcert": str(root_file),
            "connect_timeout": 10,
        }
        self.at_least = at_least
        self.connections = 0
        self.failed = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pgtls-client-loop", daemon=True)
        self._t0 = 0.0
        self.result: LoopResult | None = None

    def _run(self) -> None:
        import psycopg

        while not (self._stop.is_set() and self.connections >= self.at_least):
            try:
                with psycopg.connect(autocommit=True, **self.info) as conn:
                    conn.execute("SELECT 1")
            except psycopg.Error as exc:
                self.failed += 1
                if len(self.errors) < 5:
                    self.errors.append(" ".join(str(exc).split()))
            self.connections += 1

    def start(self) -> ClientLoop:
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def stop(self, timeout: float = 120.0) -> LoopResult:
        self._stop.set()
        self._thread.join(timeout)
        self.result = LoopResult(
            self.connections, self.failed, round(time.monotonic() - self._t0, 2), self.errors
        )
        return self.result

    def __enter__(self) -> ClientLoop:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- step 4's reload


class ReloadWatch:
    """Around step 4's reload of a server that already serves TLS (a renewal).

    Before: the served chain and a verify-full client loop (trusting the new root and the
    roots the listed clients hold). After: the served chain again and the loop's count. On a
    failed reload: after the restore, proof that the old certificate is served again.
    """

    def __init__(self, params: Params, host_ip: str, before: ProbeResult | None) -> None:
        self.params, self.host_ip = params, host_ip
        self.before = list(before.chain) if before is not None and before.ok else []
        self.loop: ClientLoop | None = None
        if not self.before:
            return
        from pgtls_helpers.postgres.clients import resolve_client_users

        roots = read_roots(params.work.root)
        for user in resolve_client_users(params.client_system_users):
            roots += user_roots(user)
        if not any(_issued_by(self.before[-1], r) for r in roots):
            return  # nothing here trusts what is served now: a loop would only count refusals
        unique = {chainmod.fingerprint(r): r for r in roots}
        root_file = params.work.client_loop_roots
        files.atomic_write(root_file, b"".join(pem_of(r) for r in unique.values()), mode=0o644)
        info = params.conninfo()
        import os

        if passfile := os.environ.get("PGPASSFILE"):
            info["passfile"] = passfile
        self.loop = ClientLoop(
            info,
            host=params.hosts[0],
            hostaddr=host_ip,
            root_file=root_file,
            at_least=LOOP_MIN_CONNECTIONS,
        ).start()

    def restored(self) -> str:
        """After the restore: a sentence saying the old certificate is served again, or not."""
        from pgtls_helpers.postgres.probe import probe

        if self.loop is not None:
            self.loop.stop()
        if not self.before:
            return ""
        want = chainmod.fingerprint(self.before[0])
        deadline = time.monotonic() + 10
        seen = probe(self.host_ip, self.params.server_port, timeout=5.0)
        while time.monotonic() < deadline:
            if seen.ok and seen.chain and chainmod.fingerprint(seen.chain[0]) == want:
                return f"the previous certificate (sha256 {want[:16]}…) is served again"
            time.sleep(0.1)
            seen = probe(self.host_ip, self.params.server_port, timeout=5.0)
        got = chainmod.fingerprint(seen.chain[0])[:16] + "…" if seen.chain else seen.error
        return f"the previous certificate (sha256 {want[:16]}…) is NOT served again: {got}"

    def finish(self, after: ProbeResult | None) -> dict[str, Any] | None:
        """The record's part: served before and after (fingerprint, days left), the loop."""
        loop = self.loop.stop() if self.loop is not None else None
        if not self.before:
            return None
        return {
            "served_before": cert_row(self.before[0]),
            "served_after": cert_row(after.chain[0]) if after is not None and after.chain else None,
            "client_loop": loop.as_dict() if loop else None,
        }
