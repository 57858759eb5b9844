"""The client side: ``~/.postgresql/root.crt`` for each client OS user (and, for client
certificates, ``postgresql.crt``, ``postgresql.key``, ``postgresql.pk8``), and proof through libpq.

The proof is a table of connection attempts, expected against observed. The ones that must
fail matter as much as the ones that must succeed, and a failure only counts when it fails for
the expected reason (a password error is not a certificate refusal).

Why one module of some 680 lines: everything here writes into, or acts as, a client OS user
whose home the user controls, through the same descriptor-based, link-refusing helpers; kept
together, that boundary is reviewed in one place instead of across modules that could drift.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import stat
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pgtls_helpers.errors import InputError
from pgtls_helpers.postgres.files import Kind, PlannedFile, sha256_hex

__all__ = [
    "TLS_VERIFIED",
    "ClientUser",
    "ConnCheck",
    "classify_error",
    "connection_checks",
    "plan_client_file",
    "plan_root_crt",
    "psql_as_user",
    "resolve_client_users",
]


@dataclass(frozen=True)
class ClientUser:
    """A client OS user: where libpq looks for ``root.crt`` when that user connects."""

    name: str
    home: Path
    uid: int
    gid: int

    @property
    def root_crt(self) -> Path:
        return self.home / ".postgresql" / "root.crt"

    @property
    def client_crt(self) -> Path:
        """The certificate libpq sends when a server asks for one (and it always may)."""
        return self.home / ".postgresql" / "postgresql.crt"

    @property
    def client_key(self) -> Path:
        """Its private key; libpq refuses one that others can read."""
        return self.home / ".postgresql" / "postgresql.key"

    @property
    def client_pk8(self) -> Path:
        """The same key as PKCS#8 DER, where pgjdbc looks for it."""
        return self.home / ".postgresql" / "postgresql.pk8"


def resolve_client_users(
    names: Sequence[str], *, source: str = "client_system_users"
) -> list[ClientUser]:
    """Look the names up in the OS user database (``source`` names the parameter)."""
    users = []
    for name in names:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise InputError(
                f"{source}: there is no OS user '{name}' on this machine; create it "
                "or remove it from the list"
            ) from None
        users.append(ClientUser(name, Path(entry.pw_dir), entry.pw_uid, entry.pw_gid))
    return users


def _pem_blocks(data: bytes) -> list[bytes]:
    marker = b"-----END CERTIFICATE-----"
    parts = []
    for chunk in data.split(marker)[:-1]:
        start = chunk.find(b"-----BEGIN CERTIFICATE-----")
        if start >= 0:
            parts.append(chunk[start:] + marker + b"\n")
    return parts


def plan_root_crt(user: ClientUser, root_pem: bytes, *, merge: bool = False) -> PlannedFile:
    """The root.crt write for one user; an existing different file is replaced (with a
    backup) or, with ``merge``, kept and the new root appended to it."""
    data = root_pem
    if merge:
        current = read_client_file(user.root_crt, user.uid) if _exists(user) else None
        if current is not None:
            blocks = _pem_blocks(current)
            new = _pem_blocks(root_pem)
            if all(b in blocks for b in new):
                data = current
            else:
                data = current.rstrip(b"\n") + b"\n" + b"".join(b for b in new if b not in blocks)
    return plan_client_root(user, data)


def _exists(user: ClientUser) -> bool:
    check_client_path(user)
    return os.path.lexists(user.root_crt.parent)


def plan_client_root(user: ClientUser, data: bytes, *, mode: int = 0o644) -> PlannedFile:
    """What writing ``data`` to the user's root.crt would do, judged from the file as read
    through its directory's descriptor (never by path); reads, never writes."""
    found = client_file(user.root_crt, user.uid) if _exists(user) else None
    action: Literal["create", "replace", "unchanged"]
    if found is None:
        action = "create"
    else:
        current, st = found
        same = current == data and stat.S_IMODE(st.st_mode) == mode and st.st_gid == user.gid
        action = "unchanged" if same else "replace"
    return PlannedFile(
        target=user.root_crt,
        kind="root.crt",
        data=data,
        mode=mode,
        uid=user.uid,
        gid=user.gid,
        action=action,
        current_sha256=sha256_hex(found[0]) if found is not None else None,
    )


def plan_client_file(
    user: ClientUser,
    target: Path,
    data: bytes,
    *,
    kind: Kind,
    mode: int,
) -> PlannedFile:
    """What writing ``data`` to ``target`` in the user's ``~/.postgresql`` would do, judged
    from the file as read through its directory's descriptor (a link there, or a file another
    user owns, is refused with one sentence); reads, never writes."""
    directory = user.home / ".postgresql"
    if target.parent != directory:
        raise InputError(f"{target}: not in {directory}; pgtls writes client files only there")
    # only the directory and the target itself: a root.crt the user linked to a bundle of
    # their own is no business of this write
    found = client_file(target, user.uid) if check_client_dir(user) else None
    action: Literal["create", "replace", "unchanged"]
    if found is None:
        action = "create"
    else:
        current, st = found
        same = current == data and stat.S_IMODE(st.st_mode) == mode and st.st_gid == user.gid
        action = "unchanged" if same else "replace"
    return PlannedFile(
        target=target,
        kind=kind,
        data=data,
        mode=mode,
        uid=user.uid,
        gid=user.gid,
        action=action,
        current_sha256=sha256_hex(found[0]) if found is not None else None,
    )


def prepare_client_dir(user: ClientUser) -> None:
    """Make ``~/.postgresql`` (0700, the user's) when missing; refuse a symlinked one."""
    directory = user.root_crt.parent
    check_client_path(user)
    try:
        os.mkdir(directory, 0o700)
        created = True
    except FileExistsError:
        created = False
    # The user owns the home and may swap what is at the name at any instant: ownership is
    # given through a descriptor opened without following a link, never by path.
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        raise InputError(
            f"{directory}: not a real directory ({exc.strerror}); the runbook will not work "
            "through a symbolic link, so replace it with a directory of the user's own"
        ) from None
    try:
        st = os.fstat(fd)
        if created and os.geteuid() == 0 and st.st_uid == 0:
            os.fchown(fd, user.uid, user.gid)
        elif st.st_uid != user.uid:
            raise InputError(
                f"{directory}: not owned by {user.name}; the runbook will not write there"
            )
    finally:
        os.close(fd)


def check_client_dir(user: ClientUser) -> bool:
    """Refuse to work through a link: ``~/.postgresql`` must be a real directory the user
    owns (True), or absent (False)."""
    directory = user.root_crt.parent
    try:
        st = directory.lstat()
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode) or st.st_uid != user.uid:
        raise InputError(
            f"{directory}: not a real directory owned by {user.name} (a symbolic link or "
            "another owner); the runbook will not write through it, so replace it with a "
            "directory of the user's own"
        )
    return True


def check_client_path(user: ClientUser) -> None:
    """Refuse to work through a link: ``~/.postgresql`` must be a real directory the user
    owns, and ``root.crt`` a regular file (or absent)."""
    if not check_client_dir(user):
        return
    try:
        fst = user.root_crt.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISREG(fst.st_mode) or fst.st_uid != user.uid:
        raise InputError(
            f"{user.root_crt}: not a regular file owned by {user.name} (a symbolic link or "
            "another owner); the runbook will not read or replace it, so remove it first"
        )


def _client_dir_fd(directory: Path, uid: int) -> int:
    """An fd of ``directory``, opened without following a link, checked to be the user's."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        raise InputError(
            f"{directory}: not a real directory ({exc.strerror}); the runbook will not work "
            "through a symbolic link, so replace it with a directory of the user's own"
        ) from None
    if os.fstat(fd).st_uid != uid:
        os.close(fd)
        raise InputError(
            f"{directory}: not owned by the client user; the runbook will not write there"
        )
    return fd


def read_client_file(target: Path, uid: int) -> bytes | None:
    """The bytes of a client's file, read without following a link (None: absent)."""
    found = client_file(target, uid)
    return found[0] if found is not None else None


def client_file(target: Path, uid: int) -> tuple[bytes, os.stat_result] | None:
    """The bytes and status of a client's file, read through its directory's descriptor:
    no link followed, never blocking on a FIFO, capped at 10 MB (None: absent)."""
    dfd = _client_dir_fd(target.parent, uid)
    try:
        fd = os.open(target.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dfd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise InputError(
            f"{target}: cannot be read safely ({exc.strerror}; a symbolic link?); the runbook "
            "will not read or replace it, so remove it first"
        ) from None
    finally:
        os.close(dfd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != uid:
            raise InputError(
                f"{target}: not a regular file owned by the client user; remove it first"
            )
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
            if sum(map(len, chunks)) > 10 * 1024 * 1024:
                raise InputError(f"{target}: larger than 10 MB; not a root certificate file")
        return b"".join(chunks), st
    finally:
        os.close(fd)


def write_client_file(target: Path, data: bytes, *, mode: int, uid: int, gid: int) -> None:
    """Replace a client's file atomically inside its directory, never through a link: the
    directory is opened with ``O_NOFOLLOW`` and checked to be the user's, the new file is
    created and renamed relative to that open directory."""
    dfd = _client_dir_fd(target.parent, uid)
    tmp = f".{target.name}.pgtls-tmp-{os.getpid()}"
    try:
        try:
            os.unlink(tmp, dir_fd=dfd)
        except FileNotFoundError:
            pass
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dfd)
        try:
            if os.geteuid() == 0:
                os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, target.name, src_dir_fd=dfd, dst_dir_fd=dfd)
        os.fsync(dfd)
    finally:
        os.close(dfd)


def write_client_files(items: Sequence[tuple[Path, bytes, int]], *, uid: int, gid: int) -> None:
    """Replace several files of one client directory so that a reader never sees them half
    done: every new file is written and fsynced under a temporary name first, then all are
    renamed in the order given, back to back, relative to the one open directory.

    libpq reads ``postgresql.crt`` and then ``postgresql.key`` at each connection, so the
    certificate goes first: a connection that read the old certificate reads a key no older
    than the one it had, and only one whose two reads both fall between two ``rename`` calls
    (microseconds apart) could pair the new certificate with the old key.
    """
    if not items:
        return
    directory = items[0][0].parent
    if any(t.parent != directory for t, _, _ in items):
        raise InputError(f"{directory}: the files of one swap must share their directory")
    dfd = _client_dir_fd(directory, uid)
    staged: list[tuple[str, str]] = []
    try:
        try:
            for target, data, mode in items:
                tmp = f".{target.name}.pgtls-tmp-{os.getpid()}"
                try:
                    os.unlink(tmp, dir_fd=dfd)
                except FileNotFoundError:
                    pass
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                fd = os.open(tmp, flags, 0o600, dir_fd=dfd)
                staged.append((tmp, target.name))
                try:
                    if os.geteuid() == 0:
                        os.fchown(fd, uid, gid)
                    os.fchmod(fd, mode)
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except BaseException:
            for tmp, _ in staged:
                try:
                    os.unlink(tmp, dir_fd=dfd)
                except FileNotFoundError:
                    pass
            raise
        for tmp, name in staged:
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        os.fsync(dfd)
    finally:
        os.close(dfd)


def remove_client_file(target: Path, uid: int) -> None:
    """Remove a client's file (the name itself, never what a link points at)."""
    dfd = _client_dir_fd(target.parent, uid)
    try:
        os.unlink(target.name, dir_fd=dfd)
        os.fsync(dfd)
    except FileNotFoundError:
        pass
    finally:
        os.close(dfd)


# --------------------------------------------------------------------------- connection checks

Outcome = Literal["ok", "fail"]

# A client's check proves TLS when it connects, and also when the server refuses the login:
# libpq verifies the certificate and the host name during the handshake, before authentication.
TLS_VERIFIED = "TLS verified"


@dataclass(frozen=True)
class ConnCheck:
    """One connection attempt: what we expected and what libpq did."""

    check: str
    sslmode: str
    host: str
    expect: Outcome
    expect_reason: str
    observed: Outcome
    observed_reason: str
    detail: str

    @property
    def passed(self) -> bool:
        if self.expect_reason == TLS_VERIFIED and self.observed_reason.startswith(TLS_VERIFIED):
            return True  # the handshake verified the server; only the login was refused
        if self.expect != self.observed:
            return False
        return self.expect == "ok" or self.expect_reason == self.observed_reason

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "passed": self.passed}


def classify_error(message: str) -> str:
    """Why a connection failed, as one of a few reasons a DBA can act on.

    >>> classify_error('server certificate for "db1" does not match host name "db2"')
    'host name not in certificate'
    >>> classify_error('pg_hba.conf rejects connection for host "127.0.0.1", no encryption')
    'non-SSL rejected by pg_hba.conf'
    """
    text = message.lower()
    if "does not match host name" in text or "no subject alternative names" in text:
        return "host name not in certificate"
    if "certificate verify failed" in text or "root certificate file" in text:
        return "certificate not trusted"
    if "no encryption" in text or ("rejects connection" in text and "ssl off" in text):
        return "non-SSL rejected by pg_hba.conf"
    if "no pg_hba.conf entry" in text:
        return "no pg_hba.conf entry"
    if "server does not support ssl" in text:
        return "server has SSL off"
    if "password authentication failed" in text:
        return "password refused"
    if "connection refused" in text or "timeout" in text:
        return "server not reachable"
    return "other"


def _attempt(conninfo: Mapping[str, Any]) -> tuple[Outcome, str, str]:
    import psycopg

    try:
        with psycopg.connect(autocommit=True, **conninfo) as conn:
            row = conn.execute(
                "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
            ).fetchone()
        detail = f"connected over {row[1]}" if row and row[0] else "connected without TLS"
        return "ok", "connected", detail
    except psycopg.OperationalError as exc:
        text = " ".join(str(exc).split())
        # libpq prefixes every error with where it tried; the reason is what follows
        text = re.sub(
            r'^(connection failed: )?connection to server at "[^"]*"(, port \d+)? '
            r"failed: ",
            "",
            text,
        )
        return "fail", classify_error(text), text


def connection_checks(
    conninfo: Mapping[str, Any],
    *,
    hosts: Sequence[str],
    hostaddr: str | None,
    root_crt: str | Path,
    unrelated_root: str | Path,
    reject_non_ssl: bool = True,
) -> list[ConnCheck]:
    """Connect through libpq in each way that matters and compare with what must happen.

    ``hosts`` are the names clients use (each tried with ``verify-full``); ``hostaddr`` pins the
    address so names work before DNS does. ``unrelated_root`` is a root that did not sign the
    server's chain.
    """
    base = {
        k: v for k, v in conninfo.items() if k not in ("sslmode", "sslrootcert", "host", "hostaddr")
    }
    base.setdefault("connect_timeout", 10)
    first = hosts[0]
    addr = {"hostaddr": hostaddr} if hostaddr else {}
    plan: list[tuple[str, dict[str, Any], Outcome, str]] = [
        (
            "verify-ca with the CA's root",
            {"sslmode": "verify-ca", "host": first, "sslrootcert": str(root_crt)},
            "ok",
            "connected",
        ),
    ]
    for host in hosts:
        plan.append(
            (
                f"verify-full as {host}",
                {"sslmode": "verify-full", "host": host, "sslrootcert": str(root_crt)},
                "ok",
                "connected",
            )
        )
    plan.append(
        (
            "verify-full with a name not in the certificate",
            {
                "sslmode": "verify-full",
                "host": "name-not-in-certificate.invalid",
                "sslrootcert": str(root_crt),
            },
            "fail",
            "host name not in certificate",
        )
    )
    plan.append(
        (
            "verify-ca against an unrelated root",
            {"sslmode": "verify-ca", "host": first, "sslrootcert": str(unrelated_root)},
            "fail",
            "certificate not trusted",
        )
    )
    if reject_non_ssl:
        plan.append(
            (
                "sslmode=disable (non-SSL)",
                {"sslmode": "disable", "host": first},
                "fail",
                "non-SSL rejected by pg_hba.conf",
            )
        )
    # require does not verify anything when no root file exists: it would accept any server.
    plan.append(
        (
            "require without a root (accepts any certificate)",
            {
                "sslmode": "require",
                "host": first,
                "sslrootcert": str(Path(root_crt).parent / "no-such-root.crt"),
            },
            "ok",
            "connected",
        )
    )
    checks = []
    for label, extra, expect, reason in plan:
        info = {**base, **addr, **extra}
        if extra["host"] == "name-not-in-certificate.invalid" and not hostaddr:
            info["hostaddr"] = _resolve_first(first)
        observed, observed_reason, detail = _attempt(info)
        checks.append(
            ConnCheck(
                label,
                extra["sslmode"],
                str(extra["host"]),
                expect,
                reason,
                observed,
                observed_reason,
                detail,
            )
        )
    return checks


def _resolve_first(host: str) -> str:
    import socket

    return str(socket.getaddrinfo(host, None)[0][4][0])


_AFTER_HANDSHAKE = (
    "password authentication failed",
    "no password supplied",
    "authentication failed for user",
    "peer authentication failed",
    "ident authentication failed",
    "cert authentication failed",
)


def _refused_after_tls(text: str) -> bool:
    """libpq's message says the server refused the login, which it only does after the
    handshake; with ``sslmode=verify-full`` that handshake verified the certificate and name."""
    lower = text.lower()
    if any(m in lower for m in _AFTER_HANDSHAKE):
        return True
    if "does not exist" in lower and ("role" in lower or "database" in lower):
        return True
    return "no pg_hba.conf entry" in lower and "ssl encryption" in lower


def _pgpass_hint(user: ClientUser, host: str, hostaddr: str | None) -> str:
    where = f"{user.home}/.pgpass"
    if hostaddr and hostaddr != host:
        return (
            f"libpq looks up the password in {where} by the host name the client connects to "
            f"({host}), not by its address {hostaddr}: a line for {hostaddr} does not match"
        )
    return f"libpq looks up the password in {where}, matching the host name {host}"


def psql_as_user(
    user: ClientUser,
    conninfo: Mapping[str, Any],
    *,
    host: str,
    hostaddr: str | None,
    role: str | None = None,
    sslmode: str = "verify-full",
    timeout: float = 30,
) -> ConnCheck:
    """Run the machine's ``psql`` as ``user`` with only ``~/.postgresql/root.crt`` to trust.

    The client logs in as ``role`` (default: the OS user's own name, as libpq does) with
    whatever password that user has of its own (its ``~/.pgpass``); the runbook's password is
    never handed to it. No ``sslrootcert`` is given: libpq finds the root where the article puts
    it. A login the server refuses still proves TLS (the handshake came first): such a check
    passes as "TLS verified; authentication failed for role X".
    """
    psql = shutil.which("psql")
    login = role or user.name
    label = f"psql as OS user {user.name}, {sslmode}, ~/.postgresql/root.crt"

    def result(observed: Outcome, reason: str, detail: str) -> ConnCheck:
        return ConnCheck(
            check=label,
            sslmode=sslmode,
            host=host,
            expect="ok",
            expect_reason=TLS_VERIFIED,
            observed=observed,
            observed_reason=reason,
            detail=detail,
        )

    if psql is None:
        return result("fail", "other", "psql is not installed on this machine")
    parts = [
        f"host={host}",
        f"port={conninfo.get('port', 5432)}",
        f"user={login}",
        f"dbname={conninfo.get('dbname', 'postgres')}",
        f"sslmode={sslmode}",
        "connect_timeout=10",
    ]
    if hostaddr:
        parts.append(f"hostaddr={hostaddr}")
    # only what the client user has of its own: no PGPASSFILE, PGPASSWORD or other PG* variable
    # of the runbook's process reaches it
    env = {"HOME": str(user.home), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
    kwargs: dict[str, Any] = {}
    if os.geteuid() == 0 and user.uid != 0:
        kwargs = {"user": user.uid, "group": user.gid, "extra_groups": []}
    elif os.geteuid() != user.uid:
        return result("fail", "other", f"cannot run psql as {user.name} without root")
    proc = subprocess.run(
        [
            psql,
            " ".join(parts),
            "-XAtc",
            "SELECT version FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(user.home) if user.home.is_dir() else "/",
        timeout=timeout,
        check=False,
        **kwargs,
    )
    if proc.returncode == 0:
        return result("ok", "connected", f"connected as role {login} over {proc.stdout.strip()}")
    text = " ".join(proc.stderr.split())
    text = re.sub(
        r'^psql: error: (connection to server at "[^"]*"(, port \d+)? failed: )?', "", text
    )
    if sslmode == "verify-full" and _refused_after_tls(text):
        detail = text
        if "password" in text.lower():
            detail += f" ({_pgpass_hint(user, host, hostaddr)})"
        return result("fail", f"{TLS_VERIFIED}; authentication failed for role {login}", detail)
    return result("fail", classify_error(text), text)
