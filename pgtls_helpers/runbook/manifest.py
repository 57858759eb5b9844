"""``manifest.json``, the record of one run, as a typed and versioned format.

A run of the runbook (``kind: change``), of ``pgtls trust`` (``kind: trust``) or of a rollback
(``kind: rollback``) leaves one :class:`Manifest`. The runner builds it from what each step
saved (``steps/<step>.json``, read here by :func:`from_steps`, the one place that knows those
shapes); the record's pages, the terminal summary, the change index and the fleet report render
from the typed object only, so a page can state only what a typed result holds.

On disk the manifest is JSON: :meth:`Manifest.to_json` writes every field under its own name
(nested records as objects, tuples as lists) with ``format`` = :data:`FORMAT`;
:func:`from_json` reads it back, and reads the older formats (1: a record sealed after a killed
run; 2: before this module) into the same type, a missing value becoming its default.
``from_json(m.to_json()) == m`` for every manifest.

Why one module of some 1000 lines: it is one file format (as CONVENTIONS asks of our formats):
every typed part of the record, its JSON and its older formats' readers, so a field is added in
one place and the format version goes with it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Literal, cast

__all__ = [
    "FORMAT",
    "Backout",
    "Certificate",
    "Check",
    "ClientCertificate",
    "ClientCrl",
    "ClientSubject",
    "ClientsUsed",
    "FileWrite",
    "Finding",
    "IdentMap",
    "JsonObject",
    "Lab",
    "Loop",
    "Manifest",
    "PlannedFile",
    "Renewal",
    "Served",
    "ServerState",
    "Session",
    "Setting",
    "StepRecord",
    "from_json",
    "from_steps",
]

FORMAT = 3

Kind = Literal["change", "trust", "clients", "rollback"]


class JsonObject:
    """A JSON object read defensively: a missing value, or one of the wrong type, reads as the
    default, so an old or damaged record still renders (saying what it does not hold)."""

    __slots__ = ("_d",)

    def __init__(self, value: object) -> None:
        self._d: Mapping[str, object] = value if isinstance(value, Mapping) else {}

    def __contains__(self, key: str) -> bool:
        return self._d.get(key) is not None

    def raw(self, key: str) -> object:
        return self._d.get(key)

    def text(self, key: str, default: str = "") -> str:
        value = self._d.get(key)
        return default if value is None else str(value)

    def opt(self, key: str) -> str | None:
        value = self._d.get(key)
        return None if value is None else str(value)

    def num(self, key: str) -> int | None:
        value = self._d.get(key)
        if isinstance(value, bool) or value is None:
            return None
        try:
            return int(cast("int | str | float", value))
        except (TypeError, ValueError):
            return None

    def real(self, key: str) -> float:
        value = self._d.get(key)
        return (
            float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0
        )

    def flag(self, key: str) -> bool:
        value = self._d.get(key)
        return value is True or str(value).lower() in ("true", "yes", "1")

    def opt_flag(self, key: str) -> bool | None:
        value = self._d.get(key)
        return value if isinstance(value, bool) else None

    def obj(self, key: str) -> JsonObject:
        return JsonObject(self._d.get(key))

    def objs(self, key: str) -> list[JsonObject]:
        value = self._d.get(key)
        return (
            [JsonObject(v) for v in value if isinstance(v, Mapping)]
            if isinstance(value, list)
            else []
        )

    def strs(self, key: str) -> tuple[str, ...]:
        value = self._d.get(key)
        if isinstance(value, str):
            return (value,)
        return tuple(str(v) for v in value if v is not None) if isinstance(value, list) else ()

    def texts(self, key: str) -> dict[str, str | None]:
        """An object of strings (settings by name); a non-string value as its text."""
        value = self._d.get(key)
        if not isinstance(value, Mapping):
            return {}
        return {str(k): None if v is None else str(v) for k, v in value.items()}

    def plain(self, key: str) -> dict[str, object]:
        value = self._d.get(key)
        return dict(value) if isinstance(value, Mapping) else {}


# --------------------------------------------------------------------------- the parts


@dataclass(frozen=True)
class Certificate:
    """A certificate as the record names it: its place in the chain, who, by whom, until."""

    role: str  # leaf, intermediate, root; "" for a served certificate
    subject: str
    issuer: str
    sha256: str
    not_after: str  # ISO 8601, UTC
    names: tuple[str, ...] = ()  # its DNS names and IP addresses (a leaf's SANs)

    @property
    def cn(self) -> str:
        found = re.search(r"(?:^|,)CN=((?:[^,\\]|\\.)+)", self.subject)
        return found.group(1) if found else self.subject

    def days_left(self, now: datetime | None = None) -> int | None:
        try:
            end = datetime.fromisoformat(self.not_after)
        except ValueError:
            return None
        if end.tzinfo is None:
            end = end.replace(tzinfo=timezone.utc)
        return (end - (now or datetime.now(timezone.utc))).days

    @classmethod
    def read(cls, j: JsonObject) -> Certificate:
        return cls(
            role=j.text("role"),
            subject=j.text("subject"),
            issuer=j.text("issuer"),
            sha256=j.text("sha256"),
            not_after=j.text("not_after"),
            names=j.strs("names"),
        )


@dataclass(frozen=True)
class ClientCertificate:
    """A client's certificate (``pgtls clients``): who it is for, the DN forms the server
    matches and prints, and by whom until when."""

    os_user: str
    role: str
    subject: str
    hba_dn: str  # as a clientname=DN map matches it
    stat_ssl_dn: str  # as pg_stat_ssl.client_dn prints it
    serial: str
    issuer: str
    not_after: str
    sha256: str

    @classmethod
    def read(cls, j: JsonObject) -> ClientCertificate:
        return cls(
            os_user=j.text("os_user"),
            role=j.text("role"),
            subject=j.text("subject"),
            hba_dn=j.text("hba_dn"),
            stat_ssl_dn=j.text("stat_ssl_dn"),
            serial=j.text("serial"),
            issuer=j.text("issuer"),
            not_after=j.text("not_after"),
            sha256=j.text("sha256"),
        )


@dataclass(frozen=True)
class ClientCrl:
    """A CRL step c4 installed as the server's ``ssl_crl_file`` (``client_crl_file``)."""

    file: str  # the ssl_crl_file it is in
    issuer: str
    last_update: str  # ISO 8601, UTC
    next_update: str | None
    revoked: int  # how many certificates it revokes
    sha256: str  # of its DER

    @classmethod
    def read(cls, j: JsonObject, file: str = "") -> ClientCrl:
        return cls(
            file=j.text("file", file),
            issuer=j.text("issuer"),
            last_update=j.text("last_update"),
            next_update=j.opt("next_update"),
            revoked=j.num("revoked") or 0,
            sha256=j.text("sha256"),
        )


@dataclass(frozen=True)
class ClientSubject:
    """A client as a client change asks for it: its OS user, its role, and the subject its
    CSR carries (RFC 4514: ``CN=<role>``, or the DN given)."""

    os_user: str
    role: str
    subject: str

    @classmethod
    def read(cls, j: JsonObject) -> ClientSubject:
        return cls(os_user=j.text("os_user"), role=j.text("role"), subject=j.text("subject"))


@dataclass(frozen=True)
class IdentMap:
    """A ``pg_ident.conf`` line a client change asks for."""

    map: str
    system_user: str
    role: str

    @classmethod
    def read(cls, j: JsonObject) -> IdentMap:
        return cls(map=j.text("map"), system_user=j.text("system_user"), role=j.text("role"))


@dataclass(frozen=True)
class ClientsUsed:
    """The clients and ``pg_ident.conf`` lines the steps of a client change used, and where
    they came from: the parameters file (``saved_in`` None), or step c1's form, whose
    ``client_subjects.json`` (``saved_in``) replaces the parameters file's lists; then
    ``parameters_clients`` and ``parameters_ident_maps`` are what the parameters file says.

    Each client step's summary keeps one (``clients_used``, written by :meth:`to_json`) without
    the parameters file's lists, which the record adds from the parameters it ran with."""

    saved_in: str | None
    clients: tuple[ClientSubject, ...]
    ident_maps: tuple[IdentMap, ...]
    parameters_clients: tuple[ClientSubject, ...] = ()
    parameters_ident_maps: tuple[IdentMap, ...] = ()

    @property
    def from_form(self) -> bool:
        return self.saved_in is not None

    @property
    def differs(self) -> bool:
        """The form's values are not the parameters file's."""
        return self.from_form and (
            self.clients != self.parameters_clients or self.ident_maps != self.parameters_ident_maps
        )

    @property
    def source(self) -> str:
        """Where the clients came from, in one line for a page or the terminal."""
        if self.saved_in is None:
            return "clients and ident_maps: from the parameters file"
        than = "not the parameters file" if self.differs else "the same as the parameters file"
        return f"clients and ident_maps: from the c1 form ({self.saved_in}), {than}"

    @property
    def parameters_said(self) -> str:
        """What the parameters file says, when the form's values replaced it ("" otherwise)."""
        if not self.differs:
            return ""
        said = "; ".join(f"{c.os_user} as {c.role}: {c.subject}" for c in self.parameters_clients)
        maps = "; ".join(f"{m.map} {m.system_user} {m.role}" for m in self.parameters_ident_maps)
        return (
            f"the parameters file says clients {said or '(none)'}; "
            f"pg_ident.conf lines {maps or '(none)'}"
        )

    def to_json(self) -> dict[str, object]:
        return cast("dict[str, object]", _plain(dataclasses.asdict(self)))

    @classmethod
    def read(cls, j: JsonObject) -> ClientsUsed:
        return cls(
            saved_in=j.opt("saved_in"),
            clients=tuple(ClientSubject.read(c) for c in j.objs("clients")),
            ident_maps=tuple(IdentMap.read(m) for m in j.objs("ident_maps")),
            parameters_clients=tuple(ClientSubject.read(c) for c in j.objs("parameters_clients")),
            parameters_ident_maps=tuple(IdentMap.read(m) for m in j.objs("parameters_ident_maps")),
        )


@dataclass(frozen=True)
class Served:
    """What the server presented when the record looked: its leaf."""

    subject: str
    sha256: str
    not_after: str
    days_left: int | None
    tls_version: str | None

    @classmethod
    def read(cls, j: JsonObject) -> Served:
        return cls(
            subject=j.text("subject"),
            sha256=j.text("sha256"),
            not_after=j.text("not_after"),
            days_left=j.num("days_left"),
            tls_version=j.opt("tls_version"),
        )


@dataclass(frozen=True)
class ServerState:
    """The server's TLS settings and what it served, before or after the run."""

    settings: Mapping[str, str | None]
    served: Served | None
    error: str | None

    @classmethod
    def read(cls, j: JsonObject) -> ServerState:
        return cls(
            settings=j.texts("settings"),
            served=Served.read(j.obj("served")) if "served" in j else None,
            error=j.opt("error"),
        )


@dataclass(frozen=True)
class FileWrite:
    """A server or client file the run wrote (or found as planned: ``unchanged``)."""

    target: str
    kind: str
    action: str  # create, replace, unchanged
    sha256: str
    previous_sha256: str | None
    backup: str | None

    @property
    def written(self) -> bool:
        return self.action in ("create", "replace")

    @classmethod
    def read(cls, j: JsonObject) -> FileWrite:
        return cls(
            target=j.text("target"),
            kind=j.text("kind"),
            action=j.text("action"),
            sha256=j.text("sha256"),
            previous_sha256=j.opt("previous_sha256"),
            backup=j.opt("backup"),
        )


@dataclass(frozen=True)
class PlannedFile:
    """A file the plan would write: where, and its hash now and as planned (never content)."""

    target: str
    kind: str
    action: str  # create, replace, unchanged
    sha256: str
    current_sha256: str | None
    owner: str = ""
    mode: str = ""
    user: str | None = None  # the client OS user, for a root.crt

    @property
    def would_write(self) -> bool:
        return self.action in ("create", "replace")

    @classmethod
    def read(cls, j: JsonObject) -> PlannedFile:
        return cls(
            target=j.text("target"),
            kind=j.text("kind"),
            action=j.text("action"),
            sha256=j.text("sha256"),
            current_sha256=j.opt("current_sha256"),
            owner=j.text("owner"),
            mode=j.text("mode"),
            user=j.opt("user"),
        )


@dataclass(frozen=True)
class Setting:
    """A server setting: its value before and after (for a plan: now and as planned)."""

    name: str
    before: str | None
    after: str | None

    @property
    def changes(self) -> bool:
        return self.before != self.after

    @classmethod
    def read(cls, j: JsonObject) -> Setting:
        return cls(name=j.text("name"), before=j.opt("before"), after=j.opt("after"))


@dataclass(frozen=True)
class Check:
    """One connection check: what it must do, what libpq did."""

    check: str
    expect: str
    observed: str
    passed: bool
    detail: str

    @classmethod
    def read(cls, j: JsonObject) -> Check:
        return cls(
            check=j.text("check"),
            expect=j.text("expect"),
            observed=j.text("observed"),
            passed=j.raw("passed") is True,
            detail=j.text("detail") or j.text("observed_reason"),
        )


@dataclass(frozen=True)
class Session:
    """A session connected without SSL when the plan was made, that the new rules refuse."""

    user: str
    database: str
    client_addr: str
    application_name: str
    line: str

    @classmethod
    def read(cls, j: JsonObject) -> Session:
        return cls(
            user=j.text("user"),
            database=j.text("database"),
            client_addr=j.text("client_addr"),
            application_name=j.text("application_name"),
            line=j.text("line"),
        )


@dataclass(frozen=True)
class Finding:
    """A check's result on the CA's answer or the plan: error, warning or info."""

    severity: str
    code: str
    message: str

    @classmethod
    def read(cls, j: JsonObject) -> Finding:
        return cls(severity=j.text("severity"), code=j.text("code"), message=j.text("message"))


@dataclass(frozen=True)
class Loop:
    """The verify-full client that connected again and again through the reload."""

    connections: int
    failed: int
    seconds: float

    @classmethod
    def read(cls, j: JsonObject) -> Loop:
        return cls(
            connections=j.num("connections") or 0,
            failed=j.num("failed") or 0,
            seconds=j.real("seconds"),
        )


@dataclass(frozen=True)
class Renewal:
    """A change on a server that served TLS already: which kind, and the reload's proof."""

    kind: str  # renewal, renewal (intermediates change), CA rotation, no change
    served_root: str | None
    new_root: str | None
    names_added: tuple[str, ...]
    names_dropped: tuple[str, ...]
    served_before: str | None  # sha256 of the leaf served before the reload
    served_after: str | None
    loop: Loop | None

    @classmethod
    def read(cls, j: JsonObject) -> Renewal:
        return cls(
            kind=j.text("kind"),
            served_root=j.opt("served_root"),
            new_root=j.opt("new_root"),
            names_added=j.strs("names_added"),
            names_dropped=j.strs("names_dropped"),
            served_before=j.opt("served_before"),
            served_after=j.opt("served_after"),
            loop=Loop.read(j.obj("loop")) if "loop" in j else None,
        )


@dataclass(frozen=True)
class StepRecord:
    """One step of the run: its status and time, and its notebook and page in the record."""

    step: str
    title: str
    status: str  # ok, failed, skipped, not-run, interrupted
    seconds: float = 0.0
    error: str | None = None
    note: str | None = None
    notebook: str | None = None
    html: str | None = None

    @property
    def number(self) -> str:
        """How pages number it: ``4`` for 04_enable_ssl, ``c2`` for c2_client_certs."""
        found = re.match(r"(c?)0*(\d+)_", self.step)
        return found.group(1) + found.group(2) if found else self.step

    @classmethod
    def read(cls, j: JsonObject) -> StepRecord:
        return cls(
            step=j.text("step"),
            title=j.text("title"),
            status=j.text("status"),
            seconds=j.real("seconds"),
            error=j.opt("error"),
            note=j.opt("note"),
            notebook=j.opt("notebook"),
            html=j.opt("html"),
        )


@dataclass(frozen=True)
class Lab:
    """The throwaway lab cluster a run used (removed after it)."""

    port: int | None
    client_user: str | None

    @classmethod
    def read(cls, j: JsonObject) -> Lab:
        return cls(port=j.num("port"), client_user=j.opt("client_user"))


@dataclass(frozen=True)
class Backout:
    """A file a rollback puts back: removed (the change created it) or restored."""

    target: str
    kind: str
    what: str
    backup: str | None
    done: bool | None = None  # None: a dry run, nothing was done

    @classmethod
    def read(cls, j: JsonObject) -> Backout:
        return cls(
            target=j.text("target"),
            kind=j.text("kind"),
            what=j.text("what"),
            backup=j.opt("backup"),
            done=j.opt_flag("done"),
        )


# --------------------------------------------------------------------------- the manifest


@dataclass(frozen=True)
class Manifest:
    """Everything a record says about one run; see the module's docstring."""

    kind: Kind
    change_id: str
    outcome: str  # ok, failed, waiting-for-ca, interrupted; rollback: ok, planned, not-as-before
    server: str = ""
    format: int = FORMAT
    exit_code: int | None = None
    error: str | None = None
    apply: bool = False
    dry_run: bool = False  # a rollback's --dry-run
    ca_mode: str | None = None
    operator: str = ""
    host: str = ""
    host_fqdn: str | None = None
    started_utc: str | None = None
    finished_utc: str | None = None
    seconds: float = 0.0
    parameters_file: str = ""
    parameters_file_sha256: str | None = None
    parameters: Mapping[str, object] = field(default_factory=dict)  # secrets redacted
    parameters_as_given: Mapping[str, object] = field(default_factory=dict)
    versions: Mapping[str, str | None] = field(default_factory=dict)
    lab: Lab | None = None
    steps: tuple[StepRecord, ...] = ()
    # step 1
    key_type: str | None = None
    key_encrypted: bool | None = None
    csr_file: str | None = None
    csr_sha256: str | None = None
    public_key_sha256: str | None = None
    # step 2: the chain to be installed, leaf first
    certificates: tuple[Certificate, ...] = ()
    unused_certificates: tuple[str, ...] = ()
    findings: tuple[Finding, ...] = ()
    verifier: str | None = None
    signed_by: str | None = None  # a CA back-end that signed (or failed to), and its reference
    ca_reference: str | None = None
    # steps 3 and 4, and pgtls trust: what was written, or would be
    files: tuple[FileWrite, ...] = ()
    planned_files: tuple[PlannedFile, ...] = ()
    settings: tuple[Setting, ...] = ()
    settings_applied: bool = False
    hba_diff: str = ""
    hba_added: tuple[str, ...] = ()
    hba_written: bool = False
    ident_diff: str = ""  # pg_ident.conf (the client-certificate runbook)
    sessions_refused: tuple[Session, ...] | None = None
    presented_chain: tuple[Certificate, ...] = ()
    tls_version: str | None = None
    renewal: Renewal | None = None
    trust_added: tuple[Certificate, ...] = ()  # roots pgtls trust adds to root.crt
    client_certificates: tuple[ClientCertificate, ...] = ()  # pgtls clients
    trust_removed: tuple[str, ...] = ()
    client_crls: tuple[ClientCrl, ...] = ()  # pgtls clients: the CRLs c4 put in ssl_crl_file
    clients_used: ClientsUsed | None = None  # pgtls clients: the clients and their source
    # step 5 (or pgtls trust's proof)
    verdict: str | None = None
    checks: tuple[Check, ...] = ()
    server_before: ServerState | None = None
    server_after: ServerState | None = None
    rollback_command: str | None = None
    in_place: tuple[str, ...] = ()
    # a rollback
    backout: tuple[Backout, ...] = ()
    reset_settings: Mapping[str, str | None] = field(default_factory=dict)
    reloaded: str | None = None
    server_running: bool | None = None
    problems: tuple[str, ...] = ()
    sealed_at: str | None = None  # a record sealed by the next run after a kill
    interactive: str | None = None  # a run made in JupyterLab: who prepared and confirmed it
    record_files: Mapping[str, str] = field(default_factory=dict)

    # ------------------------------------------------------------------ what it means

    @property
    def leaf(self) -> Certificate | None:
        """The certificate the change installs (step 2's leaf)."""
        return next((c for c in self.certificates if c.role == "leaf"), None)

    @property
    def failed_step(self) -> StepRecord | None:
        return next((s for s in self.steps if s.status == "failed"), None)

    @property
    def written(self) -> tuple[FileWrite, ...]:
        return tuple(f for f in self.files if f.written)

    @property
    def changed(self) -> bool:
        """Whether the run changed the server or a client: a file written, a setting set."""
        return bool(self.written) or self.settings_applied

    @property
    def checks_passed(self) -> int:
        return sum(1 for c in self.checks if c.passed)

    @property
    def result(self) -> str:
        """The run's outcome in words a change manager uses."""
        if self.kind == "rollback":
            if self.outcome == "failed":
                return f"rollback failed: {self.error}"
            if self.dry_run:
                return "dry run: nothing restored"
            if self.outcome == "nothing":
                return "nothing to roll back"
            return "rolled back"
        if self.outcome == "interrupted":
            return "interrupted"
        if self.outcome == "failed":
            failed = self.failed_step
            where = f"step {failed.number} {failed.title}" if failed else "set-up"
            return f"failed at {where}"
        if self.outcome == "waiting-for-ca":
            return "waiting for the CA: CSR made, nothing on the server changed"
        if not self.apply:
            return "plan: no change made"
        if not self.changed:
            return "no change: already as planned"
        return "changed and proven" if self.verdict == "pass" else "changed"

    @property
    def mode(self) -> str:
        if self.kind == "rollback":
            return "dry run" if self.dry_run else "rollback"
        if self.outcome == "waiting-for-ca":
            return "phase 1 (CSR)"
        if self.interactive:
            return "interactive apply"
        return "apply" if self.apply else "plan"

    # ------------------------------------------------------------------ on disk

    def to_json(self) -> dict[str, object]:
        """The JSON object of ``manifest.json``: every field under its own name."""
        return cast("dict[str, object]", _plain(dataclasses.asdict(self)))


def _plain(value: object) -> object:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _kind(j: JsonObject) -> Kind:
    kind = j.text("kind", "change")
    return cast(Kind, kind) if kind in ("change", "trust", "clients", "rollback") else "change"


def from_json(data: object) -> Manifest:
    """A manifest read from its JSON object, of this format or an older one."""
    j = JsonObject(data)
    kind = _kind(j)
    old = (j.num("format") or j.num("record_format") or 1) < FORMAT
    if kind == "rollback" and (old or "backout" not in j):  # format 2 named them files
        backout = tuple(Backout.read(f) for f in j.objs("files"))
        files: tuple[FileWrite, ...] = ()
        reset = j.texts("settings")
        settings: tuple[Setting, ...] = ()
    else:
        backout = tuple(Backout.read(f) for f in j.objs("backout"))
        files = tuple(FileWrite.read(f) for f in j.objs("files"))
        reset = j.texts("reset_settings")
        settings = tuple(Setting.read(s) for s in j.objs("settings"))
    if old and kind != "rollback":
        renewal = _renewal_of(j.obj("renewal").obj("plan"), j.obj("renewal").obj("reload"))
        steps = tuple(StepRecord.read(s) for s in j.objs("steps")) or tuple(
            StepRecord(step=name, title="", status="interrupted")
            for name in j.strs("steps_with_a_summary")
        )
    else:
        renewal = Renewal.read(j.obj("renewal")) if "renewal" in j else None
        steps = tuple(StepRecord.read(s) for s in j.objs("steps"))
    if old and kind == "change" and any(s.step == "client_trust" for s in steps):
        kind = "trust"
    sessions = j.objs("sessions_refused") if "sessions_refused" in j else None
    return Manifest(
        kind=kind,
        change_id=j.text("change_id"),
        outcome=j.text("outcome", "unknown"),
        server=j.text("server"),
        format=j.num("format") or j.num("record_format") or 1,
        exit_code=j.num("exit_code"),
        error=j.opt("error"),
        apply=j.flag("apply"),
        dry_run=j.flag("dry_run"),
        ca_mode=j.opt("ca_mode") or j.obj("parameters").opt("ca_mode"),
        operator=j.text("operator"),
        host=j.text("host"),
        host_fqdn=j.opt("host_fqdn"),
        started_utc=j.opt("started_utc"),
        finished_utc=j.opt("finished_utc"),
        seconds=j.real("seconds"),
        parameters_file=j.text("parameters_file"),
        parameters_file_sha256=j.opt("parameters_file_sha256"),
        parameters=j.plain("parameters"),
        parameters_as_given=j.plain("parameters_as_given"),
        versions=j.texts("versions"),
        lab=Lab.read(j.obj("lab")) if "lab" in j else None,
        steps=steps,
        key_type=j.opt("key_type"),
        key_encrypted=j.opt_flag("key_encrypted"),
        csr_file=j.opt("csr_file"),
        csr_sha256=j.opt("csr_sha256"),
        public_key_sha256=j.opt("public_key_sha256"),
        certificates=tuple(Certificate.read(c) for c in j.objs("certificates")),
        unused_certificates=j.strs("unused_certificates"),
        findings=tuple(Finding.read(f) for f in j.objs("findings")),
        verifier=j.opt("verifier"),
        signed_by=j.opt("signed_by"),
        ca_reference=j.opt("ca_reference"),
        files=files,
        planned_files=tuple(PlannedFile.read(p) for p in j.objs("planned_files")),
        settings=settings,
        settings_applied=j.flag("settings_applied"),
        hba_diff=j.text("hba_diff"),
        hba_added=j.strs("hba_added"),
        hba_written=j.flag("hba_written"),
        ident_diff=j.text("ident_diff"),
        sessions_refused=tuple(Session.read(s) for s in sessions) if sessions is not None else None,
        presented_chain=tuple(Certificate.read(c) for c in j.objs("presented_chain")),
        tls_version=j.opt("tls_version"),
        renewal=renewal,
        trust_added=tuple(Certificate.read(c) for c in j.objs("trust_added")),
        trust_removed=j.strs("trust_removed"),
        client_certificates=tuple(ClientCertificate.read(c) for c in j.objs("client_certificates")),
        client_crls=tuple(ClientCrl.read(c) for c in j.objs("client_crls")),
        clients_used=ClientsUsed.read(j.obj("clients_used")) if "clients_used" in j else None,
        verdict=j.opt("verdict"),
        checks=tuple(Check.read(c) for c in j.objs("checks")),
        server_before=ServerState.read(j.obj("server_before")) if "server_before" in j else None,
        server_after=ServerState.read(j.obj("server_after")) if "server_after" in j else None,
        rollback_command=j.opt("rollback_command"),
        in_place=j.strs("in_place"),
        backout=backout,
        reset_settings=reset,
        reloaded=j.opt("reloaded"),
        server_running=j.opt_flag("server_running"),
        problems=j.strs("problems"),
        sealed_at=j.opt("sealed_at"),
        interactive=j.opt("interactive"),
        record_files={k: v or "" for k, v in j.texts("record_files").items()},
    )


# --------------------------------------------------------------------------- from the steps


def _renewal_of(plan: JsonObject, reload: JsonObject) -> Renewal | None:
    """A renewal from step 3's renewal plan and step 4's reload (each may be missing)."""
    if "kind" not in plan:
        return None
    loop = reload.obj("client_loop")
    return Renewal(
        kind=plan.text("kind"),
        served_root=plan.opt("served_root"),
        new_root=plan.opt("new_root"),
        names_added=plan.strs("names_added"),
        names_dropped=plan.strs("names_dropped"),
        served_before=reload.obj("served_before").opt("sha256"),
        served_after=reload.obj("served_after").opt("sha256"),
        loop=Loop.read(loop) if "connections" in loop else None,
    )


def _client_renewal(c3: JsonObject) -> Renewal | None:
    """The client runbook's c3 replacing installed client certificates under a client loop."""
    loop = c3.obj("client_loop")
    if "connections" not in loop:
        return None
    return Renewal(
        kind="client certificates renewed",
        served_root=None,
        new_root=None,
        names_added=(),
        names_dropped=(),
        served_before=None,
        served_after=None,
        loop=Loop.read(loop),
    )


@dataclass(frozen=True)
class StepFacts:
    """What the steps' summaries say, typed: the part of a manifest the steps decide."""

    key_type: str | None = None
    key_encrypted: bool | None = None
    csr_file: str | None = None
    csr_sha256: str | None = None
    public_key_sha256: str | None = None
    certificates: tuple[Certificate, ...] = ()
    unused_certificates: tuple[str, ...] = ()
    findings: tuple[Finding, ...] = ()
    verifier: str | None = None
    signed_by: str | None = None
    ca_reference: str | None = None
    files: tuple[FileWrite, ...] = ()
    planned_files: tuple[PlannedFile, ...] = ()
    planned_settings: Mapping[str, tuple[str | None, str | None]] = field(default_factory=dict)
    settings_applied: bool = False
    enable_changed: bool = False  # step 4 changed the server (settings, pg_hba.conf, reload)
    hba_diff: str = ""
    hba_added: tuple[str, ...] = ()
    hba_written: bool = False
    ident_diff: str = ""
    sessions_refused: tuple[Session, ...] | None = None
    presented_chain: tuple[Certificate, ...] = ()
    tls_version: str | None = None
    renewal: Renewal | None = None
    trust_added: tuple[Certificate, ...] = ()
    trust_removed: tuple[str, ...] = ()
    client_certificates: tuple[ClientCertificate, ...] = ()
    client_crls: tuple[ClientCrl, ...] = ()
    clients_used: ClientsUsed | None = None
    verdict: str | None = None
    checks: tuple[Check, ...] = ()

    def settings(
        self, before: ServerState | None, after: ServerState | None
    ) -> tuple[Setting, ...]:
        """Applied: each setting as the server showed it before and after. Otherwise: each
        setting now, and as planned (``ssl off → on``)."""
        was = dict(before.settings) if before else {}
        if self.enable_changed:
            now = dict(after.settings) if after else {}
            names = list(dict.fromkeys([*was, *now]))
            return tuple(Setting(n, was.get(n), now.get(n)) for n in names)
        names = list(dict.fromkeys([*was, *self.planned_settings]))
        out = []
        for n in names:
            current = was.get(
                n, self.planned_settings[n][0] if n in self.planned_settings else None
            )
            planned = self.planned_settings[n][1] if n in self.planned_settings else current
            out.append(Setting(n, current, planned))
        return tuple(out)


def from_steps(summaries: Mapping[str, object]) -> StepFacts:
    """The typed facts of a run from its steps' summaries (``steps/<step>.json`` by name)."""
    s1 = JsonObject(summaries.get("01_key_and_csr"))
    s2 = JsonObject(summaries.get("02_ca_response"))
    s3 = JsonObject(summaries.get("03_install_files"))
    s4 = JsonObject(summaries.get("04_enable_ssl"))
    s5 = JsonObject(summaries.get("05_verify_clients"))
    trust = JsonObject(summaries.get("client_trust"))
    c1 = JsonObject(summaries.get("c1_client_keys"))
    c2 = JsonObject(summaries.get("c2_client_certs"))
    c3 = JsonObject(summaries.get("c3_install_clients"))
    c4 = JsonObject(summaries.get("c4_server_trust"))
    c5 = JsonObject(summaries.get("c5_verify_clients"))
    # each client step keeps the clients it used; the first that ran speaks for the run
    used = [s.obj("clients_used") for s in (c1, c2, c3, c4, c5) if "clients_used" in s]
    # the server side of the change: step 4, or the client runbook's server step
    server = c4 if "c4_server_trust" in summaries else s4
    proof = next((p for p in (trust, c5) if "verdict" in p or "checks" in p), s5)
    planned = {
        s.text("name"): (s.opt("before"), s.opt("after")) for s in server.objs("settings_planned")
    }
    sessions = server.objs("sessions_refused") if "sessions_refused" in server else None
    writes = [*s3.objs("installed"), *s4.objs("installed"), *trust.objs("installed")]
    writes += [*c3.objs("installed"), *c4.objs("installed")]
    plans = [*s3.objs("planned_files"), *trust.objs("planned_files")]
    plans += [*c3.objs("planned_files"), *c4.objs("planned_files")]
    c4_wrote = any(FileWrite.read(f).written for f in c4.objs("installed"))
    return StepFacts(
        key_type=s1.opt("key_type"),
        key_encrypted=s1.opt_flag("key_encrypted"),
        csr_file=s1.opt("csr_file"),
        csr_sha256=s1.opt("csr_sha256"),
        public_key_sha256=s1.opt("public_key_sha256"),
        certificates=tuple(Certificate.read(c) for c in s2.objs("chain")),
        unused_certificates=s2.strs("unused"),
        findings=tuple(Finding.read(f) for f in s2.objs("findings")),
        verifier=s2.opt("verifier"),
        signed_by=None if "ca_failure" in s2 else s2.opt("signed_by"),
        ca_reference=s2.opt("ca_reference"),
        files=tuple(FileWrite.read(f) for f in writes),
        planned_files=tuple(PlannedFile.read(p) for p in plans),
        planned_settings=planned,
        settings_applied=server.flag("settings_applied"),
        enable_changed=s4.flag("changed") or c4_wrote,
        hba_diff=server.text("hba_diff"),
        hba_added=server.strs("hba_added"),
        hba_written=server.flag("hba_written"),
        ident_diff=c4.text("ident_diff"),
        sessions_refused=tuple(Session.read(s) for s in sessions) if sessions is not None else None,
        presented_chain=tuple(Certificate.read(c) for c in s4.objs("presented")),
        tls_version=s4.opt("tls_version"),
        renewal=_renewal_of(s3.obj("renewal"), s4.obj("renewal")) or _client_renewal(c3),
        trust_added=tuple(Certificate.read(c) for c in trust.objs("added")),
        trust_removed=trust.strs("removed")
        or tuple(Certificate.read(c).subject for c in c4.objs("roots_retired")),
        client_certificates=tuple(ClientCertificate.read(c) for c in c2.objs("clients")),
        client_crls=tuple(ClientCrl.read(c, c4.text("ssl_crl_file")) for c in c4.objs("crls")),
        clients_used=ClientsUsed.read(used[0]) if used else None,
        verdict=proof.opt("verdict"),
        checks=tuple(Check.read(c) for c in proof.objs("checks")),
    )
