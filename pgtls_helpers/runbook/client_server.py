"""Step c4 of the client-certificate runbook (``c4_server_trust``): the server trusts the
clients' CA and checks their certificates.

The plan and its checks are :mod:`.client_trust_plan`'s, run before the first write and again
under the change lock. Then the writes are journaled (``ssl_ca_file``, ``ssl_crl_file`` with
``client_crl_file``, ``pg_ident.conf``, ``pg_hba.conf``, and ``postgresql.auto.conf`` when a
setting is set), one reload is
confirmed, the server is seen to name the kept roots and not the retired ones, and any failure
puts every file back byte for byte. Step c5 (:mod:`.client_proof`) proves it with each client's
own login.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pgtls_helpers.errors import PreflightError, ServerError
from pgtls_helpers.postgres import files, ident
from pgtls_helpers.postgres.lock import change_lock
from pgtls_helpers.postgres.server import Server
from pgtls_helpers.runbook.client_roots import roots_not_asked_for, still_asked_for
from pgtls_helpers.runbook.client_subjects import clients_used
from pgtls_helpers.runbook.client_trust_plan import (
    ServerTrustPlan,
    check_server_trust,
    plan_server_trust,
    trust_policy,
)
from pgtls_helpers.runbook.common import open_server, save_step, server_before
from pgtls_helpers.runbook.enable import prove_hba
from pgtls_helpers.runbook.journal import Journal
from pgtls_helpers.runbook.manifest import ClientsUsed
from pgtls_helpers.runbook.params import Params
from pgtls_helpers.runbook.renewal import cert_row
from pgtls_helpers.runbook.undo import undo_change

__all__ = ["JOURNAL_STEP", "ServerTrustResult", "step_c4_server_trust"]

C4 = "c4_server_trust"
JOURNAL_STEP = "client_server"  # the journal's name for step c4


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
    clients_used: ClientsUsed  # the clients' values, and whether c1's form gave them
    changed: bool
    applied: bool
    reloaded: bool
    messages: list[str] = field(default_factory=list)
    sessions_refused: list[dict[str, object]] = field(default_factory=list)
    roots_retired: list[dict[str, Any]] = field(default_factory=list)
    ssl_crl_file: str | None = None  # where client_crl_file is installed, when given
    crls: list[dict[str, object]] = field(default_factory=list)  # the CRLs installed there
    crls_kept: int = 0  # other issuers' CRLs that were in the file and stay
    revoked_clients: list[str] = field(default_factory=list)  # listed clients the CRL revokes

    def summary(self) -> dict[str, object]:
        return {**self.__dict__, "clients_used": self.clients_used.to_json()}


def _result(
    params: Params,
    plan: ServerTrustPlan,
    used: ClientsUsed,
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
        clients_used=used,
        changed=done.changed or settings_applied,
        applied=params.apply,
        reloaded=installed is not None,
        messages=messages,
        sessions_refused=plan.sessions_refused,
        roots_retired=[cert_row(c) for c in plan.roots_retired],
        ssl_crl_file=str(plan.crl.target) if plan.crl else None,
        crls=plan.crl.rows() if plan.crl else [],
        crls_kept=plan.crl.kept if plan.crl else 0,
        revoked_clients=list(plan.crl.revoked_clients) if plan.crl else [],
    )


def step_c4_server_trust(params: Params) -> ServerTrustResult:
    """The server trusts the clients' roots and checks their certificates.

    Plan, check (before anything is written), then with ``apply`` the journaled writes, one
    confirmed reload and the proof; any failure puts every file back and reloads.
    """
    params, used = clients_used(params)  # the subjects chosen in c1's form, if any
    with open_server(params) as server:
        plan = plan_server_trust(params, server)
        check_server_trust(params, server, plan)
        if not params.apply or not plan.changes:
            res = _result(
                params,
                plan,
                used,
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
                backing_up=[
                    plan.ca_target,
                    *([plan.crl.target] if plan.crl else []),
                    facts.hba_file,
                    plan.ident_file,
                    auto_conf,
                ],
            )
            try:
                installed, applied = _apply(params, server, plan, journal)
            except Exception:
                if params.work.journal.exists():
                    undo_change(params, server=server, reason="undone")
                raise
            journal.end("ok")
    res = _result(
        params, plan, used, installed=installed, settings_applied=applied, messages=plan.lines()
    )
    save_step(params, C4, res.summary())
    return res


def _apply(
    params: Params, server: Server, plan: ServerTrustPlan, journal: Journal
) -> tuple[files.InstallResult, bool]:
    """The writes, each journaled first, one confirmed reload, and the proof; raises (the
    caller undoes) when the server does not take them."""
    policy = trust_policy(params, plan.facts, plan.ident_file)
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
        now = {name: fresh.show(name) for name in plan.settings}
    for name, value in plan.settings.items():
        if now[name] != value:
            raise ServerError(
                f"{name} is '{now[name]}' after the reload, not '{value}'; the change was "
                "rolled back and the server reloaded"
            )
    missing = roots_not_asked_for(plan.host_ip, params.server_port, plan.roots_after)
    if missing:
        raise ServerError(
            f"{params.server_host}:{params.server_port} does not name "
            f"{', '.join(missing)} among the CAs it accepts client certificates from after the "
            "reload (did it load ssl_ca_file? its log says why); ssl_ca_file, pg_hba.conf and "
            "pg_ident.conf were rolled back and the server reloaded"
        )
    kept = {ident.server_dn(r.subject) for r in plan.roots_after}
    retired = [ident.server_dn(r.subject) for r in plan.roots_retired]
    still = still_asked_for(plan.host_ip, params.server_port, [r for r in retired if r not in kept])
    if still:
        raise ServerError(
            f"{params.server_host}:{params.server_port} still names {', '.join(still)} among "
            "the CAs it accepts client certificates from after the reload; ssl_ca_file, "
            "pg_hba.conf and pg_ident.conf were rolled back and the server reloaded"
        )
    return files.InstallResult(tuple(written)), applied


def _loaded_ident_errors(server: Server) -> list[str]:
    """Errors in pg_ident.conf as the server reads it now (PostgreSQL 15+)."""
    rows = server.conn.execute(
        "SELECT line_number, error FROM pg_ident_file_mappings WHERE error IS NOT NULL"
    ).fetchall()
    return [f"line {n}: {e}" for n, e in rows]
