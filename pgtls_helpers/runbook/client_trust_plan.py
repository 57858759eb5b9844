"""Step c4's plan and its checks: what would change on a server that already serves TLS, and
every refusal, all before the first write.

The plan (:func:`plan_server_trust`) reads the server and decides its edits: the client roots
merged into ``ssl_ca_file`` (:mod:`.client_roots`), the ``cert`` / ``clientcert=verify-full``
lines of ``pg_hba.conf`` (placed as step 4 places its lines), the ``pg_ident.conf`` maps, and with
``client_crl_file`` the server's ``ssl_crl_file`` (:mod:`.client_crl`). The
checks (:func:`check_server_trust`): the throwaway backend parses both planned files, the
runbook's own login must still be accepted, each client's connection must reach a certificate
line, each map must hold the identity the server will look up, and a retire waits until no
session or installed certificate depends on the root.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from pgtls_helpers.errors import PreflightError
from pgtls_helpers.pki import chain as chainmod
from pgtls_helpers.postgres import files, hba, hbacheck, ident, sessions
from pgtls_helpers.postgres.clients import read_client_file, resolve_client_users
from pgtls_helpers.postgres.hba import HbaPlan, HbaRule
from pgtls_helpers.postgres.ident import IdentPlan
from pgtls_helpers.postgres.server import Server, ServerFacts
from pgtls_helpers.postgres.targets import TargetPolicy
from pgtls_helpers.runbook.client_crl import CrlPlan, plan_crl
from pgtls_helpers.runbook.client_identity import ClientIdentity, check_rule_options, identity_of
from pgtls_helpers.runbook.client_roots import (
    RETIRE_KEY,
    TRUST_KEY,
    plan_ca_file,
    read_roots,
)
from pgtls_helpers.runbook.common import address_of
from pgtls_helpers.runbook.enable import EnablePlan, check_enable
from pgtls_helpers.runbook.params import Params

__all__ = ["ServerTrustPlan", "check_server_trust", "plan_server_trust", "trust_policy"]


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
    crl: CrlPlan | None = None  # client_crl_file as ssl_crl_file

    @property
    def changes(self) -> bool:
        return (
            self.ca_file.action != "unchanged"
            or (self.crl is not None and self.crl.file.action != "unchanged")
            or bool(self.settings)
            or self.hba.changed
            or self.ident.changed
        )

    def planned_files(self) -> list[files.PlannedFile]:
        """The files c4 writes, as planned (before any write), in the order written."""
        return list(self.writes)

    def planned_settings(self) -> list[dict[str, object]]:
        now = {
            "ssl_ca_file": str(self.facts.ssl_ca_file or ""),
            "ssl_crl_file": self.crl.before if self.crl else "",
        }
        return [{"name": k, "before": now.get(k, ""), "after": v} for k, v in self.settings.items()]

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
        out.extend(self.crl.lines() if self.crl else [])
        out.extend(
            f"{i.os_user}: role {i.role} is checked against {i.system_user!r}"
            + (f" through map {i.map}" if i.map else "")
            for i in self.identities
        )
        return out


def trust_policy(params: Params, facts: ServerFacts, ident_file: Path) -> TargetPolicy:
    """Where c4 may write: step 3's policy, with ``ident_file`` a configuration file too (it
    comes from the server, like ``hba_file``)."""
    return TargetPolicy.of(
        data_directory=facts.data_directory,
        config_files=(facts.config_file, facts.hba_file, ident_file),
        listed=params.server_file_targets,
        owner=facts.data_directory_owner or (os.geteuid(), os.getegid()),
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
    check_rule_options(rules)
    ident_file = Path(server.show("ident_file"))
    if not ident_file.is_absolute():
        ident_file = facts.data_directory / ident_file
    policy = trust_policy(params, facts, ident_file)
    for path, setting in ((facts.hba_file, "hba_file"), (ident_file, "ident_file")):
        if problem := policy.problem(path, setting=setting):
            raise PreflightError(f"{problem}; nothing was changed")
    roots = read_roots(params)
    ca_target, ca_file, before, after, settings = plan_ca_file(params, facts, policy, roots)
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
    identities = tuple(identity_of(params, c, rules, ident_plan) for c in params.clients)
    crl_dir = server.conn.execute("SELECT current_setting('ssl_crl_dir', true)").fetchone()
    crl = plan_crl(
        params.client_crl_file,
        facts=facts,
        crl_setting=server.show("ssl_crl_file"),
        crl_dir=str(crl_dir[0] or "") if crl_dir else "",
        policy=policy,
        ca_file_after=ca_file.data,
        users=resolve_client_users([str(c["os_user"]) for c in params.clients]),
    )
    if crl is not None:
        settings = {**settings, **crl.settings}
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
    planned = [ca_file, *([crl.file] if crl is not None else [])]
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
        crl=crl,
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
        data = read_client_file(user.client_crt, user.uid)
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
