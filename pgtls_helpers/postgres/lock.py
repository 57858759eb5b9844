"""One change at a time per server: a lock file in the data directory and an advisory lock.

The lock file (``pgtls.lock``, owned by the server's user, mode 0640) is visible to anyone who
looks at the data directory while a change runs and names the change that holds it; ``flock``
makes it die with its process, so a killed run never leaves a stale lock, and the holder removes
the file when it is done, so a finished change leaves the data directory as it found it.
``pg_advisory_lock`` on the server covers a run on another host against the same server.

A headless run holds both from before step 3 until its record is sealed, and its notebooks run
in a kernel (another process) whose steps take the lock again: the runner puts a random token in
the kernel's environment (``PGTLS_LOCK_TOKEN``) and the lock file carries the token's SHA-256,
so a step finds the lock held *for its own run* and goes on under it; anyone else waits. A
rollback and ``pgtls trust`` take the same lock; their dry runs wait for it and refuse the same
way, but only look (``take=False``): no lock file is created or written.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import pwd
import socket
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal, overload

from pgtls_helpers.errors import PreflightError
from pgtls_helpers.postgres.server import Server

__all__ = ["ADVISORY_KEY", "LOCK_NAME", "TOKEN_ENV", "change_lock", "lock_wait"]

LOCK_NAME = "pgtls.lock"
ADVISORY_KEY = 0x67746C73  # "gtls": one key for every pgtls change on a server
TOKEN_ENV = "PGTLS_LOCK_TOKEN"  # set by the runner for its kernel: "this run holds the lock"


def lock_wait() -> float:
    """Seconds a run waits for another change to finish (``PGTLS_LOCK_WAIT``, default 30)."""
    try:
        return max(0.0, float(os.environ.get("PGTLS_LOCK_WAIT", "30")))
    except ValueError:
        return 30.0


def _info(fd: int) -> dict[str, object]:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _holder(fd: int) -> str:
    info = _info(fd)
    if not info.get("change_id"):
        return "another change"
    return (
        f"change {info.get('change_id')} (pid {info.get('pid')} of {info.get('user')} on "
        f"{info.get('host')}, since {info.get('since')})"
    )


def _token_hash() -> str | None:
    token = os.environ.get(TOKEN_ENV)
    return hashlib.sha256(token.encode()).hexdigest() if token else None


def _held_for_this_run(path: Path) -> bool:
    """True when the lock at ``path`` is held now by the run this process belongs to."""
    mine = _token_hash()
    if mine is None:
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # held: by our run only if it wrote our token's hash
            return _info(fd).get("token_sha256") == mine
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


@contextmanager
def change_lock(
    data_directory: Path,
    owner: tuple[int, int] | None,
    server: Server | None,
    change_id: str,
    *,
    wait: float | None = None,
    take: bool = True,
) -> Iterator[None]:
    """Hold the server's change lock for the ``with`` block, or raise :class:`PreflightError`
    naming the change that holds it after waiting ``wait`` seconds. With ``server`` None (it
    is down) only the lock file is taken. Within a run that already holds it (see the module
    docstring) the block runs under the run's lock.

    With ``take`` False (a dry run) it waits and refuses exactly so, but holds only a shared
    ``flock`` on a lock file that is already there, and the advisory lock: nothing is created
    or written in the data directory, and a change started meanwhile waits for the block.
    """
    wait = lock_wait() if wait is None else wait
    path = data_directory / LOCK_NAME
    if _held_for_this_run(path):
        yield
        return
    deadline = time.monotonic() + wait
    if not take:
        with _looking(path, server, deadline):
            yield
        return
    fd = _take_file_lock(path, owner, deadline)
    try:
        info: dict[str, object] = {
            "change_id": change_id,
            "pid": os.getpid(),
            "user": _user(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if token := _token_hash():
            info["token_sha256"] = token
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(fd)
        with _advisory(server, deadline):
            yield
    finally:
        with contextlib.suppress(OSError):
            if _same_file(path, fd):
                os.unlink(path)  # still holding the lock: nobody else can have taken it
        os.close(fd)


@contextmanager
def _looking(path: Path, server: Server | None, deadline: float) -> Iterator[None]:
    """A dry run's hold: a shared ``flock`` on the lock file if one is there, and the
    advisory lock; the same waits and the same refusals as :func:`change_lock`."""
    fd = _take_file_lock(path, None, deadline, create=False)
    try:
        with _advisory(server, deadline):
            yield
    finally:
        if fd is not None:
            os.close(fd)


@contextmanager
def _advisory(server: Server | None, deadline: float) -> Iterator[None]:
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


@overload
def _take_file_lock(
    path: Path, owner: tuple[int, int] | None, deadline: float, *, create: Literal[True] = True
) -> int: ...
@overload
def _take_file_lock(
    path: Path, owner: tuple[int, int] | None, deadline: float, *, create: bool
) -> int | None: ...
def _take_file_lock(
    path: Path, owner: tuple[int, int] | None, deadline: float, *, create: bool = True
) -> int | None:
    """An open, ``flock``-ed descriptor of ``path``. A lock taken on a file that its last
    holder had already unlinked is dropped and taken again on the file now at ``path``.

    With ``create`` False the lock is shared and only taken on a file that is there (None when
    there is none: no change holds the lock); nothing is created, owned or written."""
    while True:
        try:
            if create:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o640)
            else:  # non-blocking: a FIFO left here is refused below, not waited on
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            if create:
                raise
            return None
        try:
            st = os.fstat(fd)
            # the server's OS user owns the folder and could leave a hard link to a root
            # file here: only a lone regular file is ever given to the server's owner
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                raise PreflightError(
                    f"{path}: not a plain file of its own (a link or a device); remove it and "
                    "run again"
                )
            if create and owner and os.geteuid() == 0 and (st.st_uid, st.st_gid) != owner:
                os.fchown(fd, *owner)
            while True:
                try:
                    fcntl.flock(fd, (fcntl.LOCK_EX if create else fcntl.LOCK_SH) | fcntl.LOCK_NB)
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
