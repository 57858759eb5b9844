"""Who each client is to the server: the ``pg_hba.conf`` line of the parameters that decides its
connection, and the name that line compares with the role (the certificate's CN, or its DN with
``clientname=DN``), looked up in a ``pg_ident.conf`` map when the line has one.

Step c4 refuses before any write when a client's line or map would refuse its certificate;
step c1's form previews the same judgement (:func:`expected_identity`) before there is one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from pgtls_helpers.errors import InputError, PreflightError
from pgtls_helpers.postgres import hba, ident
from pgtls_helpers.postgres.clients import read_client_file, resolve_client_users
from pgtls_helpers.postgres.hba import HbaRule
from pgtls_helpers.postgres.ident import IdentPlan
from pgtls_helpers.runbook.params import Params

__all__ = [
    "ClientIdentity",
    "ExpectedIdentity",
    "check_rule_options",
    "client_rule",
    "expected_identity",
    "hba_option",
    "identity_of",
]

_REMOVED_CLIENTCERT = ("1", "0", "no-verify")


def hba_option(rule: HbaRule, name: str) -> str | None:
    for opt in rule.options:
        key, _, value = opt.partition("=")
        if key == name:
            return value
    return None


def _asks_certificate(rule: HbaRule) -> bool:
    """The line asks the client for a certificate and checks who it names."""
    return rule.method == "cert" or hba_option(rule, "clientcert") == "verify-full"


def check_rule_options(rules: Sequence[HbaRule]) -> None:
    for i, rule in enumerate(rules):
        value = hba_option(rule, "clientcert")
        if value in _REMOVED_CLIENTCERT:
            raise InputError(
                f"hba_rules[{i}]: clientcert={value} was removed in PostgreSQL 14; write "
                "clientcert=verify-full (the certificate must name the role) or "
                "clientcert=verify-ca (any certificate of a trusted CA)"
            )
        if value is not None and value not in ("verify-ca", "verify-full"):
            raise InputError(f"hba_rules[{i}]: clientcert={value} is not verify-ca or verify-full")
        name = hba_option(rule, "clientname")
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


def identity_of(
    params: Params,
    client: Any,
    rules: Sequence[HbaRule],
    ident_plan: IdentPlan,
) -> ClientIdentity:
    """``client`` (a ``clients`` entry) as the server will judge it, from its installed
    certificate when there is one, else its subject; refuses when its line or map would."""
    os_user, role = str(client["os_user"]), str(client["role"])
    (user,) = resolve_client_users([os_user])
    found = client_rule(rules, role, params.server_dbname)
    if found is None:
        raise PreflightError(f"{_uncovered(os_user, role)}. Nothing was changed")
    rule, database = found
    installed = read_client_file(user.client_crt, user.uid)
    if installed is not None:
        try:
            name = x509.load_pem_x509_certificate(installed).subject
        except ValueError:
            raise PreflightError(
                f"{user.client_crt}: not a PEM certificate; run step c3 again. Nothing was changed"
            ) from None
    else:
        name = x509.Name.from_rfc4514_string(str(client.get("subject") or f"CN={role}"))
    cns = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = str(cns[0].value) if cns else ""
    dn = ident.server_dn(name)
    system_user = _system_user(rule, name)
    map_name = hba_option(rule, "map")
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
    if hba_option(rule, "clientname") == "DN":
        return ident.server_dn(name)
    cns = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(cns[0].value) if cns else ""


def _unmatched(
    os_user: str, role: str, rule: HbaRule, system_user: str, ident_plan: IdentPlan
) -> str | None:
    """Why ``rule`` would refuse a certificate naming ``system_user`` as ``role``, or None."""
    map_name = hba_option(rule, "map")
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
        map=hba_option(rule, "map"),
        system_user=system_user,
        problem=_unmatched(os_user, role, rule, system_user, planned),
    )
