"""Steps c4 and c5 of the client-certificate runbook: the server trusts the clients' CA, and
each client proves who it is.

c4 (``c4_server_trust``) plans three edits of a server that already serves TLS: the client roots
merged into ``ssl_ca_file`` (or a new ``client_ca.crt`` in the data directory and
``ALTER SYSTEM SET ssl_ca_file``), the ``cert`` / ``clientcert=verify-full`` lines of
``pg_hba.conf`` (placed as step 4 places its lines), and the ``pg_ident.conf`` maps. Every check
runs before the first write: the throwaway backend parses both planned files, the runbook's own
login must still be accepted, each client's connection must reach a certificate line, and each
map must hold the identity the server will look up. Then the writes are journaled, one reload
is confirmed, and any failure puts every file back byte for byte.

c5 (``c5_verify_clients``) connects as each client OS user with its own files only and compares
``pg_stat_ssl`` with its certificate; the must-fail checks each fail for their own reason, with
certificates made on the fly in a temporary folder of that user's. A failed check undoes the
change's journal (c3 and c4).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from pgtls_helpers.errors import InputError, PreflightError, ServerError
from pgtls_helpers.lab import LabCA
from pgtls_helpers.pki import chain as chainmod
from pgtls_helpers.postgres import files, hba, hbacheck, ident, sessions
from pgtls_helpers.postgres.clients import ClientUser, read_client_file, resolve_client_users
from pgtls_helpers.postgres.hba import HbaPlan, HbaRule
from pgtls_helpers.postgres.ident import IdentPlan
from pgtls_helpers.postgres.lock import change_lock
from pgtls_helpers.postgres.server import Server, ServerFacts
from pgtls_helpers.postgres.targets import TargetPolicy
from pgtls_helpers.runbook.client_subjects import with_saved_clients
from pgtls_helpers.runbook.common import address_of, open_server, pem_of, save_step, server_before
from pgtls_helpers.runbook.enable import EnablePlan, check_enable, prove_hba
from pgtls_helpers.runbook.journal import Journal
from pgtls_helpers.runbook.params import Params
from pgtls_helpers.runbook.renewal import cert_row
from pgtls_helpers.runbook.trust import load_certs as load_ca_certs
from pgtls_helpers.runbook.trust import parse_fingerprint
from pgtls_helpers.runbook.undo import undo_change

__all__ = [
    "ClientProofResult",
    "ExpectedIdentity",
    "ProofCheck",
    "ServerTrustPlan",
    "ServerTrustResult",
    "asked_ca_names",
    "check_server_trust",
    "expected_identity",
    "plan_server_trust",
    "step_c4_server_trust",
    "step_c5_verify_clients",
]

C4 = "c4_server_trust"
C5 = "c5_verify_clients"
JOURNAL_STEP = "client_server"  # the journal's name for step c4
CLIENT_CA_NAME = "client_ca.crt"  # in the data directory, when ssl_ca_file is empty
_REMOVED_CLIENTCERT = ("1", "0", "no-verify")


def _roots_file(params: Params) -> Path:
    """Where step c2 leaves the distinct roots that issued the clients' certificates."""
    return params.work.path / "clients" / "roots.pem"


def _client_crt(user: ClientUser) -> Path:
    return user.home / ".postgresql" / "postgresql.crt"


def _option(rule: HbaRule, name: str) -> str | None:
    for opt in rule.options:
        key, _, value = opt.partition("=")
        if key == name:
            return value
    return None


def _asks_certificate(rule: HbaRule) -> bool:
    """The line asks the client for a certificate and checks who it names."""
    return rule.method == "cert" or _option(rule, "clientcert") == "verify-full"


def _check_rule_options(rules: Sequence[HbaRule]) -> None:
    for i, rule in enumerate(rules):
        value = _option(rule, "clientcert")
        if value in _REMOVED_CLIENTCERT:
            raise InputError(
                f"hba_rules[{i}]: clientcert={value} was removed in PostgreSQL 14; write "
                "clientcert=verify-full (the certificate must name the role) or "
                "clientcert=verify-ca (any certificate of a trusted CA)"
            )
        if value is not None and value not in ("verify-ca", "verify-full"):
            raise InputError(f"hba_rules[{i}]: clientcert={value} is not verify-ca or verify-full")
        name = _option(rule, "clientname")
        if name is not None and name not in ("CN", "DN"):
            raise InputError(f"hba_rules[{i}]: clientname={name} is not CN or DN")


def _user_matches(field_value: str, role: str) -> bool:
    return any(u in ("all", role) for u in field_value.split(","))


def client_rule(rules: Sequence[HbaRule], role: str, default_db: str) -> tuple[HbaRule, str] | None:
    """The first certificate line of ``rules`` for ``role``, and the database a check of
    that client connects to (the line's own, else ``default_db``)."""
    for rule in rules:
        if _asks_certificate(rule) and _user_matches(rule.user, role):
            first = rule.database.split(",")[0]
            if first == "sameuser":
                return rule, role
            keyword = first in ("all", "samerole", "samegroup", "replication")
            return rule, default_db if keyword or first.startswith("+") else first
    return None


# --------------------------------------------------------------------------- c4: plan


@dataclass(frozen=True)
class ClientIdentity:
    """One client as the server will see it: the names a map or the role is compared with."""

    os_user: str
    role: str
    database: str
    hba_line: str
    subject: str  # RFC 4514, as the parameters or the installed certificate give it
    server_dn: str  # what clientname=DN compares (RFC 2253, OpenSSL's escaping)
    common_name: str  # what clientname=CN (the default) compares
    stat_ssl_dn: str  # what pg_stat_ssl.client_dn will show
    system_user: str  # the one of the two this client's line compares
    map: str | None
    from_certificate: bool  # read from the installed postgresql.crt (else from the subject)

    def row(self) -> dict[str, object]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class ServerTrustPlan:
    """What step c4 would change on this server, decided before anything is touched."""

    facts: ServerFacts
    ident_file: Path
    ca_target: Path
    ca_file: files.PlannedFile
    roots_before: tuple[x509.Certificate, ...]
    roots_after: tuple[x509.Certificate, ...]
    settings: dict[str, str]
    hba: HbaPlan
    hba_mode: int
    hba_owner: tuple[int, int]
    ident: IdentPlan
    ident_mode: int
    ident_owner: tuple[int, int]
    identities: tuple[ClientIdentity, ...]
    rules: tuple[HbaRule, ...]
    host_ip: str
    sessions_refused: list[dict[str, object]]
    writes: tuple[files.PlannedFile, ...]  # ssl_ca_file, pg_ident.conf, pg_hba.conf
    roots_retired: tuple[x509.Certificate, ...] = ()  # retire_client_roots found in ssl_ca_file

    @property
    def changes(self) -> bool:
        return (
            self.ca_file.action != "unchanged"
            or bool(self.settings)
            or self.hba.changed
            or self.ident.changed
        )

    def planned_files(self) -> list[files.PlannedFile]:
        """The files c4 writes, as planned (before any write), in the order written."""
        return list(self.writes)

    def planned_settings(self) -> list[dict[str, object]]:
        now = str(self.facts.ssl_ca_file or "")
        return [{"name": k, "before": now, "after": v} for k, v in self.settings.items()]

    def enable_plan(self) -> EnablePlan:
        """The same pg_hba.conf plan in step 4's shape, so step 4's checks judge it."""
        return EnablePlan(
            facts=self.facts,
            hba=self.hba,
            hba_mode=self.hba_mode,
            hba_owner=self.hba_owner,
            settings={},
            before=None,
            serving_new=True,
            want_sha="",
            host_ip=self.host_ip,
            sessions_refused=self.sessions_refused,
        )

    def lines(self) -> list[str]:
        out = [f"ALTER SYSTEM SET {k} = '{v}' (now: '')" for k, v in self.settings.items()]
        before = {chainmod.fingerprint(c) for c in self.roots_before}
        for cert in self.roots_after:
            if chainmod.fingerprint(cert) not in before:
                out.append(f"{self.ca_target}: adds the root {chainmod.cert_label(cert)}")
        out.extend(
            f"{self.ca_target}: retires the root {chainmod.cert_label(c)}"
            for c in self.roots_retired
        )
        out.extend(
            f"{i.os_user}: role {i.role} is checked against {i.system_user!r}"
            + (f" through map {i.map}" if i.map else "")
            for i in self.identities
        )
        return out


def _policy(params: Params, facts: ServerFacts, ident_file: Path) -> TargetPolicy:
    """Where c4 may write: step 3's policy, with ``ident_file`` a configuration file too (it
    comes from the server, like ``hba_file``)."""
    return TargetPolicy.of(
        data_directory=facts.data_directory,
        config_files=(facts.config_file, facts.hba_file, ident_file),
        listed=params.server_file_targets,
        owner=facts.data_directory_owner or (os.geteuid(), os.getegid()),
    )


def _read_roots(params: Params) -> list[x509.Certificate]:
    path = _roots_file(params)
    if rotation_only(params) and not path.exists():
        # a trust or retire change of a client-CA rotation: no client is issued (c1-c3 skip)
        return [
            c for item in params.trust_client_roots for c in load_ca_certs(Path(item), TRUST_KEY)
        ]
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PreflightError(
            f"{path}: no client roots for change {params.change_id}; run steps c1 to c3 "
            "(client keys, the CA's answers, the client files) first"
        ) from None
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise PreflightError(f"{path}: not a PEM file of certificates; run step c2 again") from None
    return list({chainmod.fingerprint(c): c for c in certs}.values())


TRUST_KEY, RETIRE_KEY = "trust_client_roots", "retire_client_roots"


def rotation_only(params: Params) -> bool:
    """A change of a client-CA rotation that only trusts or retires roots."""
    return bool(params.trust_client_roots or params.retire_client_roots)


def _retiring(params: Params) -> set[str]:
    """The SHA-256 fingerprints of ``retire_client_roots`` (files or fingerprints)."""
    out: set[str] = set()
    for item in params.retire_client_roots:
        fp = parse_fingerprint(item)
        if fp:
            out.add(fp)
        elif Path(item).exists():
            out |= {chainmod.fingerprint(c) for c in load_ca_certs(Path(item), RETIRE_KEY)}
        else:
            raise InputError(
                f"{RETIRE_KEY}: '{item}' is neither a file nor a SHA-256 fingerprint (64 hex "
                "digits, colons allowed)"
            )
    return out


_PEM_CERT = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.*?-----END CERTIFICATE-----[ \t]*(\r?\n|$)", re.S
)


def _without(data: bytes, retired: set[str]) -> bytes:
    """``data`` with the PEM blocks of the ``retired`` certificates cut out, every other byte
    (comments, other certificates, their order) kept."""

    def cut(m: re.Match[bytes]) -> bytes:
        cert = x509.load_pem_x509_certificate(m.group(0))
        return b"" if chainmod.fingerprint(cert) in retired else m.group(0)

    return _PEM_CERT.sub(cut, data)


def _read_bundle(path: Path) -> tuple[bytes, list[x509.Certificate]]:
    found = files.read_regular(path, exact=True)
    if found is None:
        return b"", []
    data = found[0]
    try:
        return data, x509.load_pem_x509_certificates(data) if b"-----BEGIN" in data else []
    except ValueError:
        raise PreflightError(
            f"{path}: ssl_ca_file holds something that is not a PEM certificate; fix it "
            "before adding the client roots"
        ) from None


def _plan_ca_file(
    params: Params, facts: ServerFacts, policy: TargetPolicy, roots: list[x509.Certificate]
) -> tuple[Path, files.PlannedFile, list[x509.Certificate], list[x509.Certificate], dict[str, str]]:
    owner = facts.data_directory_owner or (os.geteuid(), os.getegid())
    settings: dict[str, str] = {}
    if facts.ssl_ca_file is not None:
        target = facts.ssl_ca_file  # from the server's ssl_ca_file
        setting = "ssl_ca_file"
    else:
        target = facts.data_directory / CLIENT_CA_NAME
        setting = f"the new ssl_ca_file ({CLIENT_CA_NAME})"
        settings["ssl_ca_file"] = CLIENT_CA_NAME
    if problem := policy.problem(target, setting=setting):
        raise PreflightError(f"{problem}; nothing was changed")
    target = files.canonical(target)
    current, before = _read_bundle(target) if facts.ssl_ca_file is not None else (b"", [])
    if facts.ssl_ca_file is None and target.exists():
        raise PreflightError(
            f"{target}: ssl_ca_file is empty but this file exists; point ssl_ca_file at it or "
            "move it away, so nothing is replaced silently. Nothing was changed"
        )
    known = {chainmod.fingerprint(c) for c in before}
    retired = _retiring(params)
    if both := [c for c in roots if chainmod.fingerprint(c) in retired]:
        raise PreflightError(
            f"{RETIRE_KEY}: {chainmod.cert_label(both[0])} is a root of this change's clients "
            "too; retire it in a change of its own, once no client uses it. Nothing was changed"
        )
    new = [c for c in roots if chainmod.fingerprint(c) not in known]
    data = _without(current, retired) if retired & known else current
    before_kept = [c for c in before if chainmod.fingerprint(c) not in retired]
    if new:
        if data and not data.endswith(b"\n"):
            data += b"\n"
        data += b"".join(pem_of(c) for c in new)
    try:
        st = target.stat()
        mode, file_owner = st.st_mode & 0o777, (st.st_uid, st.st_gid)
    except FileNotFoundError:
        mode, file_owner = 0o644, owner
    planned = files.plan_file(target, data, kind="ssl_ca_file", mode=mode, owner=file_owner)
    return target, planned, before, [*before_kept, *new], settings


def _identity(
    params: Params,
    client: Any,
    rules: Sequence[HbaRule],
    ident_plan: IdentPlan,
) -> ClientIdentity:
    os_user, role = str(client["os_user"]), str(client["role"])
    (user,) = resolve_client_users([os_user])
    found = client_rule(rules, role, params.server_dbname)
    if found is None:
        raise PreflightError(f"{_uncovered(os_user, role)}. Nothing was changed")
    rule, database = found
    installed = read_client_file(_client_crt(user), user.uid)
    if installed is not None:
        try:
            name = x509.load_pem_x509_certificate(installed).subject
        except ValueError:
            raise PreflightError(
                f"{_client_crt(user)}: not a PEM certificate; run step c3 again. Nothing was "
                "changed"
            ) from None
    else:
        name = x509.Name.from_rfc4514_string(str(client.get("subject") or f"CN={role}"))
    cns = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = str(cns[0].value) if cns else ""
    dn = ident.server_dn(name)
    system_user = _system_user(rule, name)
    map_name = _option(rule, "map")
    problem = _unmatched(os_user, role, rule, system_user, ident_plan)
    if problem is not None:
        raise PreflightError(f"{problem}. Nothing was changed")
    return ClientIdentity(
        os_user=os_user,
        role=role,
        database=database,
        hba_line=rule.line(),
        subject=name.rfc4514_string(),
        server_dn=dn,
        common_name=cn,
        stat_ssl_dn=ident.stat_ssl_dn(name),
        system_user=system_user,
        map=map_name,
        from_certificate=installed is not None,
    )


def _uncovered(os_user: str, role: str) -> str:
    return (
        f"clients: no hba_rules line with method cert or clientcert=verify-full covers role "
        f"{role} of {os_user}; add one (type hostssl, method cert)"
    )


def _system_user(rule: HbaRule, name: x509.Name) -> str:
    """What ``rule`` compares with the role or looks up in its map: the subject's (first)
    CN, or with ``clientname=DN`` the whole DN as the server prints it."""
    if _option(rule, "clientname") == "DN":
        return ident.server_dn(name)
    cns = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(cns[0].value) if cns else ""


def _unmatched(
    os_user: str, role: str, rule: HbaRule, system_user: str, ident_plan: IdentPlan
) -> str | None:
    """Why ``rule`` would refuse a certificate naming ``system_user`` as ``role``, or None."""
    map_name = _option(rule, "map")
    if map_name is not None and not ident_plan.has(map_name, system_user, role):
        return (
            f"clients: the line '{rule.line()}' looks {system_user!r} up in map {map_name}, "
            f"which has no line mapping it to role {role}; add {{map: {map_name}, system_user: "
            f"'{system_user}', role: {role}}} to ident_maps"
        )
    if map_name is None and system_user != role:
        return (
            f"clients: {os_user}'s certificate names {system_user!r}, but the line "
            f"'{rule.line()}' needs it to be the role {role}; add map=NAME to the line and an "
            "ident_maps line for it"
        )
    return None


@dataclass(frozen=True)
class ExpectedIdentity:
    """How the parameters' ``pg_hba.conf`` line for a client will judge a certificate, before
    there is one: what step c1's form previews and flags."""

    hba_line: str | None  # the first certificate line covering the role; None: no line does
    map: str | None  # its map= option
    system_user: str  # what the line compares: the CN, or the DN with clientname=DN
    problem: str | None  # step c4's refusal, judged on the parameters' lines alone


def expected_identity(params: Params, os_user: str, role: str, name: x509.Name) -> ExpectedIdentity:
    """What step c4's preflight will say of ``os_user``'s certificate naming ``name``, judged
    on the parameters' ``hba_rules`` and ``ident_maps`` (c4 reads the server's pg_ident.conf
    too, where a line already there also satisfies it).

    Raises:
        InputError: an ``hba_rules`` or ``ident_maps`` line is not usable.
    """
    rules = hba.parse_rules(list(params.hba_rules))
    found = client_rule(rules, role, params.server_dbname)
    if found is None:
        cns = name.get_attributes_for_oid(NameOID.COMMON_NAME)
        cn = str(cns[0].value) if cns else ""
        return ExpectedIdentity(None, None, cn, _uncovered(os_user, role))
    rule = found[0]
    planned = ident.plan_ident("", ident.parse_maps(list(params.ident_maps)))
    system_user = _system_user(rule, name)
    return ExpectedIdentity(
        hba_line=rule.line(),
        map=_option(rule, "map"),
        system_user=system_user,
        problem=_unmatched(os_user, role, rule, system_user, planned),
    )


def plan_server_trust(params: Params, server: Server) -> ServerTrustPlan:
    """Read the server and decide ssl_ca_file, pg_hba.conf and pg_ident.conf; changes nothing."""
    facts = server.facts()
    if not facts.ssl:
        raise PreflightError(
            f"{params.server_host}:{params.server_port} does not serve TLS (ssl is off); run "
            "the server runbook first, then this one"
        )
    rules = hba.parse_rules(list(params.hba_rules))
    _check_rule_options(rules)
    ident_file = Path(server.show("ident_file"))
    if not ident_file.is_absolute():
        ident_file = facts.data_directory / ident_file
    policy = _policy(params, facts, ident_file)
    for path, setting in ((facts.hba_file, "hba_file"), (ident_file, "ident_file")):
        if problem := policy.problem(path, setting=setting):
            raise PreflightError(f"{problem}; nothing was changed")
    roots = _read_roots(params)
    ca_target, ca_file, before, after, settings = _plan_ca_file(params, facts, policy, roots)
    hba_text = facts.hba_file.read_bytes().decode()
    hba_plan = hba.plan_hba(
        hba_text,
        rules,
        reject_non_ssl=params.reject_non_ssl,
        path=str(facts.hba_file),
        label=f"pgtls {params.change_id}",
        included=hba.included_tcp_lines(facts.hba_file, hba_text),
    )
    found = files.read_regular(ident_file, exact=True)
    ident_text = found[0].decode() if found is not None else ""
    ident_plan = ident.plan_ident(
        ident_text,
        ident.parse_maps(list(params.ident_maps)),
        path=str(ident_file),
        label=f"pgtls {params.change_id}",
    )
    identities = tuple(_identity(params, c, rules, ident_plan) for c in params.clients)
    kept = {chainmod.fingerprint(c) for c in after}
    retired = tuple(c for c in before if chainmod.fingerprint(c) not in kept)
    if retired and not after and _has_cert_lines(hba_plan.after):
        raise PreflightError(
            f"{RETIRE_KEY}: retiring {', '.join(chainmod.cert_label(c) for c in retired)} "
            f"would leave {ca_target} without a root while {facts.hba_file} has cert or "
            "clientcert lines, and every client certificate would be refused; trust the new "
            f"root first ({TRUST_KEY}). Nothing was changed"
        )
    hst = facts.hba_file.stat()
    ist = ident_file.stat() if ident_file.exists() else hst
    planned = [ca_file]
    if ident_plan.changed:
        planned.append(
            files.plan_file(
                files.canonical(ident_file),
                ident_plan.after.encode(),
                kind="ident",
                mode=ist.st_mode & 0o777,
                owner=(ist.st_uid, ist.st_gid),
            )
        )
    if hba_plan.changed:
        planned.append(
            files.plan_file(
                files.canonical(facts.hba_file),
                hba_plan.after.encode(),
                kind="hba",
                mode=hst.st_mode & 0o777,
                owner=(hst.st_uid, hst.st_gid),
            )
        )
    return ServerTrustPlan(
        facts=facts,
        ident_file=ident_file,
        ca_target=ca_target,
        ca_file=ca_file,
        roots_before=tuple(before),
        roots_after=tuple(after),
        settings=settings,
        hba=hba_plan,
        hba_mode=hst.st_mode & 0o777,
        hba_owner=(hst.st_uid, hst.st_gid),
        ident=ident_plan,
        ident_mode=ist.st_mode & 0o777,
        ident_owner=(ist.st_uid, ist.st_gid),
        identities=identities,
        rules=tuple(rules),
        host_ip=address_of(params.server_host),
        sessions_refused=list(sessions.refused_sessions(server.conn, hba_plan.after)),
        writes=tuple(planned),
        roots_retired=retired,
    )


def _has_cert_lines(hba_text: str) -> bool:
    """``pg_hba.conf`` has a line that asks for a client certificate."""
    for line in hba_text.splitlines():
        words = line.split("#", 1)[0].split()
        if words and ("cert" in words[3:6] or any(w.startswith("clientcert=") for w in words[4:])):
            return True
    return False


def _issuers_under(
    params: Params, plan: ServerTrustPlan, extra: Sequence[x509.Certificate]
) -> dict[str, set[str]]:
    """For each issuer name (as ``pg_stat_ssl.issuer_dn`` writes it) of the chains known here,
    the fingerprints of the roots it leads to: the roots and intermediates of ssl_ca_file, the
    clients' certificates of every change in the work directory, and ``extra``."""
    pool: dict[str, x509.Certificate] = {chainmod.fingerprint(c): c for c in extra}
    for c in plan.roots_before:
        pool[chainmod.fingerprint(c)] = c
    found = files.read_regular(plan.ca_target, exact=True)
    if found is not None and b"-----BEGIN" in found[0]:
        for c in x509.load_pem_x509_certificates(found[0]):
            pool[chainmod.fingerprint(c)] = c
    for bundle in Path(params.work_dir).resolve().glob("*/clients/*/postgresql.crt"):
        try:
            certs = x509.load_pem_x509_certificates(bundle.read_bytes())
        except (OSError, ValueError):
            continue
        pool.update((chainmod.fingerprint(c), c) for c in certs)
    certs = list(pool.values())
    out: dict[str, set[str]] = {}
    for cert in certs:
        if not chainmod.is_ca(cert):
            continue
        root = chainmod.order_chain([cert], certs).root
        if root is not None:
            out.setdefault(ident.stat_ssl_dn(cert.subject), set()).add(chainmod.fingerprint(root))
    return out


def _retire_refusal(params: Params, server: Server, plan: ServerTrustPlan) -> None:
    """Refuse to retire a root while a session, or a listed client's installed certificate,
    was issued under it: the next connection of that client would be refused."""
    if not plan.roots_retired:
        return
    retired = {chainmod.fingerprint(c) for c in plan.roots_retired}
    installed = []
    for who in params.clients:
        (user,) = resolve_client_users([str(who["os_user"])])
        data = read_client_file(_client_crt(user), user.uid)
        if data is not None:
            installed.append((user.name, x509.load_pem_x509_certificates(data)))
    under = _issuers_under(params, plan, [c for _, chain in installed for c in chain])
    labels = ", ".join(chainmod.cert_label(c) for c in plan.roots_retired)
    sees = server.conn.execute(
        "SELECT rolsuper OR pg_has_role('pg_read_all_stats', 'member') FROM pg_roles "
        "WHERE rolname = current_user"
    ).fetchone()
    if not (sees and sees[0]):
        raise PreflightError(
            f"{RETIRE_KEY}: the runbook's role cannot see which certificate other sessions "
            "presented (pg_stat_ssl); grant it pg_read_all_stats, then retire again. Nothing "
            "was changed"
        )
    rows = server.conn.execute(
        "SELECT s.pid, a.usename, s.client_dn, s.issuer_dn FROM pg_stat_ssl s "
        "JOIN pg_stat_activity a USING (pid) WHERE s.client_dn IS NOT NULL "
        "AND s.pid <> pg_backend_pid() ORDER BY s.pid"
    ).fetchall()
    held = [r for r in rows if under.get(str(r[3]), set()) & retired]
    if held:
        named = "; ".join(f"pid {p}, user {u}, client_dn {d}" for p, u, d, _ in held)
        raise PreflightError(
            f"{RETIRE_KEY}: {len(held)} session(s) presented a certificate issued under "
            f"{labels} ({named}); reissue those clients from the new CA, let them reconnect "
            "(or end the sessions), then retire again. Nothing was changed"
        )
    for name, chain in installed:
        root = chainmod.order_chain(chain, plan.roots_before, leaf=chain[0]).root if chain else None
        if root is not None and chainmod.fingerprint(root) in retired:
            raise PreflightError(
                f"{RETIRE_KEY}: {name}'s ~/.postgresql/postgresql.crt was issued under "
                f"{labels}, and the server would refuse it; reissue it from the new CA first. "
                "Nothing was changed"
            )


def check_server_trust(params: Params, server: Server, plan: ServerTrustPlan) -> None:
    """Everything that can refuse, before the first write: step 4's check of the planned
    pg_hba.conf (the server's parser, the runbook's own login), the planned pg_ident.conf as the
    server parses it, and each client's connection decided by a certificate line."""
    check_enable(params, server, plan.enable_plan())
    _retire_refusal(params, server, plan)
    owner = plan.facts.data_directory_owner or (os.geteuid(), os.getegid())
    if plan.ident.changed:
        rows = hbacheck.check_ident_text(
            plan.ident.after,
            ident_file=plan.ident_file,
            data_directory=plan.facts.data_directory,
            owner=owner,
        )
        problems = [f"line {r.line_number}: {r.error}" for r in rows if r.error]
        if problems:
            raise PreflightError(
                f"{plan.ident_file}: the server would reject {'; '.join(problems)}; the file "
                "was left as it was and nothing was reloaded"
            )
    lines = hbacheck.check_hba_text(
        plan.hba.after,
        hba_file=plan.facts.hba_file,
        data_directory=plan.facts.data_directory,
        owner=owner,
    )
    texts = plan.hba.after.splitlines()
    for who in plan.identities:
        decided = hbacheck.first_match(
            lines,
            hbacheck.OwnConnection(who.role, who.database, plan.host_ip, tls=True),
        )
        said = texts[decided.line_number - 1].strip() if decided else None
        if said is None or " ".join(said.split()) != " ".join(who.hba_line.split()):
            why = f"line {decided.line_number} ('{said}') decides it" if decided else "no line"
            raise PreflightError(
                f"{plan.facts.hba_file}: {who.os_user}'s connection (role {who.role}, "
                f"database {who.database}, from {plan.host_ip}) would not reach "
                f"'{who.hba_line}': {why}; order hba_rules so the certificate line comes "
                "first. Nothing was changed"
            )


# --------------------------------------------------------------------------- c4: apply


@dataclass(frozen=True)
class ServerTrustResult:
    """Step c4: the client roots trusted, the certificate lines and maps loaded."""

    ssl_ca_file: str
    ident_file: str
    roots_before: list[dict[str, Any]]
    roots_after: list[dict[str, Any]]
    planned_files: list[dict[str, object]]
    installed: list[dict[str, object]]
    hba_diff: str
    hba_added: tuple[str, ...]
    hba_written: bool
    ident_diff: str
    ident_added: tuple[str, ...]
    ident_written: bool
    settings_planned: list[dict[str, object]]
    settings_applied: bool
    clients: list[dict[str, object]]  # each client's names as the server compares them
    changed: bool
    applied: bool
    reloaded: bool
    messages: list[str] = field(default_factory=list)
    sessions_refused: list[dict[str, object]] = field(default_factory=list)
    roots_retired: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        return dict(self.__dict__)


def _result(
    params: Params,
    plan: ServerTrustPlan,
    *,
    installed: files.InstallResult | None = None,
    settings_applied: bool = False,
    messages: list[str],
) -> ServerTrustResult:
    done = installed or files.InstallResult(())
    written = {i.kind for i in done.installed if i.action != "unchanged"}
    return ServerTrustResult(
        ssl_ca_file=str(plan.ca_target),
        ident_file=str(plan.ident_file),
        roots_before=[cert_row(c) for c in plan.roots_before],
        roots_after=[cert_row(c) for c in plan.roots_after],
        planned_files=[p.record() for p in plan.planned_files()],
        installed=done.as_dicts(),
        hba_diff=plan.hba.diff(),
        hba_added=plan.hba.added,
        hba_written="hba" in written,
        ident_diff=plan.ident.diff(),
        ident_added=plan.ident.added,
        ident_written="ident" in written,
        settings_planned=plan.planned_settings(),
        settings_applied=settings_applied,
        clients=[i.row() for i in plan.identities],
        changed=done.changed or settings_applied,
        applied=params.apply,
        reloaded=installed is not None,
        messages=messages,
        sessions_refused=plan.sessions_refused,
        roots_retired=[cert_row(c) for c in plan.roots_retired],
    )


def step_c4_server_trust(params: Params) -> ServerTrustResult:
    """The server trusts the clients' roots and checks their certificates.

    Plan, check (before anything is written), then with ``apply`` the journaled writes, one
    confirmed reload and the proof; any failure puts every file back and reloads.
    """
    params = with_saved_clients(params)  # the subjects chosen in c1's form, if any
    with open_server(params) as server:
        plan = plan_server_trust(params, server)
        check_server_trust(params, server, plan)
        if not params.apply or not plan.changes:
            res = _result(
                params,
                plan,
                messages=(
                    ["plan only (apply: false): nothing was changed", *plan.lines()]
                    if plan.changes
                    else [
                        "nothing to change: the server trusts the client roots and has the "
                        "certificate lines and maps"
                    ]
                ),
            )
            save_step(params, C4, res.summary())
            return res
        facts = plan.facts
        with change_lock(
            facts.data_directory, facts.data_directory_owner, server, params.change_id
        ):
            plan = plan_server_trust(params, server)  # again, under the lock
            check_server_trust(params, server, plan)
            before = server_before(params, facts)
            before["config_files"] = [
                str(facts.config_file),
                str(facts.hba_file),
                str(plan.ident_file),
            ]
            auto_conf = facts.data_directory / "postgresql.auto.conf"
            journal = Journal.begin(
                params.work,
                JOURNAL_STEP,
                before,
                backing_up=[plan.ca_target, facts.hba_file, plan.ident_file, auto_conf],
            )
            try:
                installed, applied = _apply(params, server, plan, journal)
            except Exception:
                if params.work.journal.exists():
                    undo_change(params, server=server, reason="undone")
                raise
            journal.end("ok")
    res = _result(
        params, plan, installed=installed, settings_applied=applied, messages=plan.lines()
    )
    save_step(params, C4, res.summary())
    return res


def _apply(
    params: Params, server: Server, plan: ServerTrustPlan, journal: Journal
) -> tuple[files.InstallResult, bool]:
    """The writes, each journaled first, one confirmed reload, and the proof; raises (the
    caller undoes) when the server does not take them."""
    policy = _policy(params, plan.facts, plan.ident_file)
    planned = plan.planned_files()
    for p in planned:  # judged again by the real path each is written to
        if problem := policy.problem(p.target, setting=f"the {p.kind} file"):
            raise PreflightError(problem)
    written = [journal.write_file(p) for p in planned]
    applied = False
    if plan.settings:
        previous = {name: server.auto_conf_value(name) for name in plan.settings}

        def alter() -> None:
            for name, value in plan.settings.items():
                server.alter_system(name, value)

        auto = journal.change_auto_conf(
            plan.facts.data_directory / "postgresql.auto.conf", plan.settings, previous, alter
        )
        if auto is not None:
            written.append(auto)
        applied = True
    errors = server.file_setting_errors()
    if errors:
        raise PreflightError(f"configuration errors: {'; '.join(errors)}; the change was undone")
    journal.reload("client-trust", server.reload_confirmed)
    prove_hba(params, server, plan.enable_plan())
    ident_errors = _loaded_ident_errors(server)
    if ident_errors:
        raise ServerError(
            f"{plan.ident_file}: {'; '.join(ident_errors)}; ssl_ca_file, pg_hba.conf and "
            "pg_ident.conf were rolled back and the server reloaded"
        )
    with open_server(params) as fresh:  # a new backend reads the reloaded settings
        now = fresh.show("ssl_ca_file")
    if plan.settings and now != plan.settings["ssl_ca_file"]:
        raise ServerError(
            f"ssl_ca_file is '{now}' after the reload, not '{plan.settings['ssl_ca_file']}'; "
            "the change was rolled back and the server reloaded"
        )
    missing = _roots_not_asked_for(plan.host_ip, params.server_port, plan.roots_after)
    if missing:
        raise ServerError(
            f"{params.server_host}:{params.server_port} does not name "
            f"{', '.join(missing)} among the CAs it accepts client certificates from after the "
            "reload (did it load ssl_ca_file? its log says why); ssl_ca_file, pg_hba.conf and "
            "pg_ident.conf were rolled back and the server reloaded"
        )
    kept = {ident.server_dn(r.subject) for r in plan.roots_after}
    retired = [ident.server_dn(r.subject) for r in plan.roots_retired]
    still = _still_asked_for(
        plan.host_ip, params.server_port, [r for r in retired if r not in kept]
    )
    if still:
        raise ServerError(
            f"{params.server_host}:{params.server_port} still names {', '.join(still)} among "
            "the CAs it accepts client certificates from after the reload; ssl_ca_file, "
            "pg_hba.conf and pg_ident.conf were rolled back and the server reloaded"
        )
    return files.InstallResult(tuple(written)), applied


def _still_asked_for(
    host: str, port: int, names: Sequence[str], *, timeout: float = 5.0
) -> list[str]:
    """The retired roots' names the server still sends when it asks for a certificate."""
    if not names:
        return []
    deadline = time.monotonic() + timeout
    while True:
        asked = asked_ca_names(host, port)
        if asked is None:
            return []  # no openssl here: c5 proves the clients still log in
        still = [n for n in names if n in asked]
        if not still or time.monotonic() >= deadline:
            return still
        time.sleep(0.2)


_CA_NAMES = "Acceptable client certificate CA names"


def asked_ca_names(host: str, port: int, *, timeout: float = 10.0) -> list[str] | None:
    """The CA names the server sends when it asks for a client certificate (RFC 2253), seen
    from outside by ``openssl s_client -starttls postgres``; None when there is no openssl or
    no answer within ``timeout`` for the whole exchange, [] when it asks for none."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    try:
        proc = subprocess.run(
            [openssl, "s_client", "-starttls", "postgres", "-connect", f"{host}:{port}"]
            + ["-nameopt", "RFC2253"],
            input="",
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"},
        )
    except subprocess.TimeoutExpired:
        return None
    lines = proc.stdout.splitlines()
    if _CA_NAMES not in lines:
        return [] if "Server certificate" in proc.stdout else None
    names = []
    for line in lines[lines.index(_CA_NAMES) + 1 :]:
        if not line.strip() or line.startswith(("Requested ", "Client Certificate Types", "---")):
            break
        names.append(line.strip())
    return names


def _roots_not_asked_for(
    host: str, port: int, roots: Sequence[x509.Certificate], *, timeout: float = 5.0
) -> list[str]:
    """The roots the server does not name yet when it asks for a client certificate (each
    new connection gets the reloaded SSL settings; a short wait covers the postmaster)."""
    wanted = [ident.server_dn(r.subject) for r in roots]
    deadline = time.monotonic() + timeout
    while True:
        names = asked_ca_names(host, port)
        if names is None:
            return []  # no openssl here: c5 proves it with the clients' own logins
        missing = [w for w in wanted if w not in names]
        if not missing or time.monotonic() >= deadline:
            return missing
        time.sleep(0.2)


def _loaded_ident_errors(server: Server) -> list[str]:
    """Errors in pg_ident.conf as the server reads it now (PostgreSQL 15+)."""
    rows = server.conn.execute(
        "SELECT line_number, error FROM pg_ident_file_mappings WHERE error IS NOT NULL"
    ).fetchall()
    return [f"line {n}: {e}" for n, e in rows]


# --------------------------------------------------------------------------- c5


@dataclass(frozen=True)
class ProofCheck:
    """One check of c5: what must happen, what did, and the server's words."""

    case: str  # what is tried, the same words for every client
    os_user: str
    role: str  # the role it logs in as
    expect: str  # "ok", or the reason the server must give
    observed: str
    passed: bool
    detail: str

    @property
    def check(self) -> str:
        """The row's name in the record: who tries what."""
        return f"{self.os_user} as {self.role}: {self.case}"

    def as_dict(self) -> dict[str, object]:
        return {"check": self.check, **self.__dict__}


@dataclass(frozen=True)
class ClientProofResult:
    """Step c5: each client connected with its certificate, and each must-fail check."""

    verdict: str  # "pass" or "fail"
    checks: tuple[ProofCheck, ...]
    sessions: list[dict[str, object]]  # pg_stat_ssl of each client's session
    messages: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"

    def summary(self) -> dict[str, object]:
        return {
            "verdict": self.verdict,
            "checks": [c.as_dict() for c in self.checks],
            "sessions": self.sessions,
            "messages": self.messages,
        }


NO_CERTIFICATE = "connection requires a valid client certificate"
UNKNOWN_CA = "tlsv1 alert unknown ca"
OTHER_ROLE = "certificate authentication failed for user"
SERVER_AUTH_ONLY = "sslv3 alert unsupported certificate"
_SEP = "\x1f"


def _psql(
    user: ClientUser, conninfo: dict[str, str], query: str, *, timeout: float = 30
) -> tuple[bool, str]:
    """``psql`` as ``user`` with nothing of the runbook's environment; (connected, output or
    the server's message)."""
    psql = shutil.which("psql")
    if psql is None:
        return False, "psql is not installed on this machine"
    env = {"HOME": str(user.home), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
    kwargs: dict[str, Any] = {}
    if os.geteuid() == 0 and user.uid != 0:
        kwargs = {"user": user.uid, "group": user.gid, "extra_groups": []}
    elif os.geteuid() != user.uid:
        return False, f"cannot run psql as {user.name} without root"
    conn = " ".join(f"{k}={v}" for k, v in conninfo.items())
    proc = subprocess.run(
        [psql, conn, "-XAt", "-F", _SEP, "-c", query],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(user.home) if user.home.is_dir() else "/",
        timeout=timeout,
        check=False,
        **kwargs,
    )
    if proc.returncode == 0:
        return True, proc.stdout.strip()
    text = " ".join(proc.stderr.split())
    # libpq says where it tried first; the reason is what follows
    return False, re.sub(
        r'^psql: error: (connection to server at "[^"]*"(, port \d+)? failed: )?(FATAL: +)?',
        "",
        text,
    )


@contextmanager
def _private_tmp() -> Iterator[Path]:
    """A new private temporary folder (never in a client's home), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="pgtls-c5-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _hand_over(directory: Path, user: ClientUser) -> None:
    """Give the folder to ``user`` once everything in it is written (through its descriptor),
    so the tool never writes as root into a folder the user controls."""
    if os.geteuid() != 0:
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        os.fchown(fd, user.uid, user.gid)
    finally:
        os.close(fd)


def _write_pair(
    directory: Path, stem: str, key: Any, chain: Sequence[x509.Certificate], user: ClientUser
) -> tuple[Path, Path]:
    """A key and its certificate with the intermediates (libpq sends the whole file), as the
    client user's own files in ``directory``."""
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    owner = (user.uid, user.gid) if os.geteuid() == 0 else (os.geteuid(), os.getegid())
    crt, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    files.atomic_write(
        crt, b"".join(pem_of(c) for c in chain), mode=0o644, uid=owner[0], gid=owner[1]
    )
    files.atomic_write(key_path, key_pem, mode=0o600, uid=owner[0], gid=owner[1])
    return crt, key_path


def _trusted_lab_ca(params: Params, roots: list[x509.Certificate]) -> LabCA | None:
    """The work directory's lab CA, when it issued the client roots (a lab run): it can make
    a certificate the server trusts but that is for servers only."""
    wanted = {chainmod.fingerprint(c) for c in roots}
    for directory in (params.work.lab_ca, params.work.shared_lab_ca):
        if (directory / "signer.key").exists():
            try:
                ca = LabCA.load(directory)
            except InputError:
                continue
            if chainmod.fingerprint(ca.root) in wanted:
                return ca
    return None


def _attempt(
    user: ClientUser, conninfo: dict[str, str], label: str, expect: str, extra: dict[str, str]
) -> ProofCheck:
    """One must-fail connection as ``user``: passed when the server refuses it with ``expect``."""
    ok, text = _psql(user, {**conninfo, **extra}, "SELECT 1")
    if ok:
        observed = "ok"
    else:
        observed = expect if _matches(text, expect) else "refused for another reason"
    return ProofCheck(
        label, user.name, conninfo["user"], expect, observed, observed == expect, text
    )


def _matches(observed: str, expect: str) -> bool:
    if expect == OTHER_ROLE:
        return OTHER_ROLE in observed or "(clientcert=verify-full) failed for user" in observed
    return expect in observed


def step_c5_verify_clients(params: Params) -> ClientProofResult:
    """Each client connects as its OS user with its own files, and the must-fail checks fail
    for their reasons; a failed check undoes the change (c3 and c4) and raises."""
    params = with_saved_clients(params)  # the subjects chosen in c1's form, if any
    host_ip = address_of(params.server_host)
    roots = _read_roots(params)
    rules = hba.parse_rules(list(params.hba_rules))
    lab = _trusted_lab_ca(params, roots)
    checks: list[ProofCheck] = []
    seen: list[dict[str, object]] = []
    messages: list[str] = []
    clients = [(str(c["os_user"]), str(c["role"])) for c in params.clients]
    for os_user, role in clients:
        (user,) = resolve_client_users([os_user])
        found = client_rule(rules, role, params.server_dbname)
        database = found[1] if found else params.server_dbname
        base = {
            "host": params.common_name,
            "hostaddr": host_ip,
            "port": str(params.server_port),
            "dbname": database,
            "sslmode": "verify-full",
            "connect_timeout": "10",
        }

        as_role = {**base, "user": role}
        checks.append(_own_login(user, role, as_role, seen))
        with _private_tmp() as tmp:
            stranger = LabCA.create(
                ("pgtls throwaway client issuer",), root_name="pgtls throwaway root"
            )
            key, cert = stranger.issue([role])
            unrelated = _write_pair(tmp, "unrelated", key, [cert, *stranger.intermediates], user)
            server_only = None
            if lab is not None:
                key, cert = lab.issue([role])
                server_only = _write_pair(tmp, "server-only", key, [cert, *lab.intermediates], user)
            _hand_over(tmp, user)
            tries = [
                (
                    "no client certificate",
                    NO_CERTIFICATE,
                    (tmp / "none.crt", tmp / "none.key"),  # absent: libpq sends none
                ),
                ("a certificate of an unrelated CA", UNKNOWN_CA, unrelated),
            ]
            if server_only is not None:
                tries.append(
                    (
                        "a certificate for servers only (serverAuth, no clientAuth)",
                        SERVER_AUTH_ONLY,
                        server_only,
                    )
                )
            else:
                messages.append(
                    f"{os_user}: the serverAuth-only check needs the CA of the client roots at "
                    "hand (a lab run); not run"
                )
            for case, expect, (crt, key_path) in tries:
                extra = {"sslcert": str(crt), "sslkey": str(key_path)}
                checks.append(_attempt(user, as_role, case, expect, extra))
        other = next(
            (
                (r, f[1])
                for _u, r in clients
                if r != role
                and (f := client_rule(rules, r, params.server_dbname)) is not None
                and f[0].method == "cert"
            ),
            None,
        )
        if other is not None:  # the other role's own line, with this client's certificate
            checks.append(
                _attempt(
                    user,
                    {**base, "user": other[0], "dbname": other[1]},
                    f"its own certificate as role {other[0]}",
                    OTHER_ROLE,
                    {},
                )
            )
        else:
            messages.append(
                f"{os_user}: no other client role on a cert line to try its certificate as; "
                "the another-role check was not run"
            )
    verdict = "pass" if checks and all(c.passed for c in checks) else "fail"
    res = ClientProofResult(verdict=verdict, checks=tuple(checks), sessions=seen, messages=messages)
    save_step(params, C5, res.summary())
    if verdict == "fail":
        failed = [c for c in checks if not c.passed]
        first = failed[0] if failed else None
        undone = ""
        if params.work.journal.exists():
            undo_change(params, server=None, reason="undone")
            undone = "; steps c3 and c4 were undone and the server reloaded"
        raise ServerError(
            f"{len(failed)} of {len(checks)} client checks failed"
            + (
                f" (first: {first.check}: expected {first.expect!r}, got "
                f"{first.detail or first.observed!r})"
                if first
                else " (no client to check)"
            )
            + undone
        )
    return res


def _own_login(
    user: ClientUser, role: str, conninfo: dict[str, str], seen: list[dict[str, object]]
) -> ProofCheck:
    """The client's own login with ``~/.postgresql`` only; ``pg_stat_ssl`` of that session must
    name its certificate: subject, serial and issuer."""
    label = "its own certificate, verify-full, ~/.postgresql only"
    ok, text = _psql(
        user,
        conninfo,
        "SELECT ssl, client_dn, client_serial, issuer_dn FROM pg_stat_ssl "
        "WHERE pid = pg_backend_pid()",
    )
    if not ok:
        return ProofCheck(label, user.name, role, "ok", "fail", False, text)
    data = read_client_file(_client_crt(user), user.uid)
    if data is None:
        return ProofCheck(
            label, user.name, role, "ok", "ok", False, "no ~/.postgresql/postgresql.crt"
        )
    cert = x509.load_pem_x509_certificate(data)
    fields = (text.split(_SEP) + ["", "", "", ""])[:4]
    got = {
        "ssl": fields[0],
        "client_dn": fields[1],
        "client_serial": fields[2],
        "issuer_dn": fields[3],
    }
    want = {
        "ssl": "t",
        "client_dn": ident.stat_ssl_dn(cert.subject),
        "client_serial": str(cert.serial_number),
        "issuer_dn": ident.stat_ssl_dn(cert.issuer),
    }
    seen.append({"os_user": user.name, "role": role, **got})
    wrong = [f"{k} is {got[k]!r}, not {want[k]!r}" for k in want if got[k] != want[k]]
    return ProofCheck(
        label,
        user.name,
        role,
        "ok",
        "ok",
        not wrong,
        "; ".join(wrong)
        or f"pg_stat_ssl: client_dn {got['client_dn']}, serial {got['client_serial']}",
    )
