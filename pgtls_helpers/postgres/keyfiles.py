"""Writing a new private key and its CSR to disk: the only place key bytes become a file.

Kept out of :mod:`pgtls_helpers.pki`, which takes and returns values and never writes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import os
import secrets
from pathlib import Path

from pgtls_helpers.errors import InputError
from pgtls_helpers.pki.csr import CSR_FILE, KEY_FILE, build_csr, csr_pem
from pgtls_helpers.pki.keys import generate_key, serialize_key
from pgtls_helpers.pki.subject import Subject
from pgtls_helpers.postgres.files import fsync_dir

__all__ = ["write_key_and_csr", "write_private_key"]


def write_private_key(
    path: str | os.PathLike[str], data: bytes, *, overwrite: bool = False
) -> Path:
    """Write key bytes to ``path``, mode 0600 from the first byte, atomically.

    The bytes go to a temporary file in the same directory, created with ``O_EXCL`` and mode
    0600, are fsync-ed, and only then take the final name; a failure leaves nothing behind.

    Raises:
        InputError: ``path`` exists and ``overwrite`` is false, or the directory is missing.
    """
    target = Path(path)
    if not overwrite and target.exists():
        raise InputError(
            f"{target} already exists; refusing to replace a private key (use --force to "
            "replace it)."
        )
    if not target.parent.is_dir():
        raise InputError(f"{target.parent} is not a directory; create it first.")
    tmp = target.with_name(f".{target.name}.tmp-{secrets.token_hex(6)}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(tmp, flags, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, target)
        else:
            _link_no_clobber(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)
    return target


def write_key_and_csr(
    out_dir: str | os.PathLike[str],
    subject: Subject,
    key_type: str = "rsa4096",
    passphrase: bytes | None = None,
    overwrite: bool = False,
    challenge_password: bytes | None = None,
) -> tuple[Path, Path]:
    """Generate a key, build the CSR, and write ``server.key`` (0600) and ``server.csr``.

    ``out_dir`` is created with mode 0700 when missing. Existing files are refused unless
    ``overwrite``; then each is first renamed to ``NAME.bak-<UTC stamp>``. Nothing is written
    until the key and the CSR exist in memory; if writing the CSR fails, the new key is removed
    and the old files are put back.

    Returns:
        ``(key_path, csr_path)``.

    Raises:
        InputError: a file exists and ``overwrite`` is false, or an argument is unusable.
    """
    directory = Path(out_dir)
    key_path, csr_path = directory / KEY_FILE, directory / CSR_FILE
    if directory.exists() and not directory.is_dir():
        raise InputError(f"{directory} exists and is not a directory; choose another --out-dir.")
    existing = [p for p in (key_path, csr_path) if p.exists() or p.is_symlink()]
    if existing and not overwrite:
        raise InputError(
            f"{existing[0]} already exists; use --force to replace it (the old files are kept "
            "as NAME.bak-<UTC time>)."
        )

    key = generate_key(key_type)
    csr = build_csr(subject.validate(), key, challenge_password=challenge_password)
    key_bytes = serialize_key(key, passphrase)
    csr_bytes = csr_pem(csr)

    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    backups: list[tuple[Path, Path]] = []
    for path in existing:
        bak = _free_name(path.with_name(f"{path.name}.bak-{stamp}"))
        os.rename(path, bak)
        backups.append((path, bak))
    try:
        write_private_key(key_path, key_bytes)
        try:
            _write_public_file(csr_path, csr_bytes)
        except BaseException:
            key_path.unlink()
            raise
    except BaseException:
        for path, bak in backups:
            with contextlib.suppress(OSError):
                os.rename(bak, path)
        raise
    return key_path, csr_path


# --- internals -------------------------------------------------------------------------------


def _link_no_clobber(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except FileExistsError as exc:
        raise InputError(
            f"{dst} already exists; refusing to replace a private key (use --force to replace it)."
        ) from exc
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        # Filesystems without hard links: the existence check above is the best we have.
        if dst.exists():
            raise InputError(
                f"{dst} already exists; refusing to replace a private key (use --force)."
            ) from exc
        os.replace(src, dst)
        return
    os.unlink(src)


def _free_name(path: Path) -> Path:
    candidate, n = path, 1
    while candidate.exists() or candidate.is_symlink():
        n += 1
        candidate = path.with_name(f"{path.name}.{n}")
    return candidate


def _write_public_file(path: Path, data: bytes) -> None:
    """Write a non-secret file atomically (temporary name, fsync, rename), mode 0644."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
