"""Check a planned ``pg_hba.conf`` without putting it in the live path.

The running server only parses the file at its configured path, so a check through
``pg_hba_file_rules`` would need the planned text there, where any reload by anyone would load
it. Instead a throwaway stand-alone backend (``postgres --single``) of the same binaries as the
running server parses a copy, with ``ssl = on`` so ``hostssl`` and ``cert`` lines are read as
they will be once SSL is on. Its cluster is made once per binary directory and server user and
reused (``/var/tmp/pgtls-hbacheck-<major>-<uid>``, owned by that user, mode 0700).

:func:`first_match` then says whether the runbook's own connection would still be accepted.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pgtls_helpers.errors import PreflightError
from pgtls_helpers.postgres import files

__all__ = [
    "HbaLine",
    "IdentRow",
    "OwnConnection",
    "check_hba_text",
    "check_ident_text",
    "first_match",
    "server_bindir",
]


@dataclass(frozen=True)
class HbaLine:
    """One row of ``pg_hba_file_rules`` as the throwaway backend parsed it."""

    line_number: int
    type: str | None
    database: tuple[str, ...]
    user_name: tuple[str, ...]
    address: str | None
    netmask: str | None
    auth_method: str | None
    error: str | None


@dataclass(frozen=True)
class OwnConnection:
    """The runbook's own connection, as pg_hba.conf sees it."""

    user: str
    database: str
    address: str | None  # None: a Unix socket
    tls: bool
    roles: tuple[str, ...] = ()  # roles the user is a member of (for ``+group``)


def server_bindir(data_directory: Path) -> Path:
    """The directory of the binary the running postmaster was started from."""
    try:
        pid = int((data_directory / "postmaster.pid").read_text().splitlines()[0])
        exe = Path(os.readlink(f"/proc/{pid}/exe"))
    except (OSError, ValueError, IndexError) as exc:
        raise PreflightError(
            f"{data_directory}: cannot find the running server's binaries through "
            "postmaster.pid; run the runbook on the database host as root or the server's user"
        ) from exc
    return exe.parent


def _run_as(
    argv: list[str], uid: int, gid: int, *, stdin: str = "", timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as the server's user (the binaries refuse root)."""
    switch = os.geteuid() == 0 and uid != 0
    return subprocess.run(
        argv,
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"},
        cwd="/",
        timeout=timeout,
        user=uid if switch else None,
        group=gid if switch else None,
        extra_groups=[] if switch else None,
    )


def _check_cluster(bindir: Path, uid: int, gid: int) -> Path:
    major = _major(bindir)
    # a private directory of the server's user, checked below before every use
    base = Path("/var/tmp") if Path("/var/tmp").is_dir() else Path(tempfile.gettempdir())  # noqa: S108
    home = base / f"pgtls-hbacheck-{major}-{uid}"
    data = home / "data"
    try:
        st: os.stat_result | None = home.lstat()
    except FileNotFoundError:
        st = None
    if st is not None:
        private = stat.S_ISDIR(st.st_mode) and st.st_uid == uid and not st.st_mode & 0o077
        if private and (data / "PG_VERSION").exists():
            return data
        # unfinished, or not the server user's private directory (another user may have
        # taken the name first): taken away and made anew, never used
        try:
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(home)  # fd-based: never follows a link inside
            else:
                home.unlink()
        except OSError as exc:
            raise PreflightError(
                f"{home}: not a private directory of the server's user (owner uid "
                f"{st.st_uid}) and it cannot be removed from here ({exc.strerror}); remove it "
                "as root and run again"
            ) from None
    tmp = Path(tempfile.mkdtemp(prefix=f".pgtls-hbacheck-{major}-", dir=base))
    if os.geteuid() == 0:  # through the new directory's descriptor, not its path
        dfd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            os.fchown(dfd, uid, gid)
        finally:
            os.close(dfd)
    proc = _run_as(
        [
            str(bindir / "initdb"),
            "-D",
            str(tmp / "data"),
            "-N",
            "-A",
            "trust",
            "-U",
            "pgtls_check",
            "-E",
            "UTF8",
            "--locale=C",
        ],
        uid,
        gid,
    )
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise PreflightError(f"{bindir}/initdb could not make the pg_hba.conf check: {tail[0]}")
    try:
        os.rename(tmp, home)
    except OSError:  # another run made it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return data


def _major(bindir: Path) -> str:
    proc = subprocess.run(
        [str(bindir / "postgres"), "--version"], capture_output=True, text=True, check=False
    )
    words = proc.stdout.split()
    return words[-1].split(".")[0] if words else "x"


@contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def check_hba_text(
    text: str, *, hba_file: Path, data_directory: Path, owner: tuple[int, int]
) -> list[HbaLine]:
    """Parse ``text`` as ``hba_file`` would be parsed once SSL is on; the live file is untouched.

    The copy sits beside ``hba_file`` under another name, so relative ``include`` lines resolve
    as they will; it is removed afterwards.
    """
    uid, gid = owner
    bindir = server_bindir(data_directory)
    data = _check_cluster(bindir, uid, gid)
    copy = hba_file.with_name(f".{hba_file.name}.pgtls-check-{os.getpid()}")
    out = data.parent / f"rules-{os.getpid()}.json"
    copy.unlink(missing_ok=True)  # left by a run killed during its check
    out.unlink(missing_ok=True)
    fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            if os.geteuid() == 0:
                os.fchown(fh.fileno(), uid, gid)
            fh.write(text)
        query = (
            "COPY (SELECT row_to_json(r) FROM pg_hba_file_rules r ORDER BY line_number) "
            f"TO '{out}'\n"
        )
        with _exclusive(data.parent / "check.lock"):  # one stand-alone backend at a time
            proc = _run_as(
                [
                    str(bindir / "postgres"),
                    "--single",
                    "-D",
                    str(data),
                    "-c",
                    f"hba_file={copy}",
                    "-c",
                    "ssl=on",
                    "-c",
                    "log_min_messages=debug3",
                    "postgres",
                ],
                uid,
                gid,
                stdin=query,
                timeout=120,
            )
        try:
            found = files.read_regular(out)  # the server user's directory: no link followed
            if found is None:
                raise FileNotFoundError(out)
            raw = found[0].decode().splitlines()
        except (OSError, PreflightError, UnicodeDecodeError):
            raise PreflightError(
                f"{hba_file}: the throwaway server could not parse the planned file "
                f"({(proc.stderr or proc.stdout).strip()[-200:]})"
            ) from None
    finally:
        copy.unlink(missing_ok=True)
        out.unlink(missing_ok=True)
    said = _messages_by_line(proc.stderr + proc.stdout)
    lines = []
    for row in raw:
        r = json.loads(row.replace("\\\\", "\\"))
        lines.append(
            HbaLine(
                line_number=int(r["line_number"] or 0),
                type=r["type"],
                database=tuple(r["database"] or ()),
                user_name=tuple(r["user_name"] or ()),
                address=r["address"],
                netmask=r["netmask"],
                auth_method=r["auth_method"],
                error=r["error"]
                or (
                    None
                    if r["type"]
                    else said.get(int(r["line_number"] or 0), "PostgreSQL cannot parse this line")
                ),
            )
        )
    return lines


@dataclass(frozen=True)
class IdentRow:
    """One row of ``pg_ident_file_mappings`` (PostgreSQL 15+) as the throwaway backend parsed
    it."""

    line_number: int
    map_name: str | None
    sys_name: str | None
    pg_username: str | None
    error: str | None


def check_ident_text(
    text: str, *, ident_file: Path, data_directory: Path, owner: tuple[int, int]
) -> list[IdentRow]:
    """Parse ``text`` as ``ident_file`` would be parsed; the live file is untouched.

    The same throwaway backend as :func:`check_hba_text`, with ``ident_file`` pointing at a
    copy beside the live file (so PostgreSQL 16's relative ``include`` lines resolve as they
    will); it is removed afterwards.
    """
    uid, gid = owner
    bindir = server_bindir(data_directory)
    data = _check_cluster(bindir, uid, gid)
    copy = ident_file.with_name(f".{ident_file.name}.pgtls-check-{os.getpid()}")
    out = data.parent / f"ident-{os.getpid()}.json"
    copy.unlink(missing_ok=True)  # left by a run killed during its check
    out.unlink(missing_ok=True)
    fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            if os.geteuid() == 0:
                os.fchown(fh.fileno(), uid, gid)
            fh.write(text)
        query = (
            "COPY (SELECT row_to_json(r) FROM pg_ident_file_mappings r ORDER BY line_number) "
            f"TO '{out}'\n"
        )
        with _exclusive(data.parent / "check.lock"):
            proc = _run_as(
                [
                    str(bindir / "postgres"),
                    "--single",
                    "-D",
                    str(data),
                    "-c",
                    f"ident_file={copy}",
                    "postgres",
                ],
                uid,
                gid,
                stdin=query,
                timeout=120,
            )
        try:
            found = files.read_regular(out)
            if found is None:
                raise FileNotFoundError(out)
            raw = found[0].decode().splitlines()
        except (OSError, PreflightError, UnicodeDecodeError):
            raise PreflightError(
                f"{ident_file}: the throwaway server could not parse the planned file "
                f"({(proc.stderr or proc.stdout).strip()[-200:]})"
            ) from None
    finally:
        copy.unlink(missing_ok=True)
        out.unlink(missing_ok=True)
    rows = []
    for row in raw:
        r = json.loads(row.replace("\\\\", "\\"))
        rows.append(
            IdentRow(
                line_number=int(r["line_number"] or 0),
                map_name=r["map_name"],
                sys_name=r["sys_name"],
                pg_username=r["pg_username"],
                error=r["error"],
            )
        )
    return rows


def _messages_by_line(output: str) -> dict[int, str]:
    """What the backend said about each line it could not parse (some versions leave the
    ``error`` column empty for a bad option and only log the reason)."""
    out: dict[int, str] = {}
    last = ""
    for raw in output.splitlines():
        if "DEBUG:" in raw or "LOG:" in raw or "WARNING:" in raw:
            last = raw.split(":  ", 1)[-1].strip()
        elif "CONTEXT:" in raw and "of configuration file" in raw:
            match = re.search(r"line (\d+) of configuration file", raw)
            if match and last:
                out.setdefault(int(match.group(1)), last)
    return out


def _address_matches(line: HbaLine, address: str) -> bool | None:
    if line.address in (None, "all"):
        return True
    if line.address in ("samehost", "samenet"):
        return None
    try:
        ip = ipaddress.ip_address(address)
        if line.netmask:
            net = ipaddress.ip_network(f"{line.address}/{line.netmask}", strict=False)
        else:
            net = ipaddress.ip_network(str(line.address), strict=False)
    except ValueError:
        return None  # a host name: resolved by the server at connect time
    return ip.version == net.version and ip in net


def _name_matches(names: tuple[str, ...], value: str, roles: tuple[str, ...]) -> bool:
    for name in names:
        if name in ("all", value) or (name.startswith("+") and name[1:] in roles):
            return True
    return False


def first_match(lines: list[HbaLine], own: OwnConnection) -> HbaLine | None:
    """The line that would decide the runbook's own connection (None: no line matches).

    Lines whose match depends on DNS (a host name, ``samehost``) count as matching when their
    method would let the connection in, and as not matching when it would not: the check errs
    on the side of refusing the change.
    """
    for line in lines:
        if line.error or line.type is None:
            continue
        if own.address is None:
            if line.type != "local":
                continue
        else:
            if line.type == "local":
                continue
            if line.type in ("hostssl",) and not own.tls:
                continue
            if line.type in ("hostnossl",) and own.tls:
                continue
            if line.type == "hostgssenc":
                continue
        database_ok = _name_matches(line.database, own.database, ()) or (
            "sameuser" in line.database and own.database == own.user
        )
        if not database_ok or not _name_matches(line.user_name, own.user, own.roles):
            continue
        if own.address is not None:
            matched = _address_matches(line, own.address)
            if matched is None:
                if line.auth_method in ("reject", "cert"):
                    return line
                continue
            if not matched:
                continue
        return line
    return None
