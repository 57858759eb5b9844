"""Steps c1 to c3 of the client-certificate runbook (``pgtls clients``): the client side.

- **c1** makes, per entry of ``clients``, a private key and a CSR in the change's work
  directory (``clients/<os_user>/``, 0700; the key 0600 from its first byte). Running it again
  keeps a key and CSR already made for the same subject, so a CSR waiting at the CA keeps its
  key.
- **c2** gets the certificates: the lab CA signs each CSR for clientAuth (``ca_mode: lab``),
  or ``client_ca_files`` are read as step 2 reads a CA's answer (``ca_mode: files``). Either
  way each client's certificate is found by its public key, its chain ordered and checked:
  clientAuth, validity, the subject asked for. It writes each client's ``postgresql.crt``
  (leaf and intermediates) and ``clients/roots.pem``, the distinct roots that issued them, for
  the server's ``ssl_ca_file``.
- **c3** puts ``postgresql.crt`` (0644), ``postgresql.key`` (0600) and, when asked,
  ``postgresql.pk8`` (0600, PKCS#8 DER for pgjdbc) into each client OS user's
  ``~/.postgresql``, owned by that user, through the journal (backups, rollback). The work
  directory's copy of each key is removed afterwards: the ``.pk8`` is made from it in the same
  step, so nothing needs it later.

A client's key is not encrypted: libpq would need its passphrase on every connection
(``sslpassword``), and the file is protected by its mode and owner as ``~/.pgpass`` is.

Why one module of some 890 lines: c1 to c3 share the per-client work folder, the client
entries and the chain checks, and c3's install is journaled with the connection loop running
across it; the identity, roots, plan, apply and proof of the server side (c4, c5) are modules of
their own. Splitting c3's install from its loop would put one journaled write in two places.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography import x509

from pgtls_helpers.errors import InputError, PgtlsError, PreflightError, ServerError
from pgtls_helpers.pki import chain as chainmod
from pgtls_helpers.pki import client as pkiclient
from pgtls_helpers.pki import keys
from pgtls_helpers.pki.csr import csr_pem, load_csr, render_csr, spki_sha256
from pgtls_helpers.postgres import files, hba, keyfiles
from pgtls_helpers.postgres.client_loop import ClientLoop
from pgtls_helpers.postgres.clients import (
    ClientUser,
    client_file,
    plan_client_file,
    resolve_client_users,
)
from pgtls_helpers.postgres.lock import change_lock
from pgtls_helpers.runbook.client_identity import client_rule
from pgtls_helpers.runbook.client_subjects import ClientEntry, client_entries, clients_used
from pgtls_helpers.runbook.common import (
    address_of,
    fingerprint_of,
    lock_directory,
    open_server,
    pem_of,
    save_step,
    server_before,
)
from pgtls_helpers.runbook.journal import Journal
from pgtls_helpers.runbook.manifest import ClientsUsed
from pgtls_helpers.runbook.params import Params
from pgtls_helpers.runbook.undo import undo_change
from pgtls_helpers.runbook.workdir import ClientWork

__all__ = [
    "ClientCert",
    "ClientCertsResult",
    "ClientInstallResult",
    "ClientKey",
    "ClientKeysResult",
    "step_c1_client_keys",
    "step_c2_client_certs",
    "step_c3_install_clients",
]

CLIENTS_STEP = "clients"  # the journal's name for c3


def _private_dir(path: Path) -> Path:
    """``path`` as a directory of ours, 0700, not reached through a link."""
    path.mkdir(mode=0o700, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        raise PreflightError(
            f"{path}: not a real directory ({exc.strerror}); pgtls keeps client keys only in a "
            "directory of its own, so remove what is there"
        ) from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise PreflightError(
                f"{path}: belongs to uid {st.st_uid}, not to the user running pgtls; remove it"
            )
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)
    return path


def _client_work(params: Params, client: ClientEntry) -> ClientWork:
    params.work.create()
    _private_dir(params.work.clients)
    cw = params.work.client(client.os_user)
    _private_dir(cw.path)
    return cw


def _key_label(key_type: str) -> str:
    """``rsa4096`` → ``RSA 4096``, ``ecdsa-p256`` → ``ECDSA P-256``, as describe_key says it.

    >>> _key_label("ecdsa-p384"), _key_label("rsa2048")
    ('ECDSA P-384', 'RSA 2048')
    """
    if key_type.startswith("rsa"):
        return f"RSA {key_type[3:]}"
    return f"ECDSA {key_type.split('-', 1)[1].upper().replace('P', 'P-')}"


# --------------------------------------------------------------------------- c1


@dataclass(frozen=True)
class ClientKey:
    """One client's key and CSR, and the CSR as the CA will read it."""

    os_user: str
    role: str
    subject: str  # RFC 4514
    key_path: Path
    csr_path: Path
    key_type: str
    csr_text: str
    csr_sha256: str
    public_key_sha256: str
    reused: bool

    def summary(self) -> dict[str, Any]:
        return {
            "os_user": self.os_user,
            "role": self.role,
            "subject": self.subject,
            "key_type": self.key_type,
            "csr_file": str(self.csr_path),
            "csr_sha256": self.csr_sha256,
            "public_key_sha256": self.public_key_sha256,
            "reused": self.reused,
        }


@dataclass(frozen=True)
class ClientKeysResult:
    """Step c1: each client's key and CSR; send the CSRs (never the keys) to the CA."""

    clients: tuple[ClientKey, ...]
    directory: Path
    clients_used: ClientsUsed  # the clients' values, and whether c1's form gave them

    @property
    def csr_files(self) -> list[Path]:
        return [c.csr_path for c in self.clients]

    def summary(self) -> dict[str, Any]:
        return {
            "directory": str(self.directory),
            "clients": [c.summary() for c in self.clients],
            "clients_used": self.clients_used.to_json(),
        }


def step_c1_client_keys(params: Params) -> ClientKeysResult:
    """Make a key (``params.key_type``, 0600 from its first byte) and a CSR for every client.

    Raises:
        InputError: a client's subject is not a DN with a CN.
        PreflightError: a CSR for another subject, or another key type, is already in the
            client's folder, or its key is gone.
    """
    params, used = clients_used(params)  # the subjects chosen in c1's form, if any
    made = []
    for client in client_entries(params):
        made.append(_key_and_csr(params, client))
    result = ClientKeysResult(clients=tuple(made), directory=params.work.clients, clients_used=used)
    save_step(params, "c1_client_keys", result.summary())
    return result


def _key_and_csr(params: Params, client: ClientEntry) -> ClientKey:
    cw = _client_work(params, client)
    reused = cw.csr.exists()
    if reused:
        csr = load_csr(cw.csr.read_bytes(), source=str(cw.csr))
        if csr.subject != client.subject:
            raise PreflightError(
                f"{cw.csr}: a CSR for {pkiclient.rfc4514_dn(csr.subject)}, not "
                f"{pkiclient.rfc4514_dn(client.subject)}, is already there for client "
                f"{client.os_user}; use a new change_id, or delete {cw.path} if that CSR was "
                "never sent"
            )
        have, want = keys.describe_key(csr.public_key()), _key_label(params.key_type)
        if have != want and not params.reuse_key:
            raise PreflightError(
                f"{cw.csr}: the CSR already made for client {client.os_user} has an {have} "
                f"key, not {want}; set key_type back, or use a new change_id for new keys"
            )
        if cw.key.exists():
            key = keys.load_key(cw.key.read_bytes(), source=str(cw.key), validate=False)
            if spki_sha256(key.public_key()) != spki_sha256(csr.public_key()):
                raise PreflightError(
                    f"{cw.key}: not the key of {cw.csr} (client {client.os_user}); delete "
                    f"{cw.path} and run c1 again for a new key and CSR"
                )
            del key
        elif params.reuse_key:  # the CSR is of the installed key, which must still be there
            _installed_client_key(client, want=spki_sha256(csr.public_key()))
        elif not cw.bundle.exists():  # not installed (c3 removes the copy), and gone
            raise PreflightError(
                f"{cw.key}: the key of client {client.os_user} is gone, so a certificate for "
                f"{cw.csr} could never be used; delete {cw.path} and run c1 again"
            )
    elif params.reuse_key:
        # a renewal that keeps the key: only postgresql.crt changes, in one rename, so no
        # connecting client can meet a certificate and a key that do not match
        key = _installed_client_key(client)
        csr = pkiclient.build_client_csr(client.subject, key)
        files.atomic_write(cw.csr, csr_pem(csr), mode=0o644)
        del key
    else:
        key = keys.generate_key(params.key_type)
        csr = pkiclient.build_client_csr(client.subject, key)
        # a half-made pair from an interrupted run: its CSR was never written, so never sent
        cw.key.unlink(missing_ok=True)
        keyfiles.write_private_key(cw.key, keys.serialize_key(key))
        files.atomic_write(cw.csr, csr_pem(csr), mode=0o644)
        del key
    return ClientKey(
        os_user=client.os_user,
        role=client.role,
        subject=pkiclient.rfc4514_dn(client.subject),
        key_path=_installed_key_path(client) if params.reuse_key else cw.key,
        csr_path=cw.csr,
        key_type=keys.describe_key(csr.public_key()) if params.reuse_key else params.key_type,
        csr_text=render_csr(csr),
        csr_sha256=files.sha256_hex(cw.csr.read_bytes()),
        public_key_sha256=spki_sha256(csr.public_key()),
        reused=reused,
    )


def _installed_key_path(client: ClientEntry) -> Path:
    (user,) = resolve_client_users([client.os_user], source="clients")
    return user.client_key


def _installed_client_key(client: ClientEntry, *, want: str | None = None) -> keys.PrivateKey:
    """``reuse_key``: the client's installed ``~/.postgresql/postgresql.key``, read as its
    file (no link followed, never copied); with ``want``, it must be that public key's."""
    (user,) = resolve_client_users([client.os_user], source="clients")
    found = client_file(user.client_key, user.uid) if user.client_key.parent.is_dir() else None
    if found is None:
        raise PreflightError(
            f"reuse_key: {user.client_key} is not there, so client {client.os_user} has no key "
            "to renew with; set reuse_key: false for a new key"
        )
    key = keys.load_key(found[0], source=str(user.client_key), validate=False)
    if want is not None and spki_sha256(key.public_key()) != want:
        raise PreflightError(
            f"reuse_key: {user.client_key} is no longer the key of the CSR made for client "
            f"{client.os_user}; use a new change_id"
        )
    return key


# --------------------------------------------------------------------------- c2


@dataclass(frozen=True)
class ClientCert:
    """One client's certificate as checked: the server's two ways of writing its subject,
    who issued it, until when, and every reason it could not be used."""

    os_user: str
    role: str
    subject: str  # RFC 4514
    hba_dn: str  # what clientname=DN (and a pg_ident.conf map) matches
    stat_ssl_dn: str  # what pg_stat_ssl.client_dn shows
    common_name: str | None
    serial: str
    issuer: str
    not_before: str
    not_after: str
    sha256: str
    root_sha256: str | None
    root_subject: str | None
    chain: tuple[dict[str, str], ...]
    bundle_path: Path | None
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> dict[str, Any]:
        return {
            "os_user": self.os_user,
            "role": self.role,
            "subject": self.subject,
            "hba_dn": self.hba_dn,
            "stat_ssl_dn": self.stat_ssl_dn,
            "common_name": self.common_name,
            "serial": self.serial,
            "issuer": self.issuer,
            "not_before": self.not_before,
            "not_after": self.not_after,
            "sha256": self.sha256,
            "root_sha256": self.root_sha256,
            "root_subject": self.root_subject,
            "chain": list(self.chain),
            "bundle_file": str(self.bundle_path) if self.bundle_path else None,
            "problems": list(self.problems),
            "ok": self.ok,
        }


@dataclass(frozen=True)
class ClientCertsResult:
    """Step c2: each client's certificate, and the roots the server must trust for them."""

    ca_mode: str
    sources: tuple[str, ...]
    clients: tuple[ClientCert, ...]
    roots_path: Path | None  # clients/roots.pem, written when every client's chain is usable
    roots: tuple[dict[str, str], ...]
    clients_used: ClientsUsed  # the clients' values, and whether c1's form gave them
    missing: tuple[str, ...] = ()  # sentences: a client with no certificate at all
    notes: tuple[str, ...] = ()

    @property
    def errors(self) -> list[str]:
        return [
            *self.missing,
            *(f"client {c.os_user}: {p}" for c in self.clients for p in c.problems),
        ]

    def summary(self) -> dict[str, Any]:
        return {
            "ca_mode": self.ca_mode,
            "sources": list(self.sources),
            "clients": [c.summary() for c in self.clients],
            "roots_file": str(self.roots_path) if self.roots_path else None,
            "roots": list(self.roots),
            "missing": list(self.missing),
            "notes": list(self.notes),
            "errors": self.errors,
            "clients_used": self.clients_used.to_json(),
        }


def _lab_response(params: Params, cw: ClientWork, csr: x509.CertificateSigningRequest) -> Path:
    """The lab CA's answer for this CSR (signed once; a rerun reads it again)."""
    from pgtls_helpers.lab import LabCA
    from pgtls_helpers.pki.intake import read_ca_response

    want = spki_sha256(csr.public_key())
    if cw.ca_response.is_dir() and any(cw.ca_response.iterdir()):
        existing = read_ca_response([cw.ca_response])
        if any(spki_sha256(s.cert.public_key()) == want for s in existing.certificates):
            return cw.ca_response
        for old in cw.ca_response.iterdir():
            old.unlink()
    ca = LabCA.load_or_create(params.work.shared_lab_ca)
    leaf = ca.sign_client_csr(csr)
    _private_dir(cw.ca_response)
    ca.write_response(leaf, cw.ca_response)
    return cw.ca_response


def step_c2_client_certs(params: Params, *, check: bool = True) -> ClientCertsResult:
    """Get and check each client's certificate; write its ``postgresql.crt`` and the roots.

    With ``check`` false the result comes back despite problems, so a notebook can show them
    all before it stops.

    Raises:
        PreflightError: a CSR is missing (run c1), ``client_ca_files`` is empty in files mode,
            or (with ``check``) a client has no usable certificate; every reason is named.
    """
    from pgtls_helpers.pki.intake import read_ca_response

    params, used = clients_used(params)  # the subjects chosen in c1's form, if any
    clients = client_entries(params)
    csrs: dict[str, x509.CertificateSigningRequest] = {}
    for client in clients:
        cw = _client_work(params, client)
        if not cw.csr.exists():
            raise PreflightError(
                f"{cw.csr}: no CSR for client {client.os_user}; run c1 (c1_client_keys) first"
            )
        csrs[client.os_user] = load_csr(cw.csr.read_bytes(), source=str(cw.csr))
    pools: dict[str, list[x509.Certificate]] = {}
    notes: list[str] = []
    if params.ca_mode == "lab":
        sources: list[str] = []
        for client in clients:
            where = _lab_response(params, params.work.client(client.os_user), csrs[client.os_user])
            sources.append(str(where))
            pools[client.os_user] = read_ca_response([where]).certs
    else:
        if not params.client_ca_files:
            sent = ", ".join(str(params.work.client(c.os_user).csr) for c in clients)
            raise PreflightError(
                f"client_ca_files is empty: send {sent} to your CA (asking for client "
                "certificates, extendedKeyUsage clientAuth), then run again with "
                "client_ca_files listing the files it returned"
            )
        password = (
            keys.passphrase_from_env(params.ca_files_password_env)
            if params.ca_files_password_env
            else None
        )
        intake = read_ca_response(list(params.client_ca_files), password=password)
        sources = list(params.client_ca_files)
        notes += [*intake.private_keys, *intake.skipped]
        notes += [f"{d}: duplicate, ignored" for d in intake.duplicates]
        for client in clients:
            pools[client.os_user] = intake.certs
    checked: list[ClientCert] = []
    missing: list[str] = []
    for client in clients:
        cw = params.work.client(client.os_user)
        found = _check_client(client, cw, csrs[client.os_user], pools[client.os_user])
        if isinstance(found, str):
            missing.append(found)
            cw.bundle.unlink(missing_ok=True)
            cw.root.unlink(missing_ok=True)
        else:
            checked.append(found)
    roots_path, roots = _write_roots(params, checked, complete=not missing)
    result = ClientCertsResult(
        ca_mode=params.ca_mode,
        sources=tuple(sources),
        clients=tuple(checked),
        roots_path=roots_path,
        roots=tuple(roots),
        clients_used=used,
        missing=tuple(missing),
        notes=tuple(notes),
    )
    save_step(params, "c2_client_certs", result.summary())
    if result.errors and check:
        raise PreflightError("a client certificate is not usable: " + "; ".join(result.errors))
    return result


def _check_client(
    client: ClientEntry,
    cw: ClientWork,
    csr: x509.CertificateSigningRequest,
    pool: Sequence[x509.Certificate],
) -> ClientCert | str:
    """The client's certificate checked, or the sentence saying none is there for its key."""
    want = spki_sha256(csr.public_key())
    leaf = next((c for c in pool if spki_sha256(c.public_key()) == want), None)
    if leaf is None:
        same_name = [c for c in pool if c.subject == client.subject and not chainmod.is_ca(c)]
        why = (
            f"a certificate for {pkiclient.rfc4514_dn(client.subject)} is there, but for "
            "another key"
            if same_name
            else "none of the CA's files holds a certificate for it"
        )
        return (
            f"client {client.os_user}: {why} (the key behind {cw.csr}); was this CSR the one "
            "submitted? Ask the CA to sign that CSR"
        )
    result = chainmod.order_chain(pool, leaf=leaf)
    problems = [
        f"{chainmod.cert_label(leaf)}: {why}"
        for why in (
            pkiclient.client_auth_problem(leaf),
            pkiclient.subject_problem(leaf, client.subject),
        )
        if why is not None
    ]
    now = datetime.now(timezone.utc)
    for cert in result.path:
        if cert.not_valid_before_utc > now:
            problems.append(
                f"{chainmod.cert_label(cert)} is not valid before "
                f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC, and the server refuses it "
                "until then; install it after that time, or ask the CA for one valid now"
            )
        if cert.not_valid_after_utc <= now:
            problems.append(
                f"{chainmod.cert_label(cert)} expired on {cert.not_valid_after_utc:%Y-%m-%d} "
                "and the server refuses it; ask the CA for a new one"
            )
    if not result.complete:
        problems.append(
            f"the chain of {chainmod.cert_label(leaf)} stops at an issuer not among the CA's "
            f"files ({pkiclient.rfc4514_dn(result.missing_issuer or leaf.issuer)}), and the "
            "server needs its root; add that CA's certificate to the files"
        )
    bundle_path: Path | None = None
    if problems:
        cw.bundle.unlink(missing_ok=True)
        cw.root.unlink(missing_ok=True)
    else:
        bundle = b"".join(pem_of(c) for c in [leaf, *result.intermediates])
        files.atomic_write(cw.bundle, bundle, mode=0o644)
        assert result.root is not None  # complete: the path ends at a self-signed root
        files.atomic_write(cw.root, pem_of(result.root), mode=0o644)
        bundle_path = cw.bundle
    root = result.root
    return ClientCert(
        os_user=client.os_user,
        role=client.role,
        subject=pkiclient.rfc4514_dn(leaf.subject),
        hba_dn=pkiclient.hba_dn(leaf.subject),
        stat_ssl_dn=pkiclient.stat_ssl_dn(leaf.subject),
        common_name=pkiclient.common_name(leaf.subject),
        serial=f"{leaf.serial_number:x}",
        issuer=pkiclient.rfc4514_dn(leaf.issuer),
        not_before=leaf.not_valid_before_utc.isoformat(),
        not_after=leaf.not_valid_after_utc.isoformat(),
        sha256=fingerprint_of(leaf),
        root_sha256=fingerprint_of(root) if root is not None else None,
        root_subject=pkiclient.rfc4514_dn(root.subject) if root is not None else None,
        chain=tuple(
            {
                "role": role,
                "subject": pkiclient.rfc4514_dn(c.subject),
                "issuer": pkiclient.rfc4514_dn(c.issuer),
                "sha256": fingerprint_of(c),
                "not_after": c.not_valid_after_utc.isoformat(),
            }
            for c, role in zip(result.path, result.roles, strict=True)
        ),
        bundle_path=bundle_path,
        problems=tuple(problems),
    )


def _write_roots(
    params: Params, checked: Sequence[ClientCert], *, complete: bool
) -> tuple[Path | None, list[dict[str, str]]]:
    """``clients/roots.pem``: the distinct roots of the clients' chains, written only when
    every client's certificate is usable (else a stale one is removed)."""
    path = params.work.client_roots
    usable = complete and bool(checked) and all(c.ok for c in checked)
    if not usable:
        path.unlink(missing_ok=True)
        return None, []
    pems: dict[str, bytes] = {}
    rows: list[dict[str, str]] = []
    for c in checked:
        root = params.work.client(c.os_user).root.read_bytes()
        if c.root_sha256 is not None and c.root_sha256 not in pems:
            pems[c.root_sha256] = root
            rows.append({"subject": c.root_subject or "", "sha256": c.root_sha256})
    files.atomic_write(path, b"".join(pems.values()), mode=0o644)
    return path, rows


# --------------------------------------------------------------------------- c3


STALE_CERT_NOTE = (
    "libpq sends ~/.postgresql/postgresql.crt to every server that asks for a client "
    "certificate, and a server that does not trust its CA refuses the handshake (libpq: "
    '"tlsv1 alert unknown ca") even on a password-only hostssl line; a client that also '
    "logs in elsewhere sets sslcert and sslkey per connection there"
)


@dataclass(frozen=True)
class ClientInstallResult:
    """Step c3: the files planned per client (always) and what was written (with ``apply``)."""

    planned_files: tuple[files.PlannedFile, ...]
    users: tuple[str, ...]  # the client OS user of each planned file
    notes: tuple[str, ...]
    installed: files.InstallResult | None
    applied: bool
    clients_used: ClientsUsed  # the clients' values, and whether c1's form gave them
    work_keys_removed: tuple[str, ...] = ()
    client_loop: dict[str, Any] | None = None  # a renewal's loop of connections, see _loops

    @property
    def changed(self) -> bool:
        return bool(self.installed and self.installed.changed)

    @property
    def plan(self) -> list[dict[str, object]]:
        """Rows for the plan table (display headings; not for the record)."""
        return [
            {"user": u, **p.describe()} for u, p in zip(self.users, self.planned_files, strict=True)
        ]

    def summary(self) -> dict[str, Any]:
        return {
            "planned_files": [
                {**p.record(), "user": u}
                for u, p in zip(self.users, self.planned_files, strict=True)
            ],
            "notes": list(self.notes),
            "applied": self.applied,
            "changed": self.changed,
            "installed": self.installed.as_dicts() if self.installed else [],
            "work_keys_removed": list(self.work_keys_removed),
            "client_loop": self.client_loop,
            "clients_used": self.clients_used.to_json(),
        }


def _installed_key(user: ClientUser, leaf: x509.Certificate) -> bytes | None:
    """The key an earlier c3 installed for ``leaf``, read as the user's file (None: none)."""
    found = client_file(user.client_key, user.uid) if user.client_key.parent.is_dir() else None
    if found is None:
        return None
    try:
        key = keys.load_key(found[0], source=str(user.client_key), validate=False)
    except InputError:
        return None
    return found[0] if keys.public_key_matches(key, leaf) else None


def _plan_client(
    params: Params, client: ClientEntry, user: ClientUser
) -> tuple[list[files.PlannedFile], list[str]]:
    cw = params.work.client(client.os_user)
    if not cw.bundle.exists():
        raise PreflightError(
            f"{cw.bundle}: no checked certificate for client {client.os_user}; run c2 "
            "(c2_client_certs) first"
        )
    bundle = cw.bundle.read_bytes()
    leaf = x509.load_pem_x509_certificates(bundle)[0]
    key_bytes = cw.key.read_bytes() if cw.key.exists() else _installed_key(user, leaf)
    if key_bytes is None:
        raise PreflightError(
            f"{cw.key}: the key of client {client.os_user} is gone (it is removed once "
            f"installed, and {user.client_key} does not hold it); start again from c1 with a "
            "new change_id"
        )
    key = keys.load_key(key_bytes, source=str(cw.key), validate=False)
    if not keys.public_key_matches(key, leaf):
        raise PreflightError(
            f"{cw.bundle}: the certificate of client {client.os_user} is not for the key "
            f"{cw.key}; run c2 again"
        )
    if (why := pkiclient.client_auth_problem(leaf)) is not None:
        raise PreflightError(f"{cw.bundle}: {why}")
    plan = [
        plan_client_file(user, user.client_crt, bundle, kind="client.crt", mode=0o644),
        plan_client_file(user, user.client_key, key_bytes, kind="client.key", mode=0o600),
    ]
    if "pk8" in params.client_driver_files:
        pk8 = pkiclient.pkcs8_der(key)
        plan.append(plan_client_file(user, user.client_pk8, pk8, kind="client.key", mode=0o600))
    del key
    notes = []
    crt = plan[0]
    if crt.action == "replace":
        notes.append(f"{user.client_crt} is replaced (the old one is backed up): {STALE_CERT_NOTE}")
    elif crt.action == "create":
        notes.append(f"{user.client_crt} is new for {user.name}: {STALE_CERT_NOTE}")
    return plan, notes


def step_c3_install_clients(params: Params) -> ClientInstallResult:
    """Plan, and with ``apply`` write, each client's files in its own ``~/.postgresql``.

    Every file is written as the client user's, through that directory's descriptor (a link
    planted there is never followed), renamed into place whole, journaled first, with a
    backup of what it replaces; a failure puts back every file the change wrote.

    Raises:
        InputError: a client OS user does not exist, or a target is a link or someone else's.
        PreflightError: c2 has not run, a key is gone, or a file changed while waiting.
    """
    params, used = clients_used(params)  # the subjects chosen in c1's form, if any
    clients = client_entries(params)
    users = resolve_client_users([c.os_user for c in clients], source="clients")
    plan: list[tuple[ClientUser, files.PlannedFile]] = []
    notes: list[str] = []
    for client, user in zip(clients, users, strict=True):
        planned, said = _plan_client(params, client, user)
        plan += [(user, p) for p in planned]
        notes += said
    result = ClientInstallResult(
        planned_files=tuple(p for _, p in plan),
        users=tuple(u.name for u, _ in plan),
        notes=tuple(notes),
        installed=None,
        applied=False,
        clients_used=used,
    )
    if not params.apply:
        save_step(params, "c3_install_clients", result.summary())
        return result
    with ExitStack() as stack:
        loops, loop_notes = _start_loops(params, clients, plan, stack)
        installed = _apply(params, plan)
        for loop in loops:
            loop.mark_switch()
        for loop in loops:
            loop.wait_for(LOOP_AFTER, timeout=LOOP_TIMEOUT)
    client_loop = _loop_summary(params, loops, plan) if loops else None
    broken = [c for c in client_loop["clients"] if not c["last_ok"]] if client_loop else []
    if client_loop is not None and broken:
        undo_change(params, server=None, reason="undone")
        first = broken[0]
        raise ServerError(
            f"{client_loop['failed']} of {client_loop['connections']} connections of a client "
            f"looping across the switch failed (first: {first['os_user']}: "
            f"{(first['errors'] or ['?'])[0]}); every client file was put back. Does the "
            "server trust the new certificates' root (ssl_ca_file)? Trust it first (c4), "
            "then renew"
        )
    if client_loop is not None and client_loop["failed"]:
        loop_notes.append(
            f"{client_loop['failed']} of {client_loop['connections']} connections failed at the "
            "switch, and the new files work: a connection that read the old certificate just "
            "before the renames and the new key just after them cannot log in (libpq reads "
            "the two files one after the other); reuse_key: true keeps the key, so only "
            "postgresql.crt changes, in one rename"
        )
    # After the install the only copies of each key are the installed one and its backup.
    removed = []
    for client in clients:
        key = params.work.client(client.os_user).key
        if key.exists():
            key.unlink()
            removed.append(str(key))
    done = ClientInstallResult(
        planned_files=result.planned_files,
        users=result.users,
        notes=(*result.notes, *loop_notes),
        installed=installed,
        applied=True,
        clients_used=used,
        work_keys_removed=tuple(removed),
        client_loop=client_loop,
    )
    save_step(params, "c3_install_clients", done.summary())
    return done


def _apply(
    params: Params, plan: Sequence[tuple[ClientUser, files.PlannedFile]]
) -> files.InstallResult:
    """Write the planned files under the change lock, each journaled before it is written; a
    file that changed while the lock was waited for stops the step before its first write."""
    if all(p.action == "unchanged" for _, p in plan):
        return files.InstallResult(tuple(Journal.unchanged(p) for _, p in plan))
    with ExitStack() as stack:
        before = _lock(params, stack)
        again: list[tuple[ClientUser, files.PlannedFile]] = []
        for user, planned in plan:
            fresh = plan_client_file(
                user, planned.target, planned.data, kind=planned.kind, mode=planned.mode
            )
            if fresh.current_sha256 != planned.current_sha256:
                raise PreflightError(
                    f"{planned.target}: changed while this change waited for the lock; no "
                    "client file was changed, run c3 again to plan it afresh"
                )
            again.append((user, fresh))
        journal = Journal.begin(
            params.work, CLIENTS_STEP, before, backing_up=[p.target for _, p in again]
        )
        done: list[files.Installed] = []
        try:
            for user in {u.name: u for u, _ in again}.values():
                journal.client_dir(user)
                # the user's certificate, key (and .pk8) replaced together, certificate first
                done += journal.write_client_swap([p for u, p in again if u.name == user.name])
        except Exception:
            undo_change(params, server=None, reason="undone")
            raise
        journal.end("ok")
    return files.InstallResult(tuple(done))


# Each looping client runs from before the first write to after the last, so every write lands
# while it connects; the counts before and after only show that the old files worked and the
# new ones keep working (each is a new psql process, ~75 ms).
LOOP_BEFORE = 25  # connections each looping client makes before its files are replaced
LOOP_AFTER = 40  # and after the last write
LOOP_TIMEOUT = 120.0


def _serial(data: bytes) -> str:
    return str(x509.load_pem_x509_certificates(data)[0].serial_number)


def _start_loops(
    params: Params,
    clients: Sequence[ClientEntry],
    plan: Sequence[tuple[ClientUser, files.PlannedFile]],
    stack: ExitStack,
) -> tuple[list[ClientLoop], list[str]]:
    """A connection loop as each client whose certificate and key are replaced, each running
    (:data:`LOOP_BEFORE` connections made) before the first write; a client that cannot
    connect with its current files has nothing to lose, so it is not looped (a note says so)."""
    rules = hba.parse_rules(list(params.hba_rules))
    replaced = {u.name for u, p in plan if p.kind == "client.crt" and p.action == "replace"}
    loops: list[ClientLoop] = []
    notes: list[str] = []
    host_ip = address_of(params.server_host)
    for client in clients:
        if client.os_user not in replaced:
            continue
        user = next(u for u, _ in plan if u.name == client.os_user)
        found = client_rule(rules, client.role, params.server_dbname)
        conninfo = {
            "host": params.common_name,
            "hostaddr": host_ip,
            "port": str(params.server_port),
            "dbname": found[1] if found else params.server_dbname,
            "user": client.role,
            "sslmode": "verify-full",
            "connect_timeout": "10",
        }
        loop = stack.enter_context(ClientLoop(user, conninfo))
        first = loop.first(timeout=LOOP_TIMEOUT)
        if first is None or not first.startswith("ok"):
            notes.append(
                f"{client.os_user}: no connection loop across the switch, its current files do "
                f"not log in ({(first or 'no answer').removeprefix('fail ')})"
            )
            loop.stop()
            continue
        loops.append(loop)
    for loop in loops:
        loop.wait_for(LOOP_BEFORE, timeout=LOOP_TIMEOUT)
    return loops, notes


def _loop_summary(
    params: Params,
    loops: Sequence[ClientLoop],
    plan: Sequence[tuple[ClientUser, files.PlannedFile]],
) -> dict[str, Any]:
    """``client_loop``: every looping client's connections, failures and seconds, and how
    many connections presented its old and its new certificate."""
    rows = []
    for loop in loops:
        res = loop.result
        crt = next(p for u, p in plan if u.name == loop.user.name and p.kind == "client.crt")
        new = _serial(crt.data)
        rows.append(
            {
                **res.summary(),
                "new_certificate_connections": res.by_serial.get(new, 0),
                "old_certificate_connections": sum(n for s, n in res.by_serial.items() if s != new),
            }
        )
    return {
        "connections": sum(r["connections"] for r in rows),
        "failed": sum(r["failed"] for r in rows),
        "seconds": max(r["seconds"] for r in rows),
        "clients": rows,
    }


def _lock(params: Params, stack: ExitStack) -> dict[str, object]:
    """Take the server's change lock and return how the server is before the change; where
    the runbook's role cannot log in from here, the lock file in the work root (and the
    journal records only what this step is)."""
    try:
        server = stack.enter_context(open_server(params))
        facts = server.facts()
    except PgtlsError:
        params.work.create()
        root = params.work.path.parent
        stack.enter_context(change_lock(root, None, None, params.change_id))
        return {"kind": "client-certificates"}
    directory, owner = lock_directory(params, facts)
    stack.enter_context(change_lock(directory, owner, server, params.change_id))
    return server_before(params, facts)
