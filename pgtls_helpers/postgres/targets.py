"""Where the tool may write a server file: one policy for apply, undo and rollback alike.

The paths of the server's files come from the server (``ssl_cert_file``, ``ssl_key_file``,
``hba_file``), and anyone who can ``ALTER SYSTEM`` (a superuser role, the server's OS user) can
point them anywhere. Running as root, the tool must not let that choose what it overwrites. A
server file may be written only

- inside the data directory,
- in the directory of ``config_file`` or ``hba_file`` (Debian keeps them in
  ``/etc/postgresql/V/NAME``), or
- at a path the parameters list explicitly (``server_file_targets``, shown in the plan);

and an existing target must be a regular file reached without a symlink in its last component,
owned by the server's OS user (or by root with the server's group, as Debian keeps keys).
Directories are compared by their real path, so a symlinked folder inside the data directory
that leads elsewhere is judged by where it leads.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TargetPolicy"]


def _real(path: str | Path) -> Path:
    return Path(os.path.realpath(path))


@dataclass(frozen=True)
class TargetPolicy:
    """The folders and files a change may write as the server's files."""

    data_directory: Path
    config_dirs: tuple[Path, ...]
    listed: tuple[Path, ...]
    server_uid: int
    server_gid: int

    @classmethod
    def of(
        cls,
        *,
        data_directory: str | Path,
        config_files: Iterable[str | Path],
        listed: Iterable[str | Path],
        owner: tuple[int, int],
    ) -> TargetPolicy:
        """The policy for a server whose data directory, configuration files and OS user
        (``owner``: uid, gid) are given, plus the paths the parameters list."""
        return cls(
            data_directory=_real(data_directory),
            config_dirs=tuple(dict.fromkeys(_real(Path(f).parent) for f in config_files)),
            listed=tuple(_real(Path(p).parent) / Path(p).name for p in listed),
            server_uid=owner[0],
            server_gid=owner[1],
        )

    def _allowed_place(self, path: Path) -> bool:
        where = _real(path.parent) / path.name
        if where in self.listed:
            return True
        folder = where.parent
        return (
            folder == self.data_directory
            or self.data_directory in folder.parents
            or folder in self.config_dirs
        )

    def problem(self, path: str | Path, *, setting: str) -> str | None:
        """Why ``path`` (named by ``setting``) may not be written, as one sentence; None if
        it may."""
        target = Path(path)
        fix = (
            f"point {setting} into the data directory ({self.data_directory}), or list "
            f"{target} in server_file_targets"
        )
        if not target.is_absolute():
            return f"{setting} is {target}, not an absolute path; {fix}"
        if not self._allowed_place(target):
            return (
                f"{setting} points to {target}, outside the data directory and the "
                f"configuration directory, so pgtls will not write there; {fix}"
            )
        try:
            st = os.lstat(target)
        except FileNotFoundError:
            return None
        except OSError as exc:
            return f"{setting} points to {target}, which cannot be examined ({exc.strerror})"
        if stat.S_ISLNK(st.st_mode):
            return (
                f"{setting} points to {target}, a symbolic link; pgtls writes no server file "
                f"through a link; {fix}, or replace the link by the file it leads to"
            )
        if not stat.S_ISREG(st.st_mode):
            return f"{setting} points to {target}, which is not a regular file; {fix}"
        if st.st_uid == self.server_uid or (st.st_uid == 0 and st.st_gid == self.server_gid):
            return None
        return (
            f"{setting} points to {target}, owned by uid {st.st_uid} (neither the server's OS "
            "user nor root with the server's group), so pgtls will not replace it; give the "
            f"file to the server's user, or {fix}"
        )
