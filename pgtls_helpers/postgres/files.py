"""Atomic installs with backups and exact rollback.

Every write goes to a temporary file in the target's directory, created with its final mode
(0600 for a key from the first byte), owned as planned, fsynced, then renamed over the target.
Whatever is replaced is first copied to ``NAME.pgtls-backup-<UTC stamp>`` beside it, with the same
owner and mode, and :func:`rollback` puts those bytes, owner and mode back.
"""

from __future__ import annotations

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
    "fsync_dir",
    "key_file_problem",
    "plan_file",
    "rollback",
    "sha256_hex",
    "utc_stamp",
]

Kind = Literal["key", "certificate", "hba", "root.crt", "auto.conf", "other"]


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


def atomic_write(
    path: str | Path, data: bytes, *, mode: int, uid: int | None = None, gid: int | None = None
) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a mix.

    The temporary file is created with ``mode`` (so a key is 0600 from its first byte) and
    handed to ``uid``/``gid`` before any byte is written.
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.pgtls-tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    old_umask = os.umask(0o077)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode & 0o700)
    finally:
        os.umask(old_umask)
    try:
        with os.fdopen(fd, "wb") as fh:
            if uid is not None and gid is not None and os.geteuid() == 0:
                os.fchown(fh.fileno(), uid, gid)
            os.fchmod(fh.fileno(), mode)  # widen to the final mode only after chown
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


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


def backup_copy(path: Path, stamp: str, *, directory: Path | None = None) -> Path:
    """Copy ``path`` to ``NAME.pgtls-backup-<stamp>`` beside it (or in ``directory``), same
    owner and mode."""
    st = path.stat()
    where = directory if directory is not None else path.parent
    backup = where / f"{path.name}.pgtls-backup-{stamp}"
    n = 1
    while backup.exists():
        n += 1
        backup = where / f"{path.name}.pgtls-backup-{stamp}.{n}"
    atomic_write(
        backup, path.read_bytes(), mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid
    )
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
