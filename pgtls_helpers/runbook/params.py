"""The runbook's parameters: plain values in, one typed, validated object out."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from pgtls_helpers.errors import InputError
from pgtls_helpers.runbook.workdir import WorkDir

__all__ = [
    "PARAMETER_NAMES",
    "Params",
    "load_params",
    "read_params_file",
    "redacted",
    "resolve_paths",
]

_CHANGE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_FINGERPRINT = re.compile(r"^(?:[0-9A-Fa-f]{2}:?){31}[0-9A-Fa-f]{2}$")


@dataclass(frozen=True)
class Params:
    """Everything a run needs. Secrets are never values here: only names of variables."""

    change_id: str
    common_name: str
    server_host: str = "localhost"
    server_port: int = 5432
    server_user: str = "postgres"
    server_dbname: str = "postgres"
    pgdata: str | None = None
    subject_alt_names: tuple[str, ...] = ()
    country: str | None = None
    state: str | None = None
    locality: str | None = None
    organization: str | None = None
    organizational_unit: str | None = None
    email: str | None = None
    key_type: str = "rsa4096"
    key_passphrase_env: str | None = None
    ca_mode: str = "files"
    ca_files: tuple[str, ...] = ()
    ca_files_password_env: str | None = None
    client_system_users: tuple[str, ...] = ()
    client_root_merge: bool = False
    hba_rules: tuple[Mapping[str, Any], ...] = ()
    reject_non_ssl: bool = True
    verify_hosts: tuple[str, ...] = ()
    apply: bool = False
    lab_cluster: bool = False
    server_log_file: str | None = None
    work_dir: str = "work"
    record_dir: str | None = None
    # renewal and CA rotation
    allow_shorter_validity: bool = False
    reuse_key: bool = False
    new_root: str = ""
    add_roots: tuple[str, ...] = ()
    remove_roots: tuple[str, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def work(self) -> WorkDir:
        """This change's private work directory (keys, CSR, CA files, journals)."""
        return WorkDir(Path(self.work_dir).resolve() / self.change_id)

    @property
    def hosts(self) -> tuple[str, ...]:
        """Host names clients use: ``verify_hosts``, else the CN and SANs."""
        if self.verify_hosts:
            return self.verify_hosts
        seen: list[str] = []
        for name in (self.common_name, *self.subject_alt_names):
            if name.lower() not in (s.lower() for s in seen):
                seen.append(name)
        return tuple(seen)

    def conninfo(self) -> dict[str, Any]:
        """libpq keywords for the runbook's own connection (password from libpq's usual
        places: ``PGPASSFILE``, ``~/.pgpass`` or ``PGPASSWORD``)."""
        return {
            "host": self.server_host,
            "port": self.server_port,
            "user": self.server_user,
            "dbname": self.server_dbname,
        }


PARAMETER_NAMES = tuple(f.name for f in fields(Params) if f.name != "extra")
_LISTS = (
    "subject_alt_names",
    "ca_files",
    "client_system_users",
    "hba_rules",
    "verify_hosts",
    "add_roots",
    "remove_roots",
)


def _as_tuple(name: str, value: Any) -> tuple[Any, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    if isinstance(value, list | tuple):
        return tuple(value)
    raise InputError(f"parameter {name}: expected a list, got {type(value).__name__}")


def load_params(values: Mapping[str, Any], *, source: str = "parameters") -> Params:
    """Validate plain values (a notebook's parameters cell, a YAML file) into :class:`Params`.

    Unknown names are kept in ``extra`` so a notebook may carry its own; a misspelled known
    name is caught because the required ones would then be missing.
    """
    known = {k: v for k, v in values.items() if k in PARAMETER_NAMES}
    extra = {k: v for k, v in values.items() if k not in PARAMETER_NAMES and not k.startswith("_")}
    for name in ("change_id", "common_name"):
        if not known.get(name):
            raise InputError(f"{source}: '{name}' is missing; set it in the parameters file")
    if not _CHANGE_ID.match(str(known["change_id"])):
        raise InputError(
            f"{source}: change_id '{known['change_id']}' must be letters, digits, '.', '_' or "
            "'-' (it names directories)"
        )
    for name in _LISTS:
        if name in known:
            known[name] = _as_tuple(name, known[name])
    if known.get("ca_mode", "files") not in ("lab", "files"):
        raise InputError(f"{source}: ca_mode must be 'lab' or 'files', not '{known['ca_mode']}'")
    for name in ("key_passphrase_env", "ca_files_password_env"):
        env = known.get(name)
        if env and not _ENV_NAME.match(str(env)):
            raise InputError(
                f"{source}: {name} must be the name of an environment variable (like "
                "PGTLS_KEY_PASSPHRASE), never the secret itself"
            )
    try:
        known["server_port"] = int(known.get("server_port", 5432))
    except (TypeError, ValueError):
        raise InputError(f"{source}: server_port must be a number") from None
    if known.get("new_root") not in (None, "", "accept"):
        raise InputError(
            f"{source}: new_root must be 'accept' (go on with a CA rotation) or empty, not "
            f"'{known['new_root']}'"
        )
    for flag in (
        "apply",
        "reject_non_ssl",
        "lab_cluster",
        "client_root_merge",
        "allow_shorter_validity",
        "reuse_key",
    ):
        if flag in known and not isinstance(known[flag], bool):
            raise InputError(f"{source}: {flag} must be true or false")
    for name in (
        "pgdata",
        "key_passphrase_env",
        "ca_files_password_env",
        "server_log_file",
        "record_dir",
        "email",
        "country",
        "state",
        "locality",
        "organization",
        "organizational_unit",
    ):
        if known.get(name) == "":
            known[name] = None
    return Params(**known, extra=extra)


def read_params_file(path: str | Path) -> dict[str, Any]:
    """A YAML parameters file as plain values."""
    import yaml

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise InputError(f"{p}: no such parameters file; see parameters/example.yaml") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise InputError(f"{p}: not valid YAML{where}; fix the syntax there") from None
    if not isinstance(data, dict):
        raise InputError(f"{p}: expected 'name: value' lines at the top level")
    return data


def redacted(values: Mapping[str, Any]) -> dict[str, Any]:
    """Parameters safe to archive: names of secrets stay, nothing that looks like one does."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        lowered = key.lower()
        if any(w in lowered for w in ("password", "passphrase", "secret", "token")) and not (
            lowered.endswith("_env")
        ):
            out[key] = "<redacted>"
        else:
            out[key] = value
    return out


def resolve_paths(
    values: Mapping[str, Any], params_file: Path, work_option: str | Path = "work"
) -> dict[str, Any]:
    """Make the paths of a parameters file absolute, so no later step depends on the
    directory a command or a kernel happened to start in.

    A ``work_dir`` written in the file is relative to the file's folder; without one, the
    command's ``--work`` option is used, relative to where the command was typed. ``ca_files``
    are relative to where the command was typed, like any path given on a command line.
    """
    out = dict(values)
    written = out.get("work_dir")
    if written:
        work = Path(str(written)).expanduser()
        if not work.is_absolute():
            work = params_file.resolve().parent / work
    else:
        work = Path(work_option).expanduser()
    out["work_dir"] = str(work.resolve())
    for name in ("ca_files", "add_roots", "remove_roots"):
        if out.get(name):
            items = out[name]
            if isinstance(items, str):
                items = [f.strip() for f in items.split(",") if f.strip()]
            # remove_roots may name a root by its SHA-256 fingerprint rather than a file
            out[name] = [
                str(f)
                if name == "remove_roots" and _FINGERPRINT.match(str(f))
                else str(Path(str(f)).expanduser().resolve())
                for f in items
            ]
    return out
