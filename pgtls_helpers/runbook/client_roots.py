"""The client roots of step c4 and the server's ``ssl_ca_file`` that holds them.

The roots step c2 left in the work directory (or, for a client-CA rotation's trust change,
``trust_client_roots``) are merged into the file ``ssl_ca_file`` names, every byte already there
kept, or written as a new ``client_ca.crt`` in the data directory; ``retire_client_roots`` cut
their PEM blocks out of it. After the reload, ``openssl s_client`` shows which CA names the
server sends when it asks for a client certificate (:func:`asked_ca_names`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509

from pgtls_helpers.errors import InputError, PreflightError
from pgtls_helpers.pki import chain as chainmod
from pgtls_helpers.postgres import files, ident
from pgtls_helpers.postgres.server import ServerFacts
from pgtls_helpers.postgres.targets import TargetPolicy
from pgtls_helpers.runbook.common import pem_of
from pgtls_helpers.runbook.params import Params
from pgtls_helpers.runbook.trust import load_certs as load_ca_certs
from pgtls_helpers.runbook.trust import parse_fingerprint

__all__ = [
    "CLIENT_CA_NAME",
    "RETIRE_KEY",
    "TRUST_KEY",
    "asked_ca_names",
    "plan_ca_file",
    "read_roots",
    "retiring_fingerprints",
    "roots_not_asked_for",
    "rotation_only",
    "still_asked_for",
    "without_certs",
]

CLIENT_CA_NAME = "client_ca.crt"  # in the data directory, when ssl_ca_file is empty


def read_roots(params: Params) -> list[x509.Certificate]:
    """The distinct roots that issued this change's client certificates (step c2's
    ``roots.pem``), or a rotation's ``trust_client_roots`` when no client is issued."""
    path = params.work.client_roots
    if rotation_only(params) and not path.exists():
        # a trust or retire change of a client-CA rotation: no client is issued (c1-c3 skip)
        return [
            c for item in params.trust_client_roots for c in load_ca_certs(Path(item), TRUST_KEY)
        ]
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PreflightError(
            f"{path}: no client roots for change {params.change_id}; run steps c1 to c3 "
            "(client keys, the CA's answers, the client files) first"
        ) from None
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise PreflightError(f"{path}: not a PEM file of certificates; run step c2 again") from None
    return list({chainmod.fingerprint(c): c for c in certs}.values())


TRUST_KEY, RETIRE_KEY = "trust_client_roots", "retire_client_roots"


def rotation_only(params: Params) -> bool:
    """A change of a client-CA rotation that only trusts or retires roots."""
    return bool(params.trust_client_roots or params.retire_client_roots)


def retiring_fingerprints(params: Params) -> set[str]:
    """The SHA-256 fingerprints of ``retire_client_roots`` (files or fingerprints)."""
    out: set[str] = set()
    for item in params.retire_client_roots:
        fp = parse_fingerprint(item)
        if fp:
            out.add(fp)
        elif Path(item).exists():
            out |= {chainmod.fingerprint(c) for c in load_ca_certs(Path(item), RETIRE_KEY)}
        else:
            raise InputError(
                f"{RETIRE_KEY}: '{item}' is neither a file nor a SHA-256 fingerprint (64 hex "
                "digits, colons allowed)"
            )
    return out


_PEM_CERT = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.*?-----END CERTIFICATE-----[ \t]*(\r?\n|$)", re.S
)


def without_certs(data: bytes, retired: set[str]) -> bytes:
    """``data`` with the PEM blocks of the ``retired`` certificates cut out, every other byte
    (comments, other certificates, their order) kept."""

    def cut(m: re.Match[bytes]) -> bytes:
        cert = x509.load_pem_x509_certificate(m.group(0))
        return b"" if chainmod.fingerprint(cert) in retired else m.group(0)

    return _PEM_CERT.sub(cut, data)


def _read_bundle(path: Path) -> tuple[bytes, list[x509.Certificate]]:
    found = files.read_regular(path, exact=True)
    if found is None:
        return b"", []
    data = found[0]
    try:
        return data, x509.load_pem_x509_certificates(data) if b"-----BEGIN" in data else []
    except ValueError:
        raise PreflightError(
            f"{path}: ssl_ca_file holds something that is not a PEM certificate; fix it "
            "before adding the client roots"
        ) from None


def plan_ca_file(
    params: Params, facts: ServerFacts, policy: TargetPolicy, roots: list[x509.Certificate]
) -> tuple[Path, files.PlannedFile, list[x509.Certificate], list[x509.Certificate], dict[str, str]]:
    """The ``ssl_ca_file`` of step c4: (its path, the planned file, the roots in it now, the
    roots in it after, the settings to set); refuses before any write."""
    owner = facts.data_directory_owner or (os.geteuid(), os.getegid())
    settings: dict[str, str] = {}
    if facts.ssl_ca_file is not None:
        target = facts.ssl_ca_file  # from the server's ssl_ca_file
        setting = "ssl_ca_file"
    else:
        target = facts.data_directory / CLIENT_CA_NAME
        setting = f"the new ssl_ca_file ({CLIENT_CA_NAME})"
        settings["ssl_ca_file"] = CLIENT_CA_NAME
    if problem := policy.problem(target, setting=setting):
        raise PreflightError(f"{problem}; nothing was changed")
    target = files.canonical(target)
    current, before = _read_bundle(target) if facts.ssl_ca_file is not None else (b"", [])
    if facts.ssl_ca_file is None and target.exists():
        raise PreflightError(
            f"{target}: ssl_ca_file is empty but this file exists; point ssl_ca_file at it or "
            "move it away, so nothing is replaced silently. Nothing was changed"
        )
    known = {chainmod.fingerprint(c) for c in before}
    retired = retiring_fingerprints(params)
    if both := [c for c in roots if chainmod.fingerprint(c) in retired]:
        raise PreflightError(
            f"{RETIRE_KEY}: {chainmod.cert_label(both[0])} is a root of this change's clients "
            "too; retire it in a change of its own, once no client uses it. Nothing was changed"
        )
    new = [c for c in roots if chainmod.fingerprint(c) not in known]
    data = without_certs(current, retired) if retired & known else current
    before_kept = [c for c in before if chainmod.fingerprint(c) not in retired]
    if new:
        if data and not data.endswith(b"\n"):
            data += b"\n"
        data += b"".join(pem_of(c) for c in new)
    try:
        st = target.stat()
        mode, file_owner = st.st_mode & 0o777, (st.st_uid, st.st_gid)
    except FileNotFoundError:
        mode, file_owner = 0o644, owner
    planned = files.plan_file(target, data, kind="ssl_ca_file", mode=mode, owner=file_owner)
    return target, planned, before, [*before_kept, *new], settings


def still_asked_for(
    host: str, port: int, names: Sequence[str], *, timeout: float = 5.0
) -> list[str]:
    """The retired roots' names the server still sends when it asks for a certificate."""
    if not names:
        return []
    deadline = time.monotonic() + timeout
    while True:
        asked = asked_ca_names(host, port)
        if asked is None:
            return []  # no openssl here: c5 proves the clients still log in
        still = [n for n in names if n in asked]
        if not still or time.monotonic() >= deadline:
            return still
        time.sleep(0.2)


_CA_NAMES = "Acceptable client certificate CA names"


def asked_ca_names(host: str, port: int, *, timeout: float = 10.0) -> list[str] | None:
    """The CA names the server sends when it asks for a client certificate (RFC 2253), seen
    from outside by ``openssl s_client -starttls postgres``; None when there is no openssl or
    no answer within ``timeout`` for the whole exchange, [] when it asks for none."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    try:
        proc = subprocess.run(
            [openssl, "s_client", "-starttls", "postgres", "-connect", f"{host}:{port}"]
            + ["-nameopt", "RFC2253"],
            input="",
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"},
        )
    except subprocess.TimeoutExpired:
        return None
    lines = proc.stdout.splitlines()
    if _CA_NAMES not in lines:
        return [] if "Server certificate" in proc.stdout else None
    names = []
    for line in lines[lines.index(_CA_NAMES) + 1 :]:
        if not line.strip() or line.startswith(("Requested ", "Client Certificate Types", "---")):
            break
        names.append(line.strip())
    return names


def roots_not_asked_for(
    host: str, port: int, roots: Sequence[x509.Certificate], *, timeout: float = 5.0
) -> list[str]:
    """The roots the server does not name yet when it asks for a client certificate (each
    new connection gets the reloaded SSL settings; a short wait covers the postmaster)."""
    wanted = [ident.server_dn(r.subject) for r in roots]
    deadline = time.monotonic() + timeout
    while True:
        names = asked_ca_names(host, port)
        if names is None:
            return []  # no openssl here: c5 proves it with the clients' own logins
        missing = [w for w in wanted if w not in names]
        if not missing or time.monotonic() >= deadline:
            return missing
        time.sleep(0.2)
