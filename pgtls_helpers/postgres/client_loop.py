"""A client that keeps connecting while its files are replaced: the proof that a renewal of a
client certificate costs no failed connection.

:class:`ClientLoop` runs, as the client OS user and with nothing of the runbook's environment,
a small shell loop (:data:`LOOP_SCRIPT`: ``psql`` with the user's own ``~/.postgresql`` only,
``sslmode=verify-full``) that opens one new connection after another and prints one line for
each: ``ok <serial>`` (the serial ``pg_stat_ssl`` shows for the certificate it presented) or
``fail <message>``. libpq reads the certificate and key again at each connection, as any new
client process does. It stops when its process group is ended.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from pgtls_helpers.errors import PgtlsError
from pgtls_helpers.postgres.clients import ClientUser

__all__ = ["ClientLoop", "LoopResult"]

# $1: the conninfo, $2: psql. One line per connection; it runs until its process group is
# ended (an attempt cut short prints nothing, so it is not counted).
LOOP_SCRIPT = """
q="SELECT client_serial FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
while :; do
  if out=$("$2" "$1" -XAtc "$q" 2>&1); then echo "ok $out"; else echo "fail" $out; fi
done
"""


@dataclass(frozen=True)
class LoopResult:
    """What one client's loop saw: every connection, the failed ones, and which certificate
    (by serial, decimal as ``pg_stat_ssl`` shows it) each successful one presented."""

    os_user: str
    connections: int
    failed: int
    seconds: float
    before_switch: int | None = None  # connections made before the files were replaced
    failed_after_switch: int = 0
    last_ok: bool = False  # its last connection logged in: the files it has now work
    by_serial: dict[str, int] = field(default_factory=dict)
    errors: tuple[str, ...] = ()  # the first distinct failure messages

    def summary(self) -> dict[str, Any]:
        return {
            "os_user": self.os_user,
            "connections": self.connections,
            "failed": self.failed,
            "seconds": round(self.seconds, 3),
            "before_switch": self.before_switch,
            "failed_after_switch": self.failed_after_switch,
            "last_ok": self.last_ok,
            "by_serial": dict(self.by_serial),
            "errors": list(self.errors),
        }


class ClientLoop:
    """``with ClientLoop(user, conninfo) as loop:`` the loop runs as ``user`` until the block
    ends; :meth:`wait_for` waits for a number of results, :attr:`result` says what it saw."""

    def __init__(self, user: ClientUser, conninfo: dict[str, str]) -> None:
        self.user = user
        self.conninfo = " ".join(f"{k}={v}" for k, v in conninfo.items())
        self._lines: list[str] = []
        self._cond = threading.Condition()
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self._started = 0.0
        self._seconds = 0.0
        self._switch: int | None = None
        self._stopped = False

    def __enter__(self) -> ClientLoop:
        env = {
            "HOME": str(self.user.home),
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LC_ALL": "C",
        }
        kwargs: dict[str, Any] = {}
        if os.geteuid() == 0 and self.user.uid != 0:
            kwargs = {"user": self.user.uid, "group": self.user.gid, "extra_groups": []}
        elif os.geteuid() != self.user.uid:
            raise PgtlsError(f"cannot run a connection loop as {self.user.name} without root")
        psql = shutil.which("psql")
        if psql is None:
            raise PgtlsError("psql is not installed on this machine; no client loop can run")
        self._started = time.monotonic()
        self._proc = subprocess.Popen(
            ["/bin/sh", "-c", LOOP_SCRIPT, "pgtls-client-loop", self.conninfo, psql],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
            cwd=str(self.user.home) if self.user.home.is_dir() else "/",
            start_new_session=True,  # its own process group, ended as one
            **kwargs,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            with self._cond:
                self._lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def count(self) -> int:
        with self._cond:
            return len(self._lines)

    def wait_for(self, n: int, *, timeout: float = 60.0) -> int:
        """Wait until the loop has made ``n`` connections more than now (or it ended, or
        ``timeout``); returns how many it has made in all."""
        deadline = time.monotonic() + timeout
        with self._cond:
            want = len(self._lines) + n
            while len(self._lines) < want and self._running():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return len(self._lines)

    def first(self, *, timeout: float = 30.0) -> str | None:
        """The loop's first line (None: none within ``timeout``)."""
        if not self.count():
            self.wait_for(1, timeout=timeout)
        with self._cond:
            return self._lines[0] if self._lines else None

    def mark_switch(self) -> None:
        """Remember where the files were replaced: later results are after the switch."""
        self._switch = self.count()

    def _running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        """End the loop (after the connection under way) and wait for it."""
        if self._proc is None or self._stopped:
            return
        self._stopped = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGTERM)  # the shell and its psql of the moment
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=10)
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._seconds = time.monotonic() - self._started

    @property
    def result(self) -> LoopResult:
        with self._cond:
            lines = list(self._lines)
        serials: dict[str, int] = {}
        errors: list[str] = []
        failed = after = 0
        for i, line in enumerate(lines):
            status, _, rest = line.partition(" ")
            if status == "ok":
                serials[rest] = serials.get(rest, 0) + 1
            else:
                failed += 1
                after += self._switch is not None and i >= self._switch
                if rest not in errors and len(errors) < 5:
                    errors.append(rest)
        return LoopResult(
            os_user=self.user.name,
            connections=len(lines),
            failed=failed,
            seconds=self._seconds or time.monotonic() - self._started,
            before_switch=self._switch,
            failed_after_switch=after,
            last_ok=bool(lines) and lines[-1].startswith("ok"),
            by_serial=serials,
            errors=tuple(errors),
        )
