"""``--timeout`` bounds a whole target, even against a server that trickles bytes forever.

Each listener answers the SSLRequest (or the plaintext StartupMessage) with the start of a
message and then one byte every 0.2 s; a per-``recv`` timeout never fires against that, so only
a deadline for the whole attempt ends the run.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pgtls_helpers.postgres.watch_wire import _read_first_message
from pgtls_helpers.postgres.wire import SSL_REQUEST

REPO = Path(__file__).resolve().parents[2]
TRICKLE_EVERY = 0.2
TRICKLE_FOR = 60.0  # the listener gives up by itself, whatever the client does
# A TLS handshake record header announcing 16 KiB: OpenSSL waits for all of it.
TLS_RECORD_HEAD = b"\x16\x03\x03\x3f\xff"
ERROR_HEAD = b"E" + (10_000).to_bytes(4, "big")


def _trickle(conn: socket.socket, head: bytes, stop: threading.Event) -> None:
    conn.sendall(head)
    end = time.monotonic() + TRICKLE_FOR
    while time.monotonic() < end and not stop.wait(TRICKLE_EVERY):
        conn.sendall(b"\x01")


def n_then_error(conn: socket.socket, stop: threading.Event) -> None:
    first = conn.recv(8)
    head = b"N" + ERROR_HEAD if first == SSL_REQUEST else ERROR_HEAD
    _trickle(conn, head, stop)


def error_for_ssl(conn: socket.socket, stop: threading.Event) -> None:
    conn.recv(8)
    _trickle(conn, ERROR_HEAD, stop)


def s_then_slow_tls(conn: socket.socket, stop: threading.Event) -> None:
    first = conn.recv(8)
    head = b"S" + TLS_RECORD_HEAD if first == SSL_REQUEST else ERROR_HEAD
    _trickle(conn, head, stop)


@contextmanager
def trickler(answer: Callable[[socket.socket, threading.Event], None]) -> Iterator[int]:
    """A listener on 127.0.0.1 running ``answer`` for every connection; yields its port."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.05)
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def serve(conn: socket.socket) -> None:
        with conn:
            try:
                answer(conn, stop)
            except OSError:
                pass  # the client gave up, as it should

    def loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            thread = threading.Thread(target=serve, args=(conn,), daemon=True)
            threads.append(thread)
            thread.start()

    acceptor = threading.Thread(target=loop, daemon=True)
    acceptor.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        acceptor.join(timeout=5)
        for thread in threads:
            thread.join(timeout=5)
        server.close()


def run(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pgtls_helpers", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    return proc, time.monotonic() - start


@pytest.mark.parametrize("answer", [error_for_ssl, s_then_slow_tls])
def test_watch_times_out_a_trickling_server(
    answer: Callable[[socket.socket, threading.Event], None],
) -> None:
    with trickler(answer) as port:
        proc, took = run("watch", "--timeout", "1", "--format", "json", f"127.0.0.1:{port}")
    assert took < 5, proc.stderr
    assert "Traceback" not in proc.stderr
    [target] = json.loads(proc.stdout)["targets"]
    assert (target["status"], target["reasons"]) == ("unknown", ["timeout"])


def test_watch_of_ssl_off_with_a_trickling_plaintext_answer() -> None:
    # 'N' is a complete answer (no-ssl); the plaintext probe that follows shares the deadline.
    with trickler(n_then_error) as port:
        proc, took = run("watch", "--timeout", "1", "--format", "json", f"127.0.0.1:{port}")
    assert took < 5, proc.stderr
    [target] = json.loads(proc.stdout)["targets"]
    assert (target["status"], target["reasons"]) == ("critical", ["no-ssl"])
    assert target["plaintext"] is None


@pytest.mark.parametrize("answer", [error_for_ssl, s_then_slow_tls])
def test_probe_times_out_a_trickling_server(
    answer: Callable[[socket.socket, threading.Event], None],
) -> None:
    with trickler(answer) as port:
        proc, took = run("probe", "--timeout", "1", "--json", f"127.0.0.1:{port}")
    assert took < 5, proc.stderr
    assert proc.returncode == 1
    error = json.loads(proc.stdout)["error"]
    assert error.startswith(f"127.0.0.1:{port}: ") and " within 1 s" in error


def test_an_oversized_message_is_not_read() -> None:
    left, right = socket.socketpair()
    with left, right:
        right.sendall(b"E" + (1 << 30).to_bytes(4, "big") + b"x" * 64)
        left.settimeout(1)
        assert _read_first_message(left) is None
