"""One change at a time per server: a lock file in the data directory and an advisory lock.

The lock file (``pgtls.lock``, owned by the server's user, mode 0640) is visible to anyone who
looks at the data directory while a change runs and names the change that holds it; ``flock``
makes it die with its process, so a killed run never leaves a stale lock, and the holder removes
the file when it is done, so a finished change leaves the data directory as it found it.
``pg_advisory_lock`` on the server covers a run on another host against the same server. Both
are held for steps 3 and 4 and for a rollback.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pgtls_helpers.errors import PreflightError
from pgtls_helpers.postgres.server import Server

__all__ = ["ADVISORY_KEY", "LOCK_NAME", "change_lock", "lock_wait"]

LOCK_NAME = "pgtls.lock"
ADVISORY_KEY = 0x67746C73  # "gtls": one key for every pgtls change on a server


def lock_wait() -> float:
    """Seconds a run waits for another change to finish (``PGTLS_LOCK_WAIT``, default 30)."""
    try:
        return max(0.0, float(os.environ.get("PGTLS_LOCK_WAIT", "30")))
    except ValueError:
        return 30.0


def _holder(fd: int) -> str:
    try:
        raw = os.pread(fd, 4096, 0)
        info = json.loads(raw or b"{}")
        return f"change {info.get('change_id')} (pid {info.get('pid')} on {info.get('host')})"
    except (OSError, ValueError):
        return "another change"


@contextmanager
def change_lock(
    data_directory: Path,
    owner: tuple[int, int] | None,
    server: Server | None,
    change_id: str,
    *,
    wait: float | None = None,
) -> Iterator[None]:
    """Hold the server's change lock for the ``with`` block, or raise :class:`PreflightError`
    naming the change that holds it after waiting ``wait`` seconds. With ``server`` None (it
    is down) only the lock file is taken."""
    wait = lock_wait() if wait is None else wait
    path = data_directory / LOCK_NAME
    deadline = time.monotonic() + wait
    fd = _take_file_lock(path, owner, deadline)
    try:
        info = {
            "change_id": change_id,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(fd)
        if server is not None and not server.advisory_lock(
            ADVISORY_KEY, timeout=max(deadline - time.monotonic(), 0.0)
        ):
            holder = server.advisory_holder(ADVISORY_KEY) or "another session"
            raise PreflightError(
                f"{server.conninfo.get('host')}:{server.conninfo.get('port')}: {holder} holds "
                "the pgtls change lock on this server; wait for that change to finish and run "
                "again"
            )
        try:
            yield
        finally:
            if server is not None:
                server.advisory_unlock(ADVISORY_KEY)
    finally:
        with contextlib.suppress(OSError):
            if _same_file(path, fd):
                os.unlink(path)  # still holding the lock: nobody else can have taken it
        os.close(fd)


def _take_file_lock(path: Path, owner: tuple[int, int] | None, deadline: float) -> int:
    """An open, ``flock``-ed descriptor of ``path``. A lock taken on a file that its last
    holder had already unlinked is dropped and taken again on the file now at ``path``."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o640)
        try:
            st = os.fstat(fd)
            # the server's OS user owns the folder and could leave a hard link to a root
            # file here: only a lone regular file is ever given to the server's owner
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                raise PreflightError(
                    f"{path}: not a plain file of its own (a link or a device); remove it and "
                    "run again"
                )
            if owner and os.geteuid() == 0 and (st.st_uid, st.st_gid) != owner:
                os.fchown(fd, *owner)
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise PreflightError(
                            f"{path}: {_holder(fd)} is changing this server now; wait for it "
                            "to finish (or roll it back) and run again"
                        ) from None
                    time.sleep(0.2)
        except BaseException:
            os.close(fd)
            raise
        if _same_file(path, fd):
            return fd
        os.close(fd)  # the holder removed it as we waited: lock the current one


def _same_file(path: Path, fd: int) -> bool:
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)
