"""The write-ahead journal of one change: every change to the server is recorded before it is made.

``work/<change_id>/journal.jsonl`` holds one JSON object a line, each written and fsynced before
the next action: ``begin`` (a step starts; the first one also records how the server was
before), ``file`` (a file is about to be written: its backup and hash before, the hash planned),
``done`` (that write finished, with the hash it left), ``reload`` (a reload is about to be asked
for) and ``end``. A rollback reads whatever the journal holds, whether the step finished or not:
for each file the *first* record names the original, so a rerun after an interruption appends to
the same journal instead of taking the half-changed state for the original. ``ALTER SYSTEM`` is
journaled as a change of ``postgresql.auto.conf``, so it can be restored byte for byte with the
server down.

Backups go to ``work/<change_id>/backups/`` (0700), never into the data directory, so a
retired private key does not ride along in every base backup.

Tests can stop the process at a named point: ``PGTLS_FAULT_AFTER=<point>`` makes
:meth:`Journal.point` kill its own process group with SIGKILL (or, with
``PGTLS_FAULT_SIGNAL=INT``, interrupt itself as Ctrl-C would; with ``STOP``, write its pid to
the file ``PGTLS_FAULT_PAUSE_FILE`` names and stop itself until a SIGCONT, so a test can act
while a change is half-way); the code path is the real one.

Why one module of some 680 lines: it is one file format (as CONVENTIONS asks of our formats):
the entries, their writing with fsync, their reading back after a crash, and what a rollback
derives from them belong to the same format and change together.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import stat
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pgtls_helpers.errors import PgtlsError
from pgtls_helpers.postgres import clients, files
from pgtls_helpers.runbook.workdir import WorkDir

__all__ = [
    "FileChange",
    "Journal",
    "before_state",
    "file_changes",
    "last_sealed",
    "read_entries",
    "restore_files",
    "seal",
]

Entry = dict[str, object]

# files in a client OS user's ~/.postgresql: read and written as that user's, never by path
CLIENT_KINDS = ("root.crt", "client.crt", "client.key")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def fault_point(name: str) -> None:
    """Stop here when a test asked for it (``PGTLS_FAULT_AFTER``); otherwise nothing.

    SIGKILL goes to this process's group and, with ``PGTLS_FAULT_KILL_PARENT=1``, to the
    parent's group too (a notebook kernel runs in a session of its own, apart from the runner
    that started it): runner and kernel die together, as when the machine's session is lost.
    """
    wanted = os.environ.get("PGTLS_FAULT_AFTER")
    if not wanted or wanted != name:
        return
    how = os.environ.get("PGTLS_FAULT_SIGNAL", "KILL").upper()
    if how == "INT":
        os.kill(os.getpid(), signal.SIGINT)
        return
    if how == "STOP":
        marker = os.environ.get("PGTLS_FAULT_PAUSE_FILE")
        if marker:
            Path(marker).write_text(f"{os.getpid()}\n")
        os.kill(os.getpid(), signal.SIGSTOP)
        return
    if how == "TERM-PARENT":  # the runner is told to stop; this kernel then dies with it
        os.kill(os.getppid(), signal.SIGTERM)
        time.sleep(1.0)
    if os.environ.get("PGTLS_FAULT_KILL_PARENT") == "1":
        try:
            parent_group = os.getpgid(os.getppid())
            if parent_group != os.getpgrp():
                os.killpg(parent_group, signal.SIGKILL)
        except OSError:
            pass
    os.killpg(os.getpgrp(), signal.SIGKILL)


JOURNAL_RESERVE = 1 << 20  # bytes the journal's entries of one step may take, at most


class Journal:
    """Append-only, fsynced records of one change; see the module docstring."""

    def __init__(self, work: WorkDir, step: str):
        self.work = work
        self.step = step
        self.path = work.journal
        self._seq = len(read_entries(self.path))

    @classmethod
    def begin(
        cls,
        work: WorkDir,
        step: str,
        before: Mapping[str, object],
        *,
        backing_up: Sequence[Path] = (),
    ) -> Journal:
        """Open (or continue) the change's journal and record that ``step`` starts.

        The work directory must have room for the journal and a backup of each file in
        ``backing_up`` first: a full disk stops the step before its first write, and the undo
        never needs space there (see :func:`seal` and :func:`restore_files`).
        """
        work.create()
        sizes = 0
        for path in backing_up:
            with contextlib.suppress(OSError):
                sizes += os.lstat(path).st_size
        files.require_space(
            work.path, JOURNAL_RESERVE + 2 * sizes, what=f"the {step} step's journal and backups"
        )
        journal = cls(work, step)
        journal.record("begin", step=step, pid=os.getpid(), before=dict(before))
        return journal

    def record(self, op: str, **fields: object) -> int:
        """Append one entry and make it durable before returning its sequence number."""
        seq = self._seq
        entry = {"seq": seq, "op": op, "at": _now(), **fields}
        new = not self.path.exists()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            try:
                data = memoryview((json.dumps(entry, default=str) + "\n").encode())
                while data:  # a short write (a full disk, a signal) is finished or raises
                    data = data[os.write(fd, data) :]
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise PgtlsError(
                f"{self.path}: the journal could not be written in the {self.step} step "
                f"({exc.strerror}); free space or fix the work directory, then roll back"
            ) from exc
        if new:
            files.fsync_dir(self.path.parent)
        self._seq += 1
        return seq

    def point(self, name: str) -> None:
        fault_point(f"{self.step}:{name}")

    def _backup(self, target: Path, *, client_uid: int | None = None) -> Path | None:
        directory = self.work.backups
        if client_uid is not None:
            # a client's file: read without following links, kept 0600 here
            data = clients.read_client_file(target, client_uid)
            if data is None:
                return None
            directory.mkdir(mode=0o700, exist_ok=True)
            backup = directory / f"{target.name}.pgtls-backup-{files.utc_stamp()}"
            n = 1
            while backup.exists():
                n += 1
                backup = directory / f"{target.name}.pgtls-backup-{files.utc_stamp()}.{n}"
            # the backup keeps the file's mode, so rollback gives a 0600 file back as 0600
            try:
                mode = stat.S_IMODE(os.lstat(target).st_mode) & 0o777
            except OSError:
                mode = 0o644
            files.atomic_write(backup, data, mode=mode, uid=client_uid, gid=target_gid(target))
            return backup
        if not os.path.lexists(target):
            return None
        directory.mkdir(mode=0o700, exist_ok=True)
        return files.backup_copy(target, files.utc_stamp(), directory=directory, exact=True)

    @staticmethod
    def unchanged(planned: files.PlannedFile) -> files.Installed:
        return files.Installed(
            planned.target, planned.kind, "unchanged", planned.sha256, planned.current_sha256, None
        )

    def write_file(self, planned: files.PlannedFile) -> files.Installed:
        """Back up, journal, write, journal: one file of the change."""
        if planned.action == "unchanged":
            return self.unchanged(planned)
        client = planned.kind in CLIENT_KINDS
        try:
            backup = self._backup(planned.target, client_uid=planned.uid if client else None)
        except OSError as exc:
            raise PgtlsError(
                f"{self.work.backups}: the backup of {planned.target} could not be written in "
                f"the {self.step} step ({exc.strerror}); what this change wrote so far is put "
                "back"
            ) from exc
        seq = self.record(
            "file",
            step=self.step,
            target=str(planned.target),
            kind=planned.kind,
            backup=str(backup) if backup else None,
            previous_sha256=planned.current_sha256,
            planned_sha256=planned.sha256,
            uid=planned.uid,
            gid=planned.gid,
        )
        self.point(f"{planned.kind}:intent")
        try:
            self._write(planned, client=client)
        except OSError as exc:
            raise PgtlsError(
                f"{planned.target}: could not be written in the {self.step} step "
                f"({exc.strerror}); what this change wrote so far is put back"
            ) from exc
        self.record("done", ref=seq, sha256=planned.sha256)
        self.point(planned.kind)
        return files.Installed(
            planned.target,
            planned.kind,
            "replace" if backup else "create",
            planned.sha256,
            planned.current_sha256,
            backup,
        )

    def write_client_swap(self, plan: Sequence[files.PlannedFile]) -> list[files.Installed]:
        """One client's files (``postgresql.crt`` first, then its key) replaced together:
        each backed up and journaled, all written under temporary names, then renamed back to
        back (:func:`clients.write_client_files`), so a connecting client never meets a
        certificate with a key that is not its own for longer than between two renames."""
        changing = [p for p in plan if p.action != "unchanged"]
        if not changing:
            return [self.unchanged(p) for p in plan]
        first = changing[0]
        intents: dict[Path, tuple[int, Path | None]] = {}
        for planned in changing:
            try:
                backup = self._backup(planned.target, client_uid=planned.uid)
            except OSError as exc:
                raise PgtlsError(
                    f"{self.work.backups}: the backup of {planned.target} could not be written "
                    f"in the {self.step} step ({exc.strerror}); what this change wrote so far "
                    "is put back"
                ) from exc
            seq = self.record(
                "file",
                step=self.step,
                target=str(planned.target),
                kind=planned.kind,
                backup=str(backup) if backup else None,
                previous_sha256=planned.current_sha256,
                planned_sha256=planned.sha256,
                uid=planned.uid,
                gid=planned.gid,
            )
            intents[planned.target] = (seq, backup)
            self.point(f"{planned.kind}:intent")
        try:
            clients.write_client_files(
                [(p.target, p.data, p.mode) for p in changing], uid=first.uid, gid=first.gid
            )
        except OSError as exc:
            raise PgtlsError(
                f"{first.target.parent}: the client files could not be written in the "
                f"{self.step} step ({exc.strerror}); what this change wrote so far is put back"
            ) from exc
        out = []
        for planned in plan:
            if planned.action == "unchanged":
                out.append(self.unchanged(planned))
                continue
            seq, backup = intents[planned.target]
            self.record("done", ref=seq, sha256=planned.sha256)
            self.point(planned.kind)
            out.append(
                files.Installed(
                    planned.target,
                    planned.kind,
                    "replace" if backup else "create",
                    planned.sha256,
                    planned.current_sha256,
                    backup,
                )
            )
        return out

    @staticmethod
    def _write(planned: files.PlannedFile, *, client: bool) -> None:
        if client:
            clients.write_client_file(
                planned.target, planned.data, mode=planned.mode, uid=planned.uid, gid=planned.gid
            )
        else:
            files.atomic_write(
                planned.target,
                planned.data,
                mode=planned.mode,
                uid=planned.uid,
                gid=planned.gid,
                exact=True,
            )

    def client_dir(self, user: clients.ClientUser) -> None:
        """Make the user's ``~/.postgresql`` when it is missing, journaled first, so a
        rollback removes it again once it is empty."""
        directory = user.root_crt.parent
        if not os.path.lexists(directory):
            self.record("dir", step=self.step, target=str(directory), uid=user.uid)
        clients.prepare_client_dir(user)

    def write_files(self, plan: Sequence[files.PlannedFile]) -> files.InstallResult:
        return files.InstallResult(tuple(self.write_file(p) for p in plan))

    def change_auto_conf(
        self,
        auto_conf: Path,
        settings: Mapping[str, str],
        previous: Mapping[str, str | None],
        alter: Callable[[], None],
    ) -> files.Installed | None:
        """Journal an ``ALTER SYSTEM`` as a change of ``postgresql.auto.conf``, then run it.

        None when the file is not readable from here (then only the settings' old values are
        journaled, and a rollback needs the server up to reset them).
        """
        auto_conf = files.canonical(auto_conf)
        try:
            found = files.read_regular(auto_conf, exact=True)
        except PermissionError:
            found = None
        before = found[0] if found is not None else None
        backup = self._backup(auto_conf) if before is not None else None
        seq = self.record(
            "file",
            step=self.step,
            target=str(auto_conf),
            kind="auto.conf",
            backup=str(backup) if backup else None,
            previous_sha256=files.sha256_hex(before) if before is not None else None,
            planned_sha256=None,
            readable=before is not None,
            settings={name: [previous.get(name), value] for name, value in settings.items()},
        )
        self.point("auto.conf:intent")
        alter()
        if before is None:
            self.record("done", ref=seq, sha256=None)
            self.point("auto.conf")
            return None
        after = auto_conf.read_bytes()
        self.record("done", ref=seq, sha256=files.sha256_hex(after))
        self.point("auto.conf")
        return files.Installed(
            auto_conf,
            "other",
            "replace",
            files.sha256_hex(after),
            files.sha256_hex(before),
            backup,
        )

    def reload(self, why: str, do_reload: Callable[[], None]) -> None:
        self.record("reload", step=self.step, why=why)
        do_reload()
        self.point(f"reload-{why}")

    def end(self, status: str) -> None:
        self.record("end", step=self.step, status=status)


def read_entries(path: Path) -> list[Entry]:
    """Every complete entry; a torn last line (the process died mid-write) is ignored."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    entries: list[Entry] = []
    for line in raw.splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            entries.append(value)
    return entries


@dataclass(frozen=True)
class FileChange:
    """One file the change touched: the original (from its first record) and what it left."""

    target: Path
    kind: str
    backup: Path | None
    existed: bool
    previous_sha256: str | None
    left_sha256: tuple[str, ...]  # hashes the change may have left (done, or planned if cut)
    readable: bool
    settings: dict[str, list[str | None]]
    uid: int | None = None
    gid: int | None = None

    def current_sha256(self) -> str | None:
        if self.kind in CLIENT_KINDS and self.uid is not None:
            data = clients.read_client_file(self.target, self.uid)
            return files.sha256_hex(data) if data is not None else None
        try:
            return files.sha256_hex(self.target.read_bytes())
        except FileNotFoundError:
            return None


def file_changes(entries: Sequence[Entry]) -> list[FileChange]:
    """Per target, in the order first touched: the original and the hashes it may carry now."""
    first: dict[str, Entry] = {}
    left: dict[str, list[str]] = {}
    by_seq = {int(str(e["seq"])): e for e in entries if e.get("op") == "file"}
    settings: dict[str, dict[str, list[str | None]]] = {}
    for e in entries:
        op = e.get("op")
        if op == "file":
            target = str(e["target"])
            first.setdefault(target, e)
            planned = e.get("planned_sha256")
            left.setdefault(target, [])
            if planned:
                left[target].append(str(planned))
            if e.get("kind") == "auto.conf":
                raw = e.get("settings") or {}
                merged = settings.setdefault(target, {})
                if isinstance(raw, dict):
                    for name, pair in raw.items():
                        old = merged.get(name)
                        merged[name] = [old[0] if old else pair[0], pair[1]]
        elif op == "done":
            ref = by_seq.get(int(str(e["ref"])))
            if ref is not None and e.get("sha256"):
                left[str(ref["target"])].append(str(e["sha256"]))
    out = []
    for target, e in first.items():
        backup = e.get("backup")
        out.append(
            FileChange(
                target=Path(target),
                kind=str(e["kind"]),
                backup=Path(str(backup)) if backup else None,
                existed=e.get("previous_sha256") is not None or bool(backup),
                previous_sha256=str(e["previous_sha256"]) if e.get("previous_sha256") else None,
                left_sha256=tuple(dict.fromkeys(left[target])),
                readable=bool(e.get("readable", True)),
                settings=settings.get(target, {}),
                uid=int(str(e["uid"])) if e.get("uid") is not None else None,
                gid=int(str(e["gid"])) if e.get("gid") is not None else None,
            )
        )
    return out


def before_state(entries: Sequence[Entry]) -> dict[str, object]:
    """How the server was before the change, as the first ``begin`` that saw the server
    recorded it (a clients' step run where the server is out of reach records none), else
    the first ``begin``'s."""
    begins: list[dict[str, object]] = []
    for e in entries:
        value = e.get("before")
        if e.get("op") == "begin" and isinstance(value, dict):
            begins.append({str(k): v for k, v in value.items()})
    saw_server = [b for b in begins if "data_directory" in b]
    return (saw_server or begins or [{}])[0]


TRUST_STEP = "trust"  # the one step of a client-trust change (pgtls trust)


def is_client_trust(entries: Sequence[Entry]) -> bool:
    """True for the journal of a client-trust change: clients' roots only, no server file."""
    begins = [e for e in entries if e.get("op") == "begin"]
    return bool(begins) and all(e.get("step") == TRUST_STEP for e in begins)


def unfinished_steps(entries: Sequence[Entry]) -> list[str]:
    """Steps whose last ``begin`` has no ``end`` after it (that run was stopped)."""
    open_steps: dict[str, bool] = {}
    for e in entries:
        if e.get("op") == "begin":
            open_steps[str(e["step"])] = True
        elif e.get("op") == "end":
            open_steps[str(e["step"])] = False
    return [step for step, still_open in open_steps.items() if still_open]


@dataclass(frozen=True)
class Restored:
    """What a restore did to one file."""

    target: Path
    action: Literal[
        "restored",
        "removed (created by the change)",
        "already as before",
        "not kept (no space in the work directory)",
    ]


CHANGED_BACK = ("restored", "removed (created by the change)")  # what a rollback did to a file


def restore_files(changes: Sequence[FileChange], *, work_key: Path) -> list[Restored]:
    """Put every file back as it was before the change, newest first; no server needed.

    A private key the change installed goes back to ``work_key`` first (when none is there),
    so the change can be redone without a new CSR and the key exists in one place.
    """
    done: list[Restored] = []
    # a client's certificate and key go back together, certificate first, as c3 wrote them
    # (see Journal.write_client_swap), so a client connecting meanwhile meets a matching pair
    pairs: dict[tuple[Path, int], list[FileChange]] = {}
    for change in changes:
        if change.kind in ("client.crt", "client.key") and change.backup and change.uid is not None:
            pairs.setdefault((change.target.parent, change.uid), []).append(change)
    swapped: set[Path] = set()
    for change in reversed(changes):
        if change.target in swapped:
            continue
        group = pairs.get((change.target.parent, -1 if change.uid is None else change.uid), [])
        if len(group) > 1 and change in group:
            ordered = sorted(group, key=lambda c: (c.kind != "client.crt", c.target.name))
            backups = [c.backup for c in ordered if c.backup is not None]
            clients.write_client_files(
                [
                    (c.target, b.read_bytes(), stat.S_IMODE(b.stat().st_mode))
                    for c, b in zip(ordered, backups, strict=True)
                ],
                uid=group[0].uid or 0,
                gid=group[0].gid if group[0].gid is not None else backups[0].stat().st_gid,
            )
            for c in ordered:
                done.append(Restored(c.target, "restored"))
                swapped.add(c.target)
            continue
        if change.kind == "auto.conf" and not change.readable:
            continue  # only ALTER SYSTEM can undo it (see rollback)
        current = change.current_sha256()
        if change.kind == "key" and current is not None and current != change.previous_sha256:
            if not work_key.exists():
                from pgtls_helpers.postgres import keyfiles

                try:
                    keyfiles.write_private_key(work_key, change.target.read_bytes())
                except OSError:  # the work disk is full: the undo goes on without the copy
                    done.append(Restored(work_key, "not kept (no space in the work directory)"))
        client_uid = change.uid if change.kind in CLIENT_KINDS else None
        if change.backup is None:
            if current is None:
                done.append(Restored(change.target, "already as before"))
                continue
            if client_uid is not None:
                clients.remove_client_file(change.target, client_uid)
            else:
                files.remove(change.target, exact=True)
            done.append(Restored(change.target, "removed (created by the change)"))
            continue
        if client_uid is not None:
            clients.write_client_file(
                change.target,
                change.backup.read_bytes(),
                mode=stat.S_IMODE(change.backup.stat().st_mode),
                uid=client_uid,
                gid=change.gid if change.gid is not None else change.backup.stat().st_gid,
            )
            done.append(Restored(change.target, "restored"))
            continue
        if current == change.previous_sha256 and _same_owner_mode(change.target, change.backup):
            done.append(Restored(change.target, "already as before"))
            continue
        st = change.backup.stat()
        files.atomic_write(
            change.target,
            change.backup.read_bytes(),
            mode=stat.S_IMODE(st.st_mode),
            uid=st.st_uid,
            gid=st.st_gid,
            exact=True,
        )
        done.append(Restored(change.target, "restored"))
    return done


def created_dirs(entries: Sequence[Entry]) -> list[tuple[Path, int]]:
    """The clients' ``~/.postgresql`` directories the change made, with their users' uids."""
    out: dict[str, int] = {}
    for e in entries:
        if e.get("op") == "dir" and e.get("uid") is not None:
            out.setdefault(str(e["target"]), int(str(e["uid"])))
    return [(Path(t), uid) for t, uid in out.items()]


def remove_created_dirs(entries: Sequence[Entry]) -> list[Restored]:
    """Remove each ``~/.postgresql`` the change made, when it is empty again and still a
    directory of that user's (``rmdir`` never follows a link, and fails on a full one)."""
    done: list[Restored] = []
    for directory, uid in reversed(created_dirs(entries)):
        try:
            st = os.lstat(directory)
        except FileNotFoundError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid:
            continue
        try:
            os.rmdir(directory)
        except OSError:  # the user keeps something there now: it stays
            continue
        files.fsync_dir(directory.parent)
        done.append(Restored(directory, "removed (created by the change)"))
    return done


def target_gid(target: Path) -> int:
    try:
        return target.parent.stat().st_gid
    except OSError:
        return os.getegid()


def _same_owner_mode(a: Path, b: Path) -> bool:
    sa, sb = a.stat(), b.stat()
    return (sa.st_uid, sa.st_gid, sa.st_mode) == (sb.st_uid, sb.st_gid, sb.st_mode)


def seal(work: WorkDir, how: str) -> Path | None:
    """Close the journal (``how``: rolled-back, undone): renamed so a new change starts afresh.

    The backups of the sealed change are removed: nothing reads them any more, and one of them
    may be a retired private key.
    """
    path = work.journal
    if not path.exists():
        return None
    with contextlib.suppress(PgtlsError):  # a full disk: the new name alone says it
        Journal(work, "seal").record("sealed", how=how)
    sealed = path.with_name(f"journal.{how}-{files.utc_stamp()}.jsonl")
    n = 1
    while sealed.exists():
        n += 1
        sealed = path.with_name(f"journal.{how}-{files.utc_stamp()}.{n}.jsonl")
    os.replace(path, sealed)
    files.fsync_dir(path.parent)
    backups = work.backups
    if backups.is_dir():
        for item in backups.iterdir():
            item.unlink()
        backups.rmdir()
    return sealed


_SEALED = re.compile(r"journal\.(?P<how>.+)-\d{8}T\d{6}Z(?:\.\d+)?\.jsonl")


def last_sealed(work: WorkDir) -> tuple[str, Path] | None:
    """The newest journal :func:`seal` closed in the change's folder, and how it was closed
    (``rolled-back``, ``undone``); None when there is none."""
    found: list[tuple[int, str, Path]] = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(work.path):
            if (m := _SEALED.fullmatch(entry.name)) and entry.is_file(follow_symlinks=False):
                found.append(
                    (entry.stat(follow_symlinks=False).st_mtime_ns, m["how"], Path(entry.path))
                )
    if not found:
        return None
    _mtime, how, path = max(found)
    return how, path
