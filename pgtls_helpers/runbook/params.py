"""The runbook's parameters: plain values in, one typed, validated object out."""

from __future__ import annotations

import difflib
import json
import re
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from pgtls_helpers.errors import InputError
from pgtls_helpers.pki.subject import SUBJECT_FIELDS, Subject, subject_from
from pgtls_helpers.postgres.hba import RULE_KEYS
from pgtls_helpers.runbook.workdir import WorkDir

__all__ = [
    "PARAMETER_NAMES",
    "Params",
    "cell_defaults",
    "load_params",
    "parameters_cell_source",
    "plain_annotation",
    "plain_value",
    "plain_values",
    "read_params_file",
    "redacted",
    "resolve_paths",
    "write_parameters_cells",
]

_CHANGE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_FINGERPRINT = re.compile(r"^(?:[0-9A-Fa-f]{2}:?){31}[0-9A-Fa-f]{2}$")


def _about(text: str) -> dict[str, str]:
    """A parameter's meaning in a few words: the comment of its line in the notebooks'
    parameters cell, which ``papermill --help-notebook`` shows."""
    return {"help": text}


@dataclass(frozen=True)
class Params:
    """Everything a run needs. Secrets are never values here: only names of variables.

    The one declaration of the runbook's parameters: their names, types, defaults and meaning.
    The notebooks' ``parameters`` cell is written from it (:func:`parameters_cell_source`,
    ``make parameters-cells``); the subject fields are those of
    :data:`~pgtls_helpers.pki.subject.SUBJECT_FIELDS`, gathered by :attr:`subject`.
    """

    change_id: str = field(metadata=_about("names work/<change_id>/ and records/<change_id>/"))
    common_name: str = field(metadata=_about("the host name clients connect to (CN)"))
    server_host: str = field(
        default="localhost", metadata=_about("where the runbook connects, over TCP like clients")
    )
    server_port: int = field(default=5432, metadata=_about("the server's port"))
    server_user: str = field(
        default="postgres",
        metadata=_about("a superuser: ALTER SYSTEM and pg_reload_conf() need one"),
    )
    server_dbname: str = field(
        default="postgres", metadata=_about("the database of the runbook's own connection")
    )
    pgdata: str | None = field(
        default=None, metadata=_about("the data directory; empty: asked from the server")
    )
    subject_alt_names: tuple[str, ...] = field(
        default=(), metadata=_about("other names and IPs clients use (SANs)")
    )
    country: str | None = field(default=None, metadata=_about("C: two letters"))
    state: str | None = field(default=None, metadata=_about("ST: state or province, written out"))
    locality: str | None = field(default=None, metadata=_about("L: city"))
    organization: str | None = field(default=None, metadata=_about("O: company"))
    organizational_unit: str | None = field(default=None, metadata=_about("OU: department"))
    email: str | None = field(default=None, metadata=_about("emailAddress in the subject"))
    key_type: str = field(
        default="rsa4096",
        metadata=_about("rsa2048, rsa3072, rsa4096, ecdsa-p256 or ecdsa-p384"),
    )
    key_passphrase_env: str | None = field(
        default=None,
        metadata=_about("name of a variable holding a key passphrase; empty: none"),
    )
    ca_mode: str = field(
        default="files",
        metadata=_about("files: read ca_files; lab, acme, vault, command: that CA signs the CSR"),
    )
    ca_settings: Mapping[str, object] = field(
        default_factory=dict,
        metadata=_about("acme, vault, command: the CA's settings; secrets by name only"),
    )
    ca_files: tuple[str, ...] = field(
        default=(), metadata=_about("what the CA returned: PEM, DER, PKCS#7, PKCS#12 or folders")
    )
    ca_files_password_env: str | None = field(
        default=None, metadata=_about("name of a variable holding a PKCS#12 password")
    )
    client_system_users: tuple[str, ...] = field(
        default=(), metadata=_about("OS users that get ~/.postgresql/root.crt")
    )
    client_root_merge: bool = field(
        default=False, metadata=_about("add the root to a user's existing root.crt, not replace")
    )
    # the password of a client's psql check is that user's own (its ~/.pgpass), never the
    # runbook's
    client_roles: Mapping[str, str] = field(
        default_factory=dict,
        metadata=_about("OS user -> database role of its psql check; default: its name"),
    )
    hba_rules: tuple[Mapping[str, object], ...] = field(
        default=(), metadata=_about("lines to add: {type, database, user, address, method}")
    )
    reject_non_ssl: bool = field(
        default=True,
        metadata=_about("put `hostnossl all all all reject` before the other TCP lines"),
    )
    allow_insecure_rules: bool = field(
        default=False, metadata=_about("accept `trust` and non-SSL `host` lines in hba_rules")
    )
    server_file_targets: tuple[str, ...] = field(
        default=(),
        metadata=_about("server files writable outside the data and config dirs"),
    )
    verify_hosts: tuple[str, ...] = field(
        default=(), metadata=_about("names checked with verify-full; empty: the CN and the SANs")
    )
    apply: bool = field(
        default=False, metadata=_about("false: plan only, nothing on the server changes")
    )
    lab_cluster: bool = field(
        default=False, metadata=_about("true when the runner made a throwaway cluster for the run")
    )
    server_log_file: str | None = field(
        default=None, metadata=_about("the server's log file, quoted when a reload fails")
    )
    work_dir: str = field(
        default="work",
        metadata=_about("private per-change work directories (keys, CSRs, CA files)"),
    )
    record_dir: str | None = field(
        default=None, metadata=_about("this run's record directory; set by the runner")
    )
    # the client-certificate runbook (`pgtls clients`): clients prove who they are
    clients: tuple[Mapping[str, object], ...] = field(
        default=(),
        metadata=_about("client certificates: {os_user, role, subject DN}"),
    )
    client_ca_files: tuple[str, ...] = field(
        default=(), metadata=_about("client certificates: the files the CA returned for them")
    )
    client_crl_file: str = field(
        default="",
        metadata=_about("client certificates: the client CAs' CRLs (PEM or DER) for ssl_crl_file"),
    )
    ident_maps: tuple[Mapping[str, object], ...] = field(
        default=(), metadata=_about("pg_ident.conf lines to add: {map, system_user, role}")
    )
    client_driver_files: tuple[str, ...] = field(
        default=(), metadata=_about("extra client key files: pk8 (PKCS#8 DER, for pgjdbc)")
    )
    allow_shorter_validity: bool = field(
        default=False, metadata=_about("renewal: accept a new certificate that expires sooner")
    )
    reuse_key: bool = field(
        default=False,
        metadata=_about("renewal: the CA re-signs a CSR of the installed key (never copied)"),
    )
    allow_dropped_names: bool = field(
        default=False,
        metadata=_about("renewal: go on though the new certificate drops a served name"),
    )
    new_root: str = field(
        default="",
        metadata=_about("CA rotation: 'accept' once the clients not listed trust the new root"),
    )
    trust_client_roots: tuple[str, ...] = field(
        default=(),
        metadata=_about("client CA rotation, trust: roots to add to ssl_ca_file alone"),
    )
    retire_client_roots: tuple[str, ...] = field(
        default=(),
        metadata=_about("client CA rotation, retire: roots to drop (files or SHA-256)"),
    )
    add_roots: tuple[str, ...] = field(
        default=(), metadata=_about("client trust: root certificate files to add to root.crt")
    )
    remove_roots: tuple[str, ...] = field(
        default=(), metadata=_about("client trust: roots to retire (files or SHA-256 fingerprints)")
    )

    @property
    def subject(self) -> Subject:
        """The CSR's subject: the fields of :data:`SUBJECT_FIELDS` and the SANs, checked.

        Raises:
            InputError: a field is malformed (parameters from :func:`load_params` never are).
        """
        return subject_from(
            {f.name: getattr(self, f.name) for f in SUBJECT_FIELDS}, self.subject_alt_names
        )

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


CLIENT_KEYS = ("os_user", "role", "subject")
IDENT_KEYS = ("map", "system_user", "role")
DRIVER_FILES = ("pk8",)


def _check_role(source: str, where: str, role: str) -> None:
    """A client's role as pg_hba.conf, pg_ident.conf and the certificate's CN must all hold
    it: one word the server keeps whole."""
    if len(role.encode()) > 63:
        raise InputError(
            f"{source}: {where}role {role!r} is longer than the 63 bytes PostgreSQL keeps of a "
            "role name; name a shorter role"
        )
    if any(c.isspace() or c in ',#"' or ord(c) < 32 or ord(c) == 127 for c in role):
        raise InputError(
            f"{source}: {where}role {role!r} holds a space, comma, '#' or double quote, which "
            "pg_hba.conf and pg_ident.conf would split or misread; name the role as one word"
        )


def _check_clients(source: str, known: Mapping[str, Any]) -> None:
    """The client-certificate runbook's parameters, every field, when they are read."""
    seen: set[str] = set()
    for i, client in enumerate(known.get("clients", ())):
        where = f"clients[{i}]: "
        unknown = [str(k) for k in client if k not in CLIENT_KEYS]
        if unknown:
            raise _unknown(source, unknown, CLIENT_KEYS, where=where)
        for key in ("os_user", "role"):
            if not isinstance(client.get(key), str) or not client[key].strip():
                raise InputError(f"{source}: {where}{key} is missing; name the client's {key}")
        if client["os_user"] in seen:
            raise InputError(
                f"{source}: {where}os_user {client['os_user']} is listed twice; one "
                "certificate per client OS user"
            )
        seen.add(str(client["os_user"]))
        _check_role(source, where, client["role"])
        subject = client.get("subject")
        if subject is not None and (not isinstance(subject, str) or "CN=" not in subject):
            raise InputError(
                f"{source}: {where}subject must be a DN with a CN, such as "
                f"'CN={client['role']},OU=dba,O=Example', not {subject!r}"
            )
    for i, line in enumerate(known.get("ident_maps", ())):
        unknown = [str(k) for k in line if k not in IDENT_KEYS]
        if unknown:
            raise _unknown(source, unknown, IDENT_KEYS, where=f"ident_maps[{i}]: ")
        missing = [k for k in IDENT_KEYS if not str(line.get(k) or "").strip()]
        if missing:
            raise InputError(
                f"{source}: ident_maps[{i}]: {', '.join(missing)} missing; each line names "
                "map, system_user (the CN or DN the certificate shows) and role"
            )
    wrong = [f for f in known.get("client_driver_files", ()) if f not in DRIVER_FILES]
    if wrong:
        raise InputError(
            f"{source}: client_driver_files: {', '.join(wrong)} is not one of "
            f"{', '.join(DRIVER_FILES)}"
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
    mode = known.get("ca_mode", "files")
    if mode not in ("lab", "files"):
        from pgtls_helpers.ca import backend_for

        backend_for(str(mode), known.get("ca_settings", {}), source)  # unusable: exit 2 now
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
    _check_clients(source, known)
    try:  # the subject as the CSR will carry it, with the checks of the form and `pgtls csr`
        subject_from(known, known.get("subject_alt_names", ()))
    except InputError as exc:
        raise InputError(f"{source}: {exc}") from None
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
    if out.get("client_crl_file"):
        out["client_crl_file"] = str(Path(str(out["client_crl_file"])).expanduser().resolve())
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


# --------------------------------------------------------------------------- the notebooks' cell
#
# A notebook holds plain values, as papermill injects them: lists for tuples, dicts for
# mappings, "" for an optional text that is not given; :func:`load_params` turns them back into
# exactly the values of :class:`Params`. The parameters cell is written from ``Params`` in that
# form, and ``pgtls run`` injects the values of a parameters file in the same form after it.

_CELL_HEAD = (
    "# The runbook's parameters, as Params (pgtls_helpers/runbook/params.py) declares them;\n"
    "# `make parameters-cells` writes this cell. `pgtls run PARAMS.yaml` injects a parameters\n"
    "# file's values after it (papermill); interactively, edit them here. Secrets are never\n"
    "# values here: a passphrase is read from the environment variable *named* below.\n"
)


def plain_annotation(hint: Any) -> str:
    """The annotation a parameter has in the notebooks: the plain form of its type in
    :class:`Params`, written with builtins only (a notebook evaluates it).

    >>> plain_annotation(tuple[str, ...]), plain_annotation(str | None)
    ('list[str]', 'str')
    >>> plain_annotation(tuple[Mapping[str, object], ...])
    'list[dict[str, object]]'
    """
    inner = _optional(hint)
    if inner is str:
        return "str"
    origin, args = _parts(hint)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"list[{plain_annotation(args[0])}]"
    if origin in (Mapping, dict) and len(args) == 2:
        return f"dict[{plain_annotation(args[0])}, {plain_annotation(args[1])}]"
    if hint in (str, int, bool, object):
        return str(hint.__name__)
    raise TypeError(f"no plain form for a parameter of type {hint!r}; add one here")


def _plain(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def plain_value(name: str, value: Any) -> Any:
    """A parameter's value as a notebook holds it (and papermill injects it).

    >>> plain_value("ca_files", ("a.crt",)), plain_value("pgdata", None)
    (['a.crt'], '')
    """
    if value is None and _optional(_TYPES[name]) is str:
        return ""
    return _plain(value)


def plain_values(params: Params) -> dict[str, Any]:
    """Every parameter of ``params`` as papermill injects it into a notebook."""
    return {name: plain_value(name, getattr(params, name)) for name in PARAMETER_NAMES}


def cell_defaults() -> dict[str, Any]:
    """What the parameters cell says for each parameter: its default in the plain form, and ""
    for one that has no default (``change_id``, ``common_name``: a parameters file sets them)."""
    out: dict[str, Any] = {}
    for f in fields(Params):
        if f.default is not MISSING:
            out[f.name] = plain_value(f.name, f.default)
        elif f.default_factory is not MISSING:
            out[f.name] = plain_value(f.name, f.default_factory())
        elif plain_annotation(_TYPES[f.name]) == "str":
            out[f.name] = ""
        else:
            raise TypeError(f"the required parameter {f.name} has no plain empty value")
    return out


def _literal(value: Any) -> str:
    """``value`` as a Python literal, strings in double quotes like the rest of the code."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_literal(k)}: {_literal(v)}" for k, v in value.items()) + "}"
    if value is None or isinstance(value, bool | int | float):
        return repr(value)
    raise TypeError(f"no literal for {value!r}")


def parameters_cell_source() -> str:
    """The source of the notebooks' ``parameters`` cell: one line per field of :class:`Params`,
    in its order, ``name: type = default  # meaning``.

    >>> parameters_cell_source().splitlines()[4]
    'change_id: str = ""  # required: names work/<change_id>/ and records/<change_id>/'
    """
    defaults = cell_defaults()
    lines = []
    for f in fields(Params):
        about = f.metadata["help"]
        if f.default is MISSING and f.default_factory is MISSING:
            about = f"required: {about}"
        annotation = plain_annotation(_TYPES[f.name])
        lines.append(f"{f.name}: {annotation} = {_literal(defaults[f.name])}  # {about}")
    return _CELL_HEAD + "\n".join(lines)


def _reads_params(nb: Any) -> bool:
    """Whether a notebook's parameters are the runbook's (it reads them with
    ``pgtls.notebook_params``), so its parameters cell is :func:`parameters_cell_source`."""
    return any(c.cell_type == "code" and "notebook_params(" in c.source for c in nb.cells)


def write_parameters_cells(notebooks_dir: str | Path, *, check: bool = False) -> list[Path]:
    """Write :func:`parameters_cell_source` into the ``parameters`` cell of every notebook in
    ``notebooks_dir`` that reads the runbook's parameters; returns the notebooks whose cell
    differed. With ``check`` nothing is written. The cell keeps its id and its ``parameters``
    tag, and is left without outputs."""
    import nbformat

    source = parameters_cell_source()
    changed = []
    for path in sorted(Path(notebooks_dir).glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        if not _reads_params(nb):
            continue
        cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        if len(cells) != 1:
            raise InputError(f"{path}: expected one cell tagged 'parameters', found {len(cells)}")
        cell = cells[0]
        if cell.source == source and not cell.outputs and cell.execution_count is None:
            continue
        changed.append(path)
        if not check:
            cell.source, cell.outputs, cell.execution_count = source, [], None
            nbformat.write(nb, path)
    return changed


def main(argv: list[str] | None = None) -> int:
    """``python -m pgtls_helpers.runbook.params --cells [--check] [DIR]``: write (or check) the
    notebooks' parameters cells from :class:`Params`."""
    import argparse

    from pgtls_helpers.runbook.runner import NOTEBOOKS_DIR

    parser = argparse.ArgumentParser(prog="python -m pgtls_helpers.runbook.params")
    parser.add_argument(
        "--cells",
        action="store_true",
        required=True,
        help="write the notebooks' parameters cells from Params",
    )
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 when a cell is out of date"
    )
    parser.add_argument("notebooks", nargs="?", default=str(NOTEBOOKS_DIR), metavar="DIR")
    args = parser.parse_args(argv)
    changed = write_parameters_cells(args.notebooks, check=args.check)
    verb = "out of date" if args.check else "rewritten"
    for path in changed:
        sys.stdout.write(f"{path}: parameters cell {verb}\n")
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
