"""The runbook's parameters: plain values in, one typed, validated object out."""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from pgtls_helpers.errors import InputError
from pgtls_helpers.postgres.hba import RULE_KEYS
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
    # OS user -> the database role its psql check logs in as (default: the user's own name);
    # the password is that user's own (its ~/.pgpass), never the runbook's
    client_roles: Mapping[str, str] = field(default_factory=dict)
    hba_rules: tuple[Mapping[str, Any], ...] = ()
    reject_non_ssl: bool = True
    allow_insecure_rules: bool = False
    # server files the change may write outside the data and configuration directories
    server_file_targets: tuple[str, ...] = ()
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


PARAMETER_NAMES = tuple(f.name for f in fields(Params))
# Each parameter's type, read from the dataclass, so a parameter added there is known, converted
# and checked here without a second list to keep in step.
_TYPES: dict[str, Any] = typing.get_type_hints(Params)
_REQUIRED = ("change_id", "common_name")


def _suggest(name: str, known: tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else f"known names are {', '.join(known)}"


def _unknown(source: str, names: list[str], known: tuple[str, ...], where: str = "") -> InputError:
    what = f"unknown {'parameter' if not where else 'key'}"
    parts = [f"'{n}' ({_suggest(n, known)})" for n in names]
    return InputError(
        f"{source}: {where}{what}{'s' if len(names) > 1 else ''} {', '.join(parts)}; "
        "fix the name or remove it"
    )


def _parts(hint: Any) -> tuple[Any, tuple[Any, ...]]:
    return typing.get_origin(hint), typing.get_args(hint)


def _optional(hint: Any) -> Any | None:
    """``X`` for ``X | None``, else None."""
    origin, args = _parts(hint)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else None
    return None


def _type_word(hint: Any) -> str:
    origin, _ = _parts(hint)
    if hint is bool:
        return "true or false"
    if hint is int:
        return "a whole number"
    if hint is str:
        return "text (quote it in YAML if it looks like a number or yes/no)"
    if origin is tuple:
        return "a list"
    if origin in (Mapping, dict):
        return "a mapping of names to values"
    return str(hint)


def _convert(source: str, name: str, value: Any, hint: Any) -> Any:
    """``value`` as the type ``hint`` says, or an :class:`InputError` in one sentence."""
    inner = _optional(hint)
    if inner is not None:
        if value is None or value == "":
            return None
        return _convert(source, name, value, inner)
    origin, args = _parts(hint)
    bad = InputError(
        f"{source}: {name} must be {_type_word(hint)}, not {type(value).__name__} {value!r}"
    )
    if hint is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if hint is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, str) and value.strip().isdigit():
            return int(value)
        raise bad
    if hint is str:
        if not isinstance(value, str):
            raise bad
        return value
    if origin is tuple:
        if value is None or value == "":
            return ()
        if isinstance(value, str):
            items: list[Any] = [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, list | tuple):
            items = list(value)
        else:
            raise bad
        return tuple(_convert(source, f"{name}[{i}]", v, args[0]) for i, v in enumerate(items))
    if origin in (Mapping, dict):
        if value is None or value == "":
            return {}
        if not isinstance(value, Mapping):
            raise bad
        key_hint, value_hint = args if len(args) == 2 else (str, Any)
        return {
            _convert(source, f"{name} key", k, key_hint): _convert(
                source, f"{name}[{k}]", v, value_hint
            )
            for k, v in value.items()
        }
    return value  # Any: checked where it is used


def _check_rules(source: str, rules: tuple[Any, ...], *, allow_insecure: bool) -> None:
    """Every field of every rule, when the parameters are read: a typo (``scram-sha265``,
    ``127.0.0.1/33``, ``hostsll``) or a rule that lets clients in without TLS or a password is
    unusable input before anything runs, never a refusal in step 4 after step 3 wrote."""
    from pgtls_helpers.postgres import hba

    for i, rule in enumerate(rules):
        unknown = [str(k) for k in rule if k not in RULE_KEYS]
        if unknown:
            raise _unknown(source, unknown, RULE_KEYS, where=f"hba_rules[{i}]: ")
    parsed = hba.parse_rules(list(rules), where=f"{source}: hba_rules")
    if allow_insecure:
        return
    for i, rule in enumerate(parsed):
        if reason := hba.insecure_reason(rule):
            raise InputError(
                f"{source}: hba_rules[{i}]: {reason}; use hostssl with a password or "
                "certificate method, or set allow_insecure_rules: true if this rule is intended"
            )


def load_params(values: Mapping[str, Any], *, source: str = "parameters") -> Params:
    """Validate plain values (a notebook's parameters cell, a YAML file) into :class:`Params`.

    Every name must be a parameter of :class:`Params` and every value of its type; anything else
    is unusable input (:class:`InputError`, "did you mean ..." for a near miss), so a misspelled
    name never leaves its parameter silently at the default.
    """
    unknown = [str(k) for k in values if k not in PARAMETER_NAMES]
    if unknown:
        raise _unknown(source, unknown, PARAMETER_NAMES)
    for name in _REQUIRED:
        if not values.get(name):
            raise InputError(f"{source}: '{name}' is missing; set it in the parameters file")
    known = {name: _convert(source, name, v, _TYPES[name]) for name, v in values.items()}
    if not _CHANGE_ID.match(str(known["change_id"])):
        raise InputError(
            f"{source}: change_id '{known['change_id']}' must be letters, digits, '.', '_' or "
            "'-' (it names directories)"
        )
    if known.get("ca_mode", "files") not in ("lab", "files"):
        raise InputError(f"{source}: ca_mode must be 'lab' or 'files', not '{known['ca_mode']}'")
    for name in ("key_passphrase_env", "ca_files_password_env"):
        env = known.get(name)
        if env and not _ENV_NAME.match(str(env)):
            raise InputError(
                f"{source}: {name} must be the name of an environment variable (like "
                "PGTLS_KEY_PASSPHRASE), never the secret itself"
            )
    if known.get("new_root") not in (None, "", "accept"):
        raise InputError(
            f"{source}: new_root must be 'accept' (go on with a CA rotation) or empty, not "
            f"'{known['new_root']}'"
        )
    _check_rules(
        source,
        known.get("hba_rules", ()),
        allow_insecure=bool(known.get("allow_insecure_rules", False)),
    )
    users = known.get("client_system_users", ())
    strays = [u for u in known.get("client_roles", {}) if u not in users]
    if strays:
        raise InputError(
            f"{source}: client_roles names {', '.join(strays)}, not in client_system_users; "
            "list the OS user there too, or remove its role"
        )
    return Params(**known)


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
