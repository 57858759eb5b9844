"""Step c5 of the client-certificate runbook (``c5_verify_clients``): each client proves who
it is.

c5 connects as each client OS user with its own files only and compares ``pg_stat_ssl`` with its
certificate; the must-fail checks each fail for their own reason, with certificates made on the
fly in a temporary folder of that user's. A client whose installed certificate the
``client_crl_file`` revokes must be refused (``sslv3 alert certificate revoked``). A failed check
undoes the change's journal (c3 and c4).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pgtls_helpers.errors import InputError, ServerError
from pgtls_helpers.lab import LabCA
from pgtls_helpers.pki import chain as chainmod
from pgtls_helpers.postgres import files, hba, ident
from pgtls_helpers.postgres.clients import ClientUser, read_client_file, resolve_client_users
from pgtls_helpers.runbook.client_crl import CRL_REVOKED_ALERT, given_crls, revoked_by
from pgtls_helpers.runbook.client_identity import client_rule
from pgtls_helpers.runbook.client_roots import read_roots
from pgtls_helpers.runbook.client_subjects import clients_used
from pgtls_helpers.runbook.common import address_of, pem_of, save_step
from pgtls_helpers.runbook.manifest import ClientsUsed
from pgtls_helpers.runbook.params import Params
from pgtls_helpers.runbook.undo import undo_change

__all__ = [
    "NO_CERTIFICATE",
    "OTHER_ROLE",
    "SERVER_AUTH_ONLY",
    "UNKNOWN_CA",
    "ClientProofResult",
    "ProofCheck",
    "step_c5_verify_clients",
]

C5 = "c5_verify_clients"


@dataclass(frozen=True)
class ProofCheck:
    """One check of c5: what must happen, what did, and the server's words."""

    case: str  # what is tried, the same words for every client
    os_user: str
    role: str  # the role it logs in as
    expect: str  # "ok", or the reason the server must give
    observed: str
    passed: bool
    detail: str

    @property
    def check(self) -> str:
        """The row's name in the record: who tries what."""
        return f"{self.os_user} as {self.role}: {self.case}"

    def as_dict(self) -> dict[str, object]:
        return {"check": self.check, **self.__dict__}


@dataclass(frozen=True)
class ClientProofResult:
    """Step c5: each client connected with its certificate, and each must-fail check."""

    verdict: str  # "pass" or "fail"
    checks: tuple[ProofCheck, ...]
    sessions: list[dict[str, object]]  # pg_stat_ssl of each client's session
    clients_used: ClientsUsed  # the clients' values, and whether c1's form gave them
    messages: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"

    def summary(self) -> dict[str, object]:
        return {
            "verdict": self.verdict,
            "checks": [c.as_dict() for c in self.checks],
            "sessions": self.sessions,
            "messages": self.messages,
            "clients_used": self.clients_used.to_json(),
        }


NO_CERTIFICATE = "connection requires a valid client certificate"
UNKNOWN_CA = "tlsv1 alert unknown ca"
OTHER_ROLE = "certificate authentication failed for user"
SERVER_AUTH_ONLY = "sslv3 alert unsupported certificate"
_SEP = "\x1f"


def _psql(
    user: ClientUser, conninfo: dict[str, str], query: str, *, timeout: float = 30
) -> tuple[bool, str]:
    """``psql`` as ``user`` with nothing of the runbook's environment; (connected, output or
    the server's message)."""
    psql = shutil.which("psql")
    if psql is None:
        return False, "psql is not installed on this machine"
    env = {"HOME": str(user.home), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
    kwargs: dict[str, Any] = {}
    if os.geteuid() == 0 and user.uid != 0:
        kwargs = {"user": user.uid, "group": user.gid, "extra_groups": []}
    elif os.geteuid() != user.uid:
        return False, f"cannot run psql as {user.name} without root"
    conn = " ".join(f"{k}={v}" for k, v in conninfo.items())
    proc = subprocess.run(
        [psql, conn, "-XAt", "-F", _SEP, "-c", query],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(user.home) if user.home.is_dir() else "/",
        timeout=timeout,
        check=False,
        **kwargs,
    )
    if proc.returncode == 0:
        return True, proc.stdout.strip()
    text = " ".join(proc.stderr.split())
    # libpq says where it tried first; the reason is what follows
    return False, re.sub(
        r'^psql: error: (connection to server at "[^"]*"(, port \d+)? failed: )?(FATAL: +)?',
        "",
        text,
    )


@contextmanager
def _private_tmp() -> Iterator[Path]:
    """A new private temporary folder (never in a client's home), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="pgtls-c5-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _hand_over(directory: Path, user: ClientUser) -> None:
    """Give the folder to ``user`` once everything in it is written (through its descriptor),
    so the tool never writes as root into a folder the user controls."""
    if os.geteuid() != 0:
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        os.fchown(fd, user.uid, user.gid)
    finally:
        os.close(fd)


def _write_pair(
    directory: Path, stem: str, key: Any, chain: Sequence[x509.Certificate], user: ClientUser
) -> tuple[Path, Path]:
    """A key and its certificate with the intermediates (libpq sends the whole file), as the
    client user's own files in ``directory``."""
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    owner = (user.uid, user.gid) if os.geteuid() == 0 else (os.geteuid(), os.getegid())
    crt, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    files.atomic_write(
        crt, b"".join(pem_of(c) for c in chain), mode=0o644, uid=owner[0], gid=owner[1]
    )
    files.atomic_write(key_path, key_pem, mode=0o600, uid=owner[0], gid=owner[1])
    return crt, key_path


def _trusted_lab_ca(params: Params, roots: list[x509.Certificate]) -> LabCA | None:
    """The work directory's lab CA, when it issued the client roots (a lab run): it can make
    a certificate the server trusts but that is for servers only."""
    wanted = {chainmod.fingerprint(c) for c in roots}
    for directory in (params.work.lab_ca, params.work.shared_lab_ca):
        if (directory / "signer.key").exists():
            try:
                ca = LabCA.load(directory)
            except InputError:
                continue
            if chainmod.fingerprint(ca.root) in wanted:
                return ca
    return None


def _attempt(
    user: ClientUser, conninfo: dict[str, str], label: str, expect: str, extra: dict[str, str]
) -> ProofCheck:
    """One must-fail connection as ``user``: passed when the server refuses it with ``expect``."""
    ok, text = _psql(user, {**conninfo, **extra}, "SELECT 1")
    if ok:
        observed = "ok"
    else:
        observed = expect if _matches(text, expect) else "refused for another reason"
    return ProofCheck(
        label, user.name, conninfo["user"], expect, observed, observed == expect, text
    )


def _matches(observed: str, expect: str) -> bool:
    if expect == OTHER_ROLE:
        return OTHER_ROLE in observed or "(clientcert=verify-full) failed for user" in observed
    return expect in observed


def step_c5_verify_clients(params: Params) -> ClientProofResult:
    """Each client connects as its OS user with its own files, and the must-fail checks fail
    for their reasons; a failed check undoes the change (c3 and c4) and raises."""
    params, used = clients_used(params)  # the subjects chosen in c1's form, if any
    host_ip = address_of(params.server_host)
    roots = read_roots(params)
    rules = hba.parse_rules(list(params.hba_rules))
    lab = _trusted_lab_ca(params, roots)
    crls = given_crls(params.client_crl_file)  # what c4 installed as ssl_crl_file
    checks: list[ProofCheck] = []
    seen: list[dict[str, object]] = []
    messages: list[str] = []
    clients = [(str(c["os_user"]), str(c["role"])) for c in params.clients]
    for os_user, role in clients:
        (user,) = resolve_client_users([os_user])
        found = client_rule(rules, role, params.server_dbname)
        database = found[1] if found else params.server_dbname
        base = {
            "host": params.common_name,
            "hostaddr": host_ip,
            "port": str(params.server_port),
            "dbname": database,
            "sslmode": "verify-full",
            "connect_timeout": "10",
        }

        as_role = {**base, "user": role}
        installed = read_client_file(user.client_crt, user.uid)
        leaf = x509.load_pem_x509_certificate(installed) if installed is not None else None
        revoked = revoked_by(crls, leaf) if leaf is not None else None
        if leaf is not None and revoked is not None:
            checks.append(
                _attempt(
                    user,
                    as_role,
                    f"its own certificate (serial {leaf.serial_number}), which the CRL of "
                    f"{revoked.issuer.rfc4514_string()} revokes",
                    CRL_REVOKED_ALERT,
                    {},
                )
            )
        else:
            checks.append(_own_login(user, role, as_role, seen))
        with _private_tmp() as tmp:
            stranger = LabCA.create(
                ("pgtls throwaway client issuer",), root_name="pgtls throwaway root"
            )
            key, cert = stranger.issue([role])
            unrelated = _write_pair(tmp, "unrelated", key, [cert, *stranger.intermediates], user)
            server_only = None
            if lab is not None:
                key, cert = lab.issue([role])
                server_only = _write_pair(tmp, "server-only", key, [cert, *lab.intermediates], user)
            _hand_over(tmp, user)
            tries = [
                (
                    "no client certificate",
                    NO_CERTIFICATE,
                    (tmp / "none.crt", tmp / "none.key"),  # absent: libpq sends none
                ),
                ("a certificate of an unrelated CA", UNKNOWN_CA, unrelated),
            ]
            if server_only is not None:
                tries.append(
                    (
                        "a certificate for servers only (serverAuth, no clientAuth)",
                        SERVER_AUTH_ONLY,
                        server_only,
                    )
                )
            else:
                messages.append(
                    f"{os_user}: the serverAuth-only check needs the CA of the client roots at "
                    "hand (a lab run); not run"
                )
            for case, expect, (crt, key_path) in tries:
                extra = {"sslcert": str(crt), "sslkey": str(key_path)}
                checks.append(_attempt(user, as_role, case, expect, extra))
        other = next(
            (
                (r, f[1])
                for _u, r in clients
                if r != role
                and (f := client_rule(rules, r, params.server_dbname)) is not None
                and f[0].method == "cert"
            ),
            None,
        )
        if revoked is not None:
            messages.append(
                f"{os_user}: its certificate is revoked, so the server refuses it before any "
                "role is compared; the another-role check was not run"
            )
        elif other is not None:  # the other role's own line, with this client's certificate
            checks.append(
                _attempt(
                    user,
                    {**base, "user": other[0], "dbname": other[1]},
                    f"its own certificate as role {other[0]}",
                    OTHER_ROLE,
                    {},
                )
            )
        else:
            messages.append(
                f"{os_user}: no other client role on a cert line to try its certificate as; "
                "the another-role check was not run"
            )
    verdict = "pass" if checks and all(c.passed for c in checks) else "fail"
    res = ClientProofResult(
        verdict=verdict,
        checks=tuple(checks),
        sessions=seen,
        clients_used=used,
        messages=messages,
    )
    save_step(params, C5, res.summary())
    if verdict == "fail":
        failed = [c for c in checks if not c.passed]
        first = failed[0] if failed else None
        undone = ""
        if params.work.journal.exists():
            undo_change(params, server=None, reason="undone")
            undone = "; steps c3 and c4 were undone and the server reloaded"
        raise ServerError(
            f"{len(failed)} of {len(checks)} client checks failed"
            + (
                f" (first: {first.check}: expected {first.expect!r}, got "
                f"{first.detail or first.observed!r})"
                if first
                else " (no client to check)"
            )
            + undone
        )
    return res


def _own_login(
    user: ClientUser, role: str, conninfo: dict[str, str], seen: list[dict[str, object]]
) -> ProofCheck:
    """The client's own login with ``~/.postgresql`` only; ``pg_stat_ssl`` of that session must
    name its certificate: subject, serial and issuer."""
    label = "its own certificate, verify-full, ~/.postgresql only"
    ok, text = _psql(
        user,
        conninfo,
        "SELECT ssl, client_dn, client_serial, issuer_dn FROM pg_stat_ssl "
        "WHERE pid = pg_backend_pid()",
    )
    if not ok:
        return ProofCheck(label, user.name, role, "ok", "fail", False, text)
    data = read_client_file(user.client_crt, user.uid)
    if data is None:
        return ProofCheck(
            label, user.name, role, "ok", "ok", False, "no ~/.postgresql/postgresql.crt"
        )
    cert = x509.load_pem_x509_certificate(data)
    fields = (text.split(_SEP) + ["", "", "", ""])[:4]
    got = {
        "ssl": fields[0],
        "client_dn": fields[1],
        "client_serial": fields[2],
        "issuer_dn": fields[3],
    }
    want = {
        "ssl": "t",
        "client_dn": ident.stat_ssl_dn(cert.subject),
        "client_serial": str(cert.serial_number),
        "issuer_dn": ident.stat_ssl_dn(cert.issuer),
    }
    seen.append({"os_user": user.name, "role": role, **got})
    wrong = [f"{k} is {got[k]!r}, not {want[k]!r}" for k in want if got[k] != want[k]]
    return ProofCheck(
        label,
        user.name,
        role,
        "ok",
        "ok",
        not wrong,
        "; ".join(wrong)
        or f"pg_stat_ssl: client_dn {got['client_dn']}, serial {got['client_serial']}",
    )
