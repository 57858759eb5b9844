"""Atomic installs with backups and exact rollback.

Every write goes to a temporary file in the target's directory, created with its final mode
(0600 for a key from the first byte), owned as planned, fsynced, then renamed over the target.
Whatever is replaced is first copied to ``NAME.pgtls-backup-<UTC stamp>`` beside it, with the same
owner and mode, and :func:`rollback` puts those bytes, owner and mode back.

A server's files are written *exactly* (``exact=True``): their directory is opened from ``/``
one component at a time with ``O_NOFOLLOW``, and every operation (the temporary file, its
``fchown``, the rename, the fsync) is relative to that directory's descriptor. The path given
is the canonical one the target policy judged (:func:`canonical`), so a symbolic link swapped
into it afterwards, by anyone who owns a directory on the way, makes the write fail instead of
landing where the link leads.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import hashlib
import json
import os
import pwd
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pgtls_helpers.errors import PgtlsError, PreflightError

__all__ = [
    "InstallResult",
    "Installed",
    "PlannedFile",
    "apply_plan",
    "atomic_write",
    "backup_copy",
    "canonical",
    "fsync_dir",
    "key_file_problem",
    "plan_file",
    "read_regular",
    "remove",
    "require_space",
    "rollback",
    "sha256_hex",
    "utc_stamp",
]

Kind = Literal[
    "key",
    "certificate",
    "hba",
    "root.crt",
    "auto.conf",
    "ssl_ca_file",  # the roots the server trusts for client certificates
    "ssl_crl_file",  # the client CAs' revocation lists
    "ident",  # pg_ident.conf
    "client.crt",  # a client's ~/.postgresql/postgresql.crt
    "client.key",  # a client's ~/.postgresql/postgresql.key (or .pk8)
    "other",
]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def utc_stamp(now: datetime | None = None) -> str:
    return (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%SZ")


@dataclass(frozen=True)
class PlannedFile:
    """One file the change will write. ``data`` is never shown (it may be a private key)."""

    target: Path
    kind: Kind
    data: bytes = field(repr=False)
    mode: int
    uid: int
    gid: int
    action: Literal["create", "replace", "unchanged"]
    current_sha256: str | None

    @property
    def sha256(self) -> str:
        return sha256_hex(self.data)

    def describe(self) -> dict[str, object]:
        """A row for the plan table: no content, only where, who, mode and hashes."""
        return {
            "file": str(self.target),
            "kind": self.kind,
            "action": self.action,
            "owner": f"{_user(self.uid)}:{_group(self.gid)}",
            "mode": f"{self.mode:04o}",
            "sha256 (new)": self.sha256,
            "sha256 (current)": self.current_sha256 or "",
        }

    def record(self) -> dict[str, object]:
        """The same facts for the record (``manifest.PlannedFile``), under data names."""
        return {
            "target": str(self.target),
            "kind": self.kind,
            "action": self.action,
            "owner": f"{_user(self.uid)}:{_group(self.gid)}",
            "mode": f"{self.mode:04o}",
            "sha256": self.sha256,
            "current_sha256": self.current_sha256,
        }


@dataclass(frozen=True)
class Installed:
    """What one write did, enough to undo it exactly."""

    target: Path
    kind: Kind
    action: Literal["create", "replace", "unchanged"]
    sha256: str
    previous_sha256: str | None
    backup: Path | None

    @classmethod
    def from_dict(cls, item: dict[str, Any]) -> Installed:
        """The inverse of :meth:`as_dict` (a journal entry read back)."""
        return cls(
            Path(item["target"]),
            item["kind"],
            item["action"],
            item["sha256"],
            item["previous_sha256"],
            Path(item["backup"]) if item["backup"] else None,
        )

    def as_dict(self) -> dict[str, object]:
        return {
            "target": str(self.target),
            "kind": self.kind,
            "action": self.action,
            "sha256": self.sha256,
            "previous_sha256": self.previous_sha256,
            "backup": str(self.backup) if self.backup else None,
        }


@dataclass(frozen=True)
class InstallResult:
    """The writes of one step, in the order made."""

    installed: tuple[Installed, ...]

    @property
    def changed(self) -> bool:
        return any(i.action != "unchanged" for i in self.installed)

    def as_dicts(self) -> list[dict[str, object]]:
        return [i.as_dict() for i in self.installed]


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def key_file_problem(mode: int, uid: int, gid: int, server_uid: int) -> str | None:
    """Why PostgreSQL would refuse a key file with this owner and mode, or None.

    The server accepts a key its own user owns with no group/other bits, or one root owns
    with at most 0640 (``be-secure-common.c``).

    >>> key_file_problem(0o600, 101, 104, 101) is None
    True
    >>> key_file_problem(0o640, 0, 104, 101) is None
    True
    >>> key_file_problem(0o644, 101, 104, 101)
    'has group or world access (mode 0644); it must be 0600'
    """
    perms = stat.S_IMODE(mode)
    if uid == server_uid:
        if perms & 0o077:
            return f"has group or world access (mode {perms:04o}); it must be 0600"
        return None
    if uid == 0:
        if perms & 0o137:
            return f"is owned by root with mode {perms:04o}; root-owned keys must be 0640 or less"
        return None
    return f"is owned by {_user(uid)}, neither the server's user nor root"


def plan_file(
    target: str | Path,
    data: bytes,
    *,
    kind: Kind,
    mode: int,
    owner: tuple[int, int] | None = None,
) -> PlannedFile:
    """What writing ``data`` to ``target`` would do; reads, never writes.

    ``owner`` defaults to the current owner of the target, else of its directory.
    """
    path = Path(target)
    current: bytes | None
    try:
        current = path.read_bytes()
        st = path.stat()
    except FileNotFoundError:
        current, st = None, None
    except OSError as exc:
        raise PreflightError(
            f"{path}: cannot be read ({exc.strerror}); check its permissions"
        ) from exc
    if owner is None:
        ref = st or _dir_stat(path.parent)
        owner = (ref.st_uid, ref.st_gid)
    if current is None:
        action: Literal["create", "replace", "unchanged"] = "create"
    elif (
        current == data
        and st is not None
        and stat.S_IMODE(st.st_mode) == mode
        and (st.st_uid, st.st_gid) == owner
    ):
        action = "unchanged"
    else:
        action = "replace"
    return PlannedFile(
        target=path,
        kind=kind,
        data=data,
        mode=mode,
        uid=owner[0],
        gid=owner[1],
        action=action,
        current_sha256=sha256_hex(current) if current is not None else None,
    )


def _dir_stat(directory: Path) -> os.stat_result:
    try:
        return directory.stat()
    except FileNotFoundError:
        raise PreflightError(
            f"{directory}: the directory does not exist; check the server's setting that "
            "points there"
        ) from None


def canonical(path: str | Path) -> Path:
    """``path`` with its directory's real path (no symbolic link on the way); the name stays."""
    target = Path(path)
    return Path(os.path.realpath(target.parent)) / target.name


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def open_directory(directory: Path, *, exact: bool) -> int:
    """A descriptor of ``directory``; with ``exact``, reached from ``/`` through no symbolic
    link (``PreflightError`` naming the path otherwise)."""
    if not exact:
        return os.open(directory, _DIR_FLAGS)
    if not directory.is_absolute():
        raise PreflightError(
            f"{directory}: not an absolute path; pgtls writes no server file there"
        )
    fd = os.open("/", _DIR_FLAGS)
    try:
        for part in directory.parts[1:]:
            try:
                nxt = os.open(part, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise PreflightError(
                        f"{directory}: {part} on the way there is not a directory now (a "
                        "symbolic link appeared after the target was judged), so pgtls writes "
                        "nothing there; find out who changed it before running again"
                    ) from None
                raise
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: str | Path, *, exact: bool = False) -> tuple[bytes, os.stat_result] | None:
    """The bytes and status of the regular file at ``path`` (its last component not followed
    when it is a link), or None when there is none; a link or a special file there is
    refused with one sentence."""
    target = Path(path)
    try:
        dfd = open_directory(target.parent, exact=exact)
    except FileNotFoundError:
        return None
    try:
        try:
            fd = os.open(
                target.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd
            )
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise PreflightError(
                    f"{target}: a symbolic link; pgtls reads and writes no server file through "
                    "a link; replace the link by the file it leads to"
                ) from None
            raise
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise PreflightError(f"{target}: not a regular file; pgtls will not read it")
            return fh.read(), st
    finally:
        os.close(dfd)


def atomic_write(
    path: str | Path,
    data: bytes,
    *,
    mode: int,
    uid: int | None = None,
    gid: int | None = None,
    exact: bool = False,
) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a mix.

    The temporary file is created with ``mode`` (so a key is 0600 from its first byte) and
    handed to ``uid``/``gid`` before any byte is written. With ``exact`` the directory is
    reached through no symbolic link (see the module docstring).
    """
    target = Path(path)
    tmp = f".{target.name}.pgtls-tmp-{os.getpid()}"
    dfd = open_directory(target.parent, exact=exact)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dfd)
        old_umask = os.umask(0o077)
        try:
            fd = os.open(
                tmp,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                mode & 0o700,
                dir_fd=dfd,
            )
        finally:
            os.umask(old_umask)
        try:
            with os.fdopen(fd, "wb") as fh:
                if uid is not None and gid is not None and os.geteuid() == 0:
                    os.fchown(fh.fileno(), uid, gid)
                os.fchmod(fh.fileno(), mode)  # widen to the final mode only after chown
                fh.write(data)  # buffered: all of it, or an error
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target.name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise
        with contextlib.suppress(OSError):
            os.fsync(dfd)
    finally:
        os.close(dfd)


def remove(path: str | Path, *, exact: bool = False) -> None:
    """Remove the file at ``path`` (never what a link there leads to), durably."""
    target = Path(path)
    dfd = open_directory(target.parent, exact=exact)
    try:
        os.unlink(target.name, dir_fd=dfd)
        with contextlib.suppress(OSError):
            os.fsync(dfd)
    finally:
        os.close(dfd)


def require_space(directory: Path, need: int, *, what: str) -> None:
    """Raise :class:`PreflightError` unless the file system of ``directory`` has ``need``
    bytes free for this user (checked before a step's first write, so a full disk stops the
    change before it starts, not half-way)."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return  # no answer (an unusual file system): the writes report their own errors
    free = st.f_bavail * st.f_frsize
    if free < need:
        raise PreflightError(
            f"{directory}: {free // 1024} KiB free, and {what} needs at least "
            f"{-(-need // 1024)} KiB there; free some space and run again (nothing was written)"
        )


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (best effort where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def backup_copy(
    path: Path, stamp: str, *, directory: Path | None = None, exact: bool = False
) -> Path:
    """Copy ``path`` to ``NAME.pgtls-backup-<stamp>`` beside it (or in ``directory``), same
    owner and mode; with ``exact``, read as :func:`read_regular` reads a server file."""
    found = read_regular(path, exact=exact)
    if found is None:
        raise FileNotFoundError(errno.ENOENT, "no such file", str(path))
    data, st = found
    where = directory if directory is not None else path.parent
    backup = where / f"{path.name}.pgtls-backup-{stamp}"
    n = 1
    while backup.exists():
        n += 1
        backup = where / f"{path.name}.pgtls-backup-{stamp}.{n}"
    atomic_write(backup, data, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid)
    return backup


def apply_plan(plan: Sequence[PlannedFile], *, stamp: str | None = None) -> InstallResult:
    """Write every planned file, backing up what it replaces; all or nothing.

    When a write fails, the files already written are rolled back before the error is raised.
    """
    stamp = stamp or utc_stamp()
    done: list[Installed] = []
    try:
        for item in plan:
            if item.action == "unchanged":
                done.append(
                    Installed(
                        item.target, item.kind, "unchanged", item.sha256, item.current_sha256, None
                    )
                )
                continue
            backup = backup_copy(item.target, stamp) if item.target.exists() else None
            prev = item.current_sha256
            atomic_write(item.target, item.data, mode=item.mode, uid=item.uid, gid=item.gid)
            done.append(
                Installed(
                    item.target,
                    item.kind,
                    "replace" if backup else "create",
                    item.sha256,
                    prev,
                    backup,
                )
            )
    except OSError as exc:
        rollback(InstallResult(tuple(done)))
        raise PgtlsError(
            f"{exc.filename or 'a target file'}: could not be written ({exc.strerror}); "
            "nothing was changed"
        ) from exc
    return InstallResult(tuple(done))


def rollback(result: InstallResult | Iterable[Installed]) -> list[Path]:
    """Put back exactly what :func:`apply_plan` replaced (bytes, owner, mode), newest first."""
    items = result.installed if isinstance(result, InstallResult) else tuple(result)
    restored: list[Path] = []
    for item in reversed(items):
        if item.action == "unchanged":
            continue
        if item.backup is None:
            item.target.unlink(missing_ok=True)
        else:
            st = item.backup.stat()
            atomic_write(
                item.target,
                item.backup.read_bytes(),
                mode=stat.S_IMODE(st.st_mode),
                uid=st.st_uid,
                gid=st.st_gid,
            )
        restored.append(item.target)
    return restored


def save_journal(result: InstallResult, path: str | Path) -> None:
    """Keep what an install did next to the change's work files, for a later rollback."""
    Path(path).write_text(json.dumps(result.as_dicts(), indent=2) + "\n")


def load_journal(path: str | Path) -> InstallResult:
    items = json.loads(Path(path).read_text())
    return InstallResult(tuple(Installed.from_dict(i) for i in items))
