"""The files ``pgtls watch`` reads on this machine: client users' certificates and CRLs.

A client user's ``~/.postgresql/postgresql.crt`` and ``postgresql.key`` are read through the
directory's descriptor with :func:`pgtls_helpers.postgres.clients.client_file`: no link is
followed (root never reads a root-only file through a link the user planted), the directory
and the file must be the user's own, a FIFO never blocks. A link is reported as ``unreadable``,
not followed. The judgement is :mod:`pgtls_helpers.pki.client_posture`'s.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import stat
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from pgtls_helpers.errors import InputError
from pgtls_helpers.pki.client_posture import (
    ClientCertResult,
    CrlResult,
    judge_client_cert,
    judge_crl,
    unreadable_client,
    unreadable_crl,
)
from pgtls_helpers.pki.keys import is_encrypted_pem, load_key, public_key_matches
from pgtls_helpers.postgres.clients import ClientUser, client_file, resolve_client_users

__all__ = ["check_client_users", "check_crl_files", "crls_in", "resolve_watch_users"]


def resolve_watch_users(names: Sequence[str]) -> list[ClientUser]:
    """``--client-user`` names as OS users (each once).

    Raises:
        InputError: a name is not an OS user here.
    """
    return resolve_client_users(list(dict.fromkeys(names)), source="--client-user")


def _certs(data: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        return [x509.load_der_x509_certificate(data)]


def _read(path: Path, uid: int) -> tuple[bytes, int] | None:
    """Bytes and mode of a client's file, or None when it (or ``~/.postgresql``) is absent."""
    try:
        path.parent.lstat()
    except FileNotFoundError:
        return None
    # path: a listed client user's home from the OS user database; read as client_file does
    found = client_file(path, uid)
    return None if found is None else (found[0], found[1].st_mode)


def _check_one(
    user: ClientUser, *, warn_days: int, crit_days: int, now: _dt.datetime
) -> tuple[ClientCertResult, x509.Certificate | None]:
    crt_path = str(user.client_crt)
    try:
        crt = _read(user.client_crt, user.uid)
    except InputError as exc:
        return unreadable_client(user.name, crt_path, str(exc)), None
    if crt is None:
        result = judge_client_cert(
            user.name, crt_path, [], sha256=None, key_matches=None,
            warn_days=warn_days, crit_days=crit_days, now=now,
        )  # fmt: skip
        return result, None
    try:
        certs = _certs(crt[0])
    except ValueError:
        sentence = f"{crt_path} holds no certificate (PEM or DER); libpq could not send it"
        return unreadable_client(user.name, crt_path, sentence), None
    leaf = certs[0]
    key_problem: tuple[str, str] | None = None
    key_matches: bool | None = None
    note: str | None = None
    try:
        key = _read(user.client_key, user.uid)
    except InputError as exc:
        key, key_problem = None, ("unreadable", str(exc))
    if key is None and key_problem is None:
        key_problem = (
            "no-key",
            f"{user.client_key} does not exist: libpq cannot use postgresql.crt without it",
        )
    elif key is not None:
        data, mode = key
        if stat.S_IMODE(mode) & 0o077:
            key_problem = (
                "key-readable-by-others",
                f"{user.client_key} has mode {stat.S_IMODE(mode):04o}: libpq refuses a key "
                "with group or world access; chmod 0600 it",
            )
        if is_encrypted_pem(data):
            note = f"{user.name}: {user.client_key} is passphrase-protected; its match not checked"
        else:
            try:
                key_matches = public_key_matches(
                    load_key(data, source=str(user.client_key), validate=False), leaf
                )
            except InputError as exc:
                note = f"{user.name}: {exc}"
    result = judge_client_cert(
        user.name,
        crt_path,
        certs,
        sha256=hashlib.sha256(leaf.public_bytes(Encoding.DER)).hexdigest(),
        key_matches=key_matches,
        key_problem=key_problem,
        key_note=note,
        warn_days=warn_days,
        crit_days=crit_days,
        now=now,
    )
    return result, leaf


def check_client_users(
    users: Sequence[ClientUser], *, warn_days: int, crit_days: int, now: _dt.datetime
) -> tuple[list[ClientCertResult], tuple[x509.Certificate, ...]]:
    """Each user's row, and the client certificates read (to know sessions by serial)."""
    rows: list[ClientCertResult] = []
    known: list[x509.Certificate] = []
    for user in users:
        row, leaf = _check_one(user, warn_days=warn_days, crit_days=crit_days, now=now)
        rows.append(row)
        if leaf is not None:
            known.append(leaf)
    return rows, tuple(known)


def crls_in(
    data: bytes, *, source: str, path: str, now: _dt.datetime, target: str | None = None
) -> list[CrlResult]:
    """A row per CRL in a file's bytes (PEM, several allowed, or one DER)."""
    marker = b"-----BEGIN X509 CRL-----"
    try:
        if marker in data:
            blocks = [marker + part for part in data.split(marker)[1:]]
            crls = [x509.load_pem_x509_crl(b) for b in blocks]
        else:
            crls = [x509.load_der_x509_crl(data)]
    except ValueError:
        return [
            unreadable_crl(
                source, path, f"{path} holds no CRL (PEM or DER) the server could load", target
            )
        ]
    return [judge_crl(c, source=source, path=path, target=target, now=now) for c in crls]


def check_crl_files(paths: Sequence[str], *, now: _dt.datetime) -> list[CrlResult]:
    """Rows for the ``--crl`` files (each read as this process; they are the caller's)."""
    rows: list[CrlResult] = []
    for name in dict.fromkeys(paths):
        try:
            data = Path(name).read_bytes()
        except OSError as exc:
            rows.append(unreadable_crl(name, name, f"{name} cannot be read ({exc.strerror})"))
            continue
        rows.extend(crls_in(data, source=name, path=name, now=now))
    return rows
