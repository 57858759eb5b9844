"""What a failed connection to the server says, on a real cluster: libpq's message whole, on
one line without its tab, and for a missing or refused password the places libpq reads one and
what to set."""

from __future__ import annotations

from pathlib import Path

import pytest

from pgtls_helpers.errors import ServerError
from pgtls_helpers.lab import LabCluster
from pgtls_helpers.lab.cluster import free_port
from pgtls_helpers.postgres.server import Server


def _refusal(**conninfo: object) -> str:
    with pytest.raises(ServerError) as refused:
        Server(conninfo).connect()
    return str(refused.value)


def test_a_wrong_port_gives_libpqs_whole_message_on_one_line() -> None:
    port = free_port()
    text = _refusal(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
    assert text == (
        f'cannot connect to 127.0.0.1:{port}: connection to server at "127.0.0.1", port {port} '
        "failed: Connection refused. Is the server running on that host and accepting TCP/IP "
        "connections?"
    )
    assert "\t" not in text and "\n" not in text


def test_a_missing_password_names_where_libpq_looks_and_what_to_set(
    lab_cluster: LabCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PGPASSWORD", raising=False)
    empty = tmp_path / "pgpass"  # a password file with no line for this login
    empty.write_text("")
    empty.chmod(0o600)
    info = lab_cluster.conninfo(passfile=str(empty))
    host, port, user = info["host"], info["port"], info["user"]
    text = _refusal(**info)
    assert text == (
        f'cannot connect to {host}:{port}: connection to server at "{host}", port {port} '
        "failed: fe_sendauth: no password supplied; libpq found none in PGPASSWORD or the "
        f"password file PGPASSFILE names (here {empty}): set PGPASSWORD, or add the line "
        f"{host}:{port}:*:{user}:PASSWORD in {empty} (mode 0600)"
    )


def test_a_wrong_password_says_which_sources_libpq_read(
    lab_cluster: LabCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGPASSWORD", "not-the-password")
    nowhere = tmp_path / "no-pgpass"
    info = lab_cluster.conninfo(passfile=str(nowhere))
    host, port, user = info["host"], info["port"], info["user"]
    text = _refusal(**info)
    assert text.endswith(
        f'password authentication failed for user "{user}"; the server refused the password '
        "libpq read from PGPASSWORD or the password file PGPASSFILE names (here "
        f"{nowhere}): set PGPASSWORD, or correct the line {host}:{port}:*:{user}:PASSWORD in "
        f"{nowhere} (mode 0600)"
    ), text
    assert "\t" not in text and "\n" not in text
