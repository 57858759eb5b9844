"""What ``pgtls watch`` learns by logging in to a server: one libpq connection per target.

* with ``--on-disk``: the first certificate of ``ssl_cert_file`` as the server reads it now (a
  renewal installed but never reloaded), and the CRLs of ``ssl_crl_file`` and of the hashed
  files (``<hash>.r<n>``) in ``ssl_crl_dir`` (read with ``pg_read_binary_file`` and
  ``pg_ls_dir``, so a relative name is the data directory's, as the server takes it);
* with ``--sessions``: the client sessions of ``pg_stat_ssl`` (:data:`SESSIONS_SQL`); a role
  without ``pg_read_all_stats`` (or superuser) sees only its own, so it is told so instead.

libpq takes the role (``--user``; else ``PGUSER``, else the OS user, as ``psql`` does) and the
password from its usual places (``PGPASSWORD``, ``PGPASSFILE``, ``~/.pgpass``); a login that
fails says so in libpq's words with those places (as the runbook's connection words it, in
:mod:`pgtls_helpers.postgres.server`). With a root the server's chain is verified
(``verify-ca``) before any authentication, else TLS is required without verification.
"""

from __future__ import annotations

import getpass
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pgtls_helpers.pki.client_posture import SessionRow
from pgtls_helpers.postgres.server import libpq_reason

if TYPE_CHECKING:
    import psycopg

__all__ = ["CRL_DIR_SQL", "SESSIONS_SQL", "LoginFacts", "default_role", "server_facts"]

#: Every client backend but this one: TLS or not, over TCP or the Unix socket, and the client
#: certificate's serial and issuer.
SESSIONS_SQL = """
SELECT s.ssl, a.client_addr IS NOT NULL, s.client_serial::text, s.issuer_dn
FROM pg_stat_ssl s JOIN pg_stat_activity a ON a.pid = s.pid
WHERE a.backend_type = 'client backend' AND a.pid <> pg_backend_pid()
"""

#: The files of ``ssl_crl_dir`` OpenSSL's hashed lookup reads (``<hash>.r<n>``).
CRL_DIR_SQL = r"""
SELECT f, pg_read_binary_file(%s || '/' || f)
FROM pg_ls_dir(%s) AS f WHERE f ~ '^[0-9a-f]{8}\.r[0-9]+$' ORDER BY f
"""


def _setting(conn: psycopg.Connection[Any], name: str) -> str:
    """A setting's value, '' when this server has no such setting."""
    row = conn.execute("SELECT setting FROM pg_settings WHERE name = %s", [name]).fetchone()
    return str(row[0]) if row and row[0] is not None else ""


@dataclass(frozen=True)
class LoginFacts:
    """What one login read; a part not asked for, or not read, is None (``error`` says why).

    Attributes:
        leaf_der: the DER of the first certificate in ``ssl_cert_file``.
        cert_path: the value of ``ssl_cert_file``.
        crl_path: the value of ``ssl_crl_file`` ('' when unset).
        crl_data: the bytes of that file.
        crl_dir: the value of ``ssl_crl_dir`` ('' when unset or before PostgreSQL 14).
        crl_dir_files: the names and bytes of the CRL files OpenSSL looks up there.
        sessions: rows of :data:`SESSIONS_SQL`.
        error: what could not be read, in a sentence (the login, then each part).
        on_disk_error: what of ``on_disk``'s part could not be read (the login included).
    """

    leaf_der: bytes | None = None
    cert_path: str | None = None
    crl_path: str | None = None
    crl_data: bytes | None = None
    crl_dir: str | None = None
    crl_dir_files: tuple[tuple[str, bytes], ...] | None = None
    sessions: tuple[SessionRow, ...] | None = None
    error: str | None = None
    on_disk_error: str | None = None


def default_role() -> str:
    """The role libpq logs in as without ``--user``: ``PGUSER``, else the OS user."""
    return os.environ.get("PGUSER") or getpass.getuser()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _leaf_der(data: bytes) -> bytes | None:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    try:
        return x509.load_pem_x509_certificates(data)[0].public_bytes(Encoding.DER)
    except ValueError:
        try:
            return x509.load_der_x509_certificate(data).public_bytes(Encoding.DER)
        except ValueError:
            return None


def server_facts(
    host: str,
    port: int,
    *,
    timeout: float,
    user: str | None = None,
    dbname: str = "postgres",
    root_path: str | None = None,
    on_disk: bool = True,
    sessions: bool = False,
) -> LoginFacts:
    """Log in once and read what ``on_disk`` and ``sessions`` ask for; never raises for a
    server that refuses: :attr:`LoginFacts.error` says why."""
    import psycopg

    info: dict[str, str | int] = {
        "host": host,
        "port": port,
        "dbname": dbname,
        "connect_timeout": max(1, int(timeout + 0.999)),
        "sslmode": "verify-ca" if root_path else "require",
        "application_name": "pgtls-watch",
    }
    if root_path:
        info["sslrootcert"] = root_path
    if user:
        info["user"] = user
    found: dict[str, object] = {}
    errors: list[str] = []
    disk_errors: list[str] = []
    try:
        with psycopg.connect(**info, autocommit=True) as conn:  # type: ignore[arg-type]
            if on_disk:
                row = conn.execute(
                    "SELECT current_setting('ssl_cert_file'), current_setting('ssl_crl_file')"
                ).fetchone()
                cert_path, crl_path = (str(row[0]), str(row[1])) if row else ("", "")
                found["cert_path"], found["crl_path"] = cert_path, crl_path
                for key, path in (("cert", cert_path), ("crl", crl_path)):
                    if not path:
                        continue
                    try:
                        got = conn.execute("SELECT pg_read_binary_file(%s)", [path]).fetchone()
                    except psycopg.errors.InsufficientPrivilege:
                        disk_errors.append(
                            f"the role may not read {path}; grant it pg_read_server_files or "
                            "use a superuser for --on-disk"
                        )
                        continue
                    except psycopg.Error as exc:
                        disk_errors.append(f"the server could not read {path}: {_first_line(exc)}")
                        continue
                    data = bytes(got[0]) if got and got[0] is not None else b""
                    if key == "cert":
                        found["leaf_der"] = _leaf_der(data)
                        if found["leaf_der"] is None:
                            disk_errors.append(f"{path} holds no certificate the server could load")
                    else:
                        found["crl_data"] = data
                crl_dir = _setting(conn, "ssl_crl_dir")
                found["crl_dir"] = crl_dir
                if crl_dir:
                    try:
                        files = conn.execute(CRL_DIR_SQL, [crl_dir, crl_dir]).fetchall()
                        found["crl_dir_files"] = tuple((str(n), bytes(d)) for n, d in files)
                    except psycopg.errors.InsufficientPrivilege:
                        disk_errors.append(
                            f"the role may not list {crl_dir}; use a superuser (or grant it "
                            "EXECUTE on pg_ls_dir and pg_read_server_files) for --on-disk"
                        )
                    except psycopg.Error as exc:
                        disk_errors.append(
                            f"the server could not read {crl_dir}: {_first_line(exc)}"
                        )
                errors.extend(disk_errors)
            if sessions:
                sees = conn.execute(
                    "SELECT current_user, pg_has_role(current_user, 'pg_read_all_stats', 'USAGE')"
                ).fetchone()
                if not sees or not sees[1]:
                    role = sees[0] if sees else "the role"
                    errors.append(
                        f"the role {role} sees only its own sessions; grant it "
                        "pg_read_all_stats (or use a superuser) for --sessions"
                    )
                    sessions = False
            if sessions:
                rows = conn.execute(SESSIONS_SQL).fetchall()
                found["sessions"] = tuple(
                    (r[0], bool(r[1]), r[2], r[3]) for r in rows
                )  # fmt: skip
    except psycopg.OperationalError as exc:
        role = user or default_role()
        why = libpq_reason(exc, {**info, "user": role})
        said = f"libpq could not log in as role {role} (database {dbname}): {why}"
        return LoginFacts(error=said, on_disk_error=said if on_disk else None)
    except psycopg.Error as exc:
        said = f"libpq could not read the server: {_first_line(exc)}"
        return LoginFacts(error=said, on_disk_error=said if on_disk else None)
    return LoginFacts(
        leaf_der=found.get("leaf_der"),  # type: ignore[arg-type]
        cert_path=found.get("cert_path"),  # type: ignore[arg-type]
        crl_path=found.get("crl_path"),  # type: ignore[arg-type]
        crl_data=found.get("crl_data"),  # type: ignore[arg-type]
        crl_dir=found.get("crl_dir"),  # type: ignore[arg-type]
        crl_dir_files=found.get("crl_dir_files"),  # type: ignore[arg-type]
        sessions=found.get("sessions"),  # type: ignore[arg-type]
        error="; ".join(errors) or None,
        on_disk_error="; ".join(disk_errors) or None,
    )
