"""One psycopg connection to the server being changed: its facts, settings and verdicts.

Every file target comes from the server's own settings (``ssl_cert_file`` and friends, relative
paths resolved against ``data_directory``), never from assumptions about the layout.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pgtls_helpers.postgres.hbacheck import OwnConnection

from pgtls_helpers.errors import ServerError

__all__ = ["HbaRuleRow", "Server", "ServerFacts", "SslStatus", "signal_reload"]

_FACT_SETTINGS = (
    "ssl",
    "data_directory",
    "config_file",
    "hba_file",
    "ssl_cert_file",
    "ssl_key_file",
    "ssl_ca_file",
    "ssl_passphrase_command",
    "ssl_min_protocol_version",
    "listen_addresses",
    "port",
    "server_version",
    "server_version_num",
)


@dataclass(frozen=True)
class ServerFacts:
    """What the server says about itself; file paths are absolute."""

    version: str
    version_num: int
    ssl: bool
    data_directory: Path
    config_file: Path
    hba_file: Path
    ssl_cert_file: Path
    ssl_key_file: Path
    ssl_ca_file: Path | None
    ssl_passphrase_command: str
    ssl_min_protocol_version: str
    listen_addresses: str
    port: int
    is_superuser: bool
    data_directory_owner: tuple[int, int] | None  # (uid, gid) when we can see the directory

    def as_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class HbaRuleRow:
    """One row of ``pg_hba_file_rules``."""

    line_number: int | None
    type: str | None
    database: list[str] | None
    user_name: list[str] | None
    address: str | None
    netmask: str | None
    auth_method: str | None
    error: str | None


@dataclass(frozen=True)
class SslStatus:
    """This connection's row of ``pg_stat_ssl``."""

    ssl: bool
    version: str | None
    cipher: str | None
    bits: int | None


def _resolve(value: str, data_directory: Path) -> Path:
    path = Path(value)
    return path if path.is_absolute() else data_directory / path


def signal_reload(data_directory: Path) -> bool:
    """Ask the postmaster to reload by signal (what ``pg_ctl reload`` does), for when no
    connection is possible; False when no postmaster runs for ``data_directory``."""
    import signal

    try:
        pid = int((data_directory / "postmaster.pid").read_text().splitlines()[0])
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError, IndexError):
        return False
    return True


def libpq_reason(exc: Exception, info: Mapping[str, Any]) -> str:
    """libpq's message whole, on one line (it continues lines with a tab: "...failed:
    Connection refused\\n\\tIs the server running..."), and for an authentication failure the
    places libpq took (or looked for) the password, so the fix can be made where it is read."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return "no answer"
    # psycopg's own prefix, not libpq's
    lines[0] = lines[0].removeprefix("connection failed: ")
    text = lines[0]
    for line in lines[1:]:
        stop = "" if text.endswith((".", "?", ":", ";")) else "." if line[0].isupper() else ";"
        text += f"{stop} {line}"
    if "no password supplied" in text:
        text += "; libpq found none in " + _password_fix(info, "add")
    elif "password authentication failed" in text:
        text += "; the server refused the password libpq read from " + _password_fix(
            info, "correct"
        )
    return text


def _password_fix(info: Mapping[str, Any], verb: str) -> str:
    """Where libpq reads a password, and what to set, with the ~/.pgpass line for this login."""
    passfile = info.get("passfile") or os.environ.get("PGPASSFILE") or "~/.pgpass"
    host, port = info.get("host", "localhost"), info.get("port", 5432)
    user = info.get("user") or os.environ.get("PGUSER") or "ROLE"
    return (
        f"PGPASSWORD or the password file PGPASSFILE names (here {passfile}): set PGPASSWORD, "
        f"or {verb} the line {host}:{port}:*:{user}:PASSWORD in {passfile} (mode 0600)"
    )


class Server:
    """A connection to the server the runbook changes.

    ``conninfo`` is anything ``psycopg.connect`` accepts as keywords (host, port, user, dbname,
    passfile, sslmode, …). The password comes from libpq's usual places (``PGPASSWORD``,
    ``PGPASSFILE``, ``~/.pgpass``), never from a parameter value.
    """

    def __init__(self, conninfo: Mapping[str, Any]):
        self.conninfo = dict(conninfo)
        self._conn: Any = None

    def __repr__(self) -> str:
        return f"Server(host={self.conninfo.get('host')!r}, port={self.conninfo.get('port')!r})"

    # connection
    def connect(self, **overrides: Any) -> Any:
        """A new autocommit connection (the caller closes it)."""
        import psycopg

        info = {**self.conninfo, **overrides}
        info.setdefault("connect_timeout", 10)
        try:
            return psycopg.connect(autocommit=True, **info)
        except psycopg.OperationalError as exc:
            where = f"{info.get('host', 'localhost')}:{info.get('port', 5432)}"
            raise ServerError(f"cannot connect to {where}: {libpq_reason(exc, info)}") from exc

    @property
    def conn(self) -> Any:
        if self._conn is None or self._conn.closed:
            self._conn = self.connect()
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        import psycopg

        try:
            return list(self.conn.execute(sql, params).fetchall())
        except psycopg.Error as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ServerError(f"the server refused {sql.split()[0]} …: {first}") from exc

    # facts
    def show(self, name: str) -> str:
        rows = self._query("SELECT current_setting(%s)", (name,))
        return str(rows[0][0])

    def facts(self) -> ServerFacts:
        """Read the settings the runbook relies on, in one round trip."""
        rows = self._query(
            "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)", (list(_FACT_SETTINGS),)
        )
        values = dict(rows)
        superuser = self._query("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        data_dir = Path(values["data_directory"])
        try:
            st = os.stat(data_dir)
            owner: tuple[int, int] | None = (st.st_uid, st.st_gid)
        except OSError:
            owner = None
        ca = values.get("ssl_ca_file") or ""
        return ServerFacts(
            version=values["server_version"],
            version_num=int(values["server_version_num"]),
            ssl=values["ssl"] == "on",
            data_directory=data_dir,
            config_file=Path(values["config_file"]),
            hba_file=Path(values["hba_file"]),
            ssl_cert_file=_resolve(values["ssl_cert_file"], data_dir),
            ssl_key_file=_resolve(values["ssl_key_file"], data_dir),
            ssl_ca_file=_resolve(ca, data_dir) if ca else None,
            ssl_passphrase_command=values.get("ssl_passphrase_command", ""),
            ssl_min_protocol_version=values.get("ssl_min_protocol_version", ""),
            listen_addresses=values.get("listen_addresses", ""),
            port=int(values["port"]),
            is_superuser=bool(superuser and superuser[0][0]),
            data_directory_owner=owner,
        )

    # changes
    def alter_system(self, name: str, value: str | None) -> None:
        """``ALTER SYSTEM SET name = value`` (``RESET`` when value is None)."""
        from psycopg import sql

        if value is None:
            stmt = sql.SQL("ALTER SYSTEM RESET {}").format(sql.Identifier(name))
        else:
            stmt = sql.SQL("ALTER SYSTEM SET {} = {}").format(
                sql.Identifier(name), sql.Literal(value)
            )
        import psycopg

        try:
            self.conn.execute(stmt)
        except psycopg.Error as exc:
            raise ServerError(f"ALTER SYSTEM SET {name} failed: {exc}".strip()) from exc

    def auto_conf_value(self, name: str) -> str | None:
        """What ``postgresql.auto.conf`` sets ``name`` to, or None (for exact rollback)."""
        rows = self._query(
            "SELECT setting FROM pg_file_settings WHERE name = %s AND sourcefile LIKE "
            "'%%postgresql.auto.conf' ORDER BY seqno DESC LIMIT 1",
            (name,),
        )
        return str(rows[0][0]) if rows else None

    def reload(self) -> bool:
        """``pg_reload_conf()``: it only signals the postmaster; check the outcome separately."""
        return bool(self._query("SELECT pg_reload_conf()")[0][0])

    def conf_load_time(self, *, fresh: bool = False) -> Any:
        """``pg_conf_load_time()``; with ``fresh``, as a new backend sees it, which is the
        postmaster's: it changes only once the postmaster has finished a reload."""
        if not fresh:
            return self._query("SELECT pg_conf_load_time()")[0][0]
        with self.connect() as conn:
            return conn.execute("SELECT pg_conf_load_time()").fetchone()[0]

    def reload_and_wait(self, *, timeout: float = 15.0) -> bool:
        """``pg_reload_conf()``, then wait until the postmaster has processed it.

        Confirmed on this same connection: the postmaster re-reads its files (pg_hba.conf
        included) before it passes the reload on to the backends, so once this backend's
        ``pg_conf_load_time()`` moves, the postmaster has finished. No new login is needed, so
        rules that would refuse a new connection cannot hide the outcome. Returns False when
        nothing moved within ``timeout``; see :meth:`reload_confirmed`.
        """
        import time

        before = self.conf_load_time()
        self.reload()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.conf_load_time() > before:
                return True
            time.sleep(0.02)
        return False

    def reload_confirmed(self, *, timeout: float = 15.0) -> None:
        """:meth:`reload_and_wait`, raising :class:`ServerError` when it is not confirmed."""
        if not self.reload_and_wait(timeout=timeout):
            where = f"{self.conninfo.get('host')}:{self.conninfo.get('port')}"
            raise ServerError(
                f"{where}: the server did not confirm the reload within {timeout:.0f} s; check "
                "its log for 'received SIGHUP'"
            )

    def advisory_lock(self, key: int, *, timeout: float) -> bool:
        """``pg_try_advisory_lock(key)`` on this connection, retried until ``timeout``."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            if bool(self._query("SELECT pg_try_advisory_lock(%s)", (key,))[0][0]):
                return True
            # Any login role may take any advisory key: only a superuser's hold (a pgtls run
            # elsewhere logs in as one) is a change in progress; a lesser role's never blocks.
            if not self._query(
                "SELECT 1 FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
                "JOIN pg_roles r ON r.oid = a.usesysid WHERE l.locktype = 'advisory' "
                "AND l.objid = %s AND l.granted AND r.rolsuper",
                (key,),
            ):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)

    def advisory_unlock(self, key: int) -> None:
        """Release advisory lock ``key``; a lost connection has released it already."""
        try:
            self._query("SELECT pg_advisory_unlock(%s)", (key,))
        except ServerError:
            pass

    def advisory_holder(self, key: int) -> str | None:
        """Who holds advisory lock ``key`` (role, client address, backend pid), if anyone;
        never the ``application_name``, which the holder chooses."""
        rows = self._query(
            "SELECT a.pid, a.usename, a.client_addr FROM pg_locks l JOIN pg_stat_activity a "
            "USING (pid) WHERE l.locktype = 'advisory' AND l.objid = %s AND l.granted",
            (key,),
        )
        if not rows:
            return None
        pid, role, addr = rows[0]
        return f"a session of role {role} from {addr or 'a local socket'} (backend pid {pid})"

    def file_setting_errors(self) -> list[str]:
        """Errors in the configuration files as the server would read them now."""
        rows = self._query(
            "SELECT sourcefile, sourceline, name, error FROM pg_file_settings "
            "WHERE error IS NOT NULL"
        )
        return [f"{f}:{line}: {name or ''} {err}".strip() for f, line, name, err in rows]

    def hba_rules(self) -> list[HbaRuleRow]:
        """``pg_hba_file_rules``: the file on disk as the server parses it (not yet loaded)."""
        rows = self._query(
            "SELECT line_number, type, database, user_name, address, netmask, auth_method, "
            "error FROM pg_hba_file_rules ORDER BY line_number"
        )
        return [HbaRuleRow(*row) for row in rows]

    def hba_errors(self) -> list[str]:
        return [f"line {r.line_number}: {r.error}" for r in self.hba_rules() if r.error]

    def ssl_status(self) -> SslStatus:
        rows = self._query(
            "SELECT ssl, version, cipher, bits FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        )
        ssl, version, cipher, bits = rows[0]
        return SslStatus(bool(ssl), version, cipher, bits)

    def own_connection(self, *, tls: bool) -> OwnConnection:
        """This connection as pg_hba.conf sees it (``tls``: whether it will use TLS)."""
        from pgtls_helpers.postgres.hbacheck import OwnConnection

        rows = self._query(
            "SELECT session_user, current_database(), host(inet_client_addr()), "
            "array(SELECT rolname FROM pg_roles WHERE pg_has_role(session_user, oid, 'member'))"
        )
        user, database, address, roles = rows[0]
        return OwnConnection(
            user=str(user),
            database=str(database),
            address=str(address) if address else None,
            tls=tls,
            roles=tuple(roles or ()),
        )

    def current_logfile(self) -> str | None:
        rows = self._query("SELECT pg_current_logfile()")
        return rows[0][0] if rows and rows[0][0] else None

    def log_tail(self, pattern: str, *, max_bytes: int = 65536) -> str | None:
        """The last server log line containing ``pattern`` (needs ``logging_collector``)."""
        logfile = self.current_logfile()
        if not logfile:
            return None
        rows = self._query(
            "SELECT pg_read_file(%s, greatest(0, (pg_stat_file(%s)).size - %s), %s)",
            (logfile, logfile, max_bytes, max_bytes),
        )
        text = rows[0][0] or ""
        hits = [line for line in text.splitlines() if pattern in line]
        return hits[-1].strip() if hits else None
