"""Step 4: switch SSL on and require TLS in ``pg_hba.conf``, proven from outside."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509

from pgtls_helpers.errors import InputError, PgtlsError, PreflightError, ServerError
from pgtls_helpers.pki.findings import Finding, raise_for_errors
from pgtls_helpers.postgres import files, hba, hbacheck, sessions
from pgtls_helpers.postgres.lock import change_lock
from pgtls_helpers.postgres.probe import ProbeResult
from pgtls_helpers.postgres.server import Server, ServerFacts
from pgtls_helpers.runbook import journal as wal
from pgtls_helpers.runbook.common import (
    address_of,
    fingerprint_of,
    load_bundle,
    open_server,
    save_step,
    server_before,
    ssl_targets,
    target_policy,
)
from pgtls_helpers.runbook.journal import Journal, fault_point
from pgtls_helpers.runbook.params import Params
from pgtls_helpers.runbook.renewal import ReloadWatch
from pgtls_helpers.runbook.undo import undo_change

# --------------------------------------------------------------------------- step 4


@dataclass(frozen=True)
class EnableResult:
    """Step 4: SSL on, pg_hba.conf changed, and the proof from outside."""

    ssl_before: bool
    ssl_after: bool
    hba_diff: str
    hba_added: tuple[str, ...]
    reloaded: bool
    presented: list[dict[str, str]]
    tls_version: str | None
    confirmed: bool
    changed: bool
    applied: bool
    messages: list[str] = field(default_factory=list)
    installed: list[dict[str, object]] = field(default_factory=list)
    runbook_connection: str | None = None  # pg_stat_ssl of a new connection afterwards
    renewal: dict[str, Any] | None = None  # served before/after, the client loop (renewal.py)
    sessions_refused: list[dict[str, object]] = field(default_factory=list)  # postgres.sessions
    settings_planned: list[dict[str, object]] = field(default_factory=list)  # name, before, after
    settings_applied: bool = False  # ALTER SYSTEM ran and the reload took it
    hba_written: bool = False  # pg_hba.conf was written and reloaded

    def summary(self) -> dict[str, object]:
        return dict(self.__dict__)


def _expected_leaf(params: Params) -> x509.Certificate:
    certs, _ = load_bundle(params)
    return certs[0]


def _probe_until(host: str, port: int, want_sha: str, timeout: float = 15.0) -> ProbeResult:
    from pgtls_helpers.postgres.probe import probe

    deadline = time.monotonic() + timeout
    result = probe(host, port, timeout=5.0)
    while time.monotonic() < deadline:
        if result.error is None and result.chain and fingerprint_of(result.chain[0]) == want_sha:
            return result
        time.sleep(0.1)
        result = probe(host, port, timeout=5.0)
    return result


_LOG_PATTERNS = (
    "could not load",
    "private key file",
    "SSL configuration was not reloaded",
    "pg_hba.conf was not reloaded",
    "FATAL",
)


def _log_offset(params: Params) -> int:
    try:
        return Path(params.server_log_file).stat().st_size if params.server_log_file else 0
    except OSError:
        return 0


def _server_log_line(params: Params, server: Server, since: int = 0) -> str | None:
    """What the server logged about the failure: the cause and its verdict, in order."""
    lines: list[str] = []
    if params.server_log_file:
        try:
            with open(params.server_log_file, "rb") as fh:
                fh.seek(since)
                lines = fh.read().decode(errors="replace").splitlines()
        except OSError:
            lines = []
    if not lines:
        for pattern in _LOG_PATTERNS:
            try:
                found = server.log_tail(pattern)
            except PgtlsError:
                found = None
            if found:
                lines.append(str(found))
    hits = [ln.strip() for ln in lines if any(p in ln for p in _LOG_PATTERNS)]
    return " / ".join(dict.fromkeys(hits[-3:])) or None


@dataclass(frozen=True)
class EnablePlan:
    """What step 4 would change on this server, decided before anything is touched."""

    facts: ServerFacts
    hba: hba.HbaPlan
    hba_mode: int
    hba_owner: tuple[int, int]
    settings: dict[str, str]
    before: ProbeResult | None
    serving_new: bool
    want_sha: str
    host_ip: str
    sessions_refused: list[dict[str, object]]  # open sessions the new rules would refuse

    @property
    def needs_ssl(self) -> bool:
        return bool(self.settings) or not self.serving_new

    @property
    def changes(self) -> bool:
        return self.needs_ssl or self.hba.changed

    def current(self, name: str) -> str:
        """A planned setting's value now."""
        return "off" if name == "ssl" else str(self.facts.as_dict().get(name, ""))

    def planned_settings(self) -> list[dict[str, object]]:
        return [
            {"name": name, "before": self.current(name), "after": value}
            for name, value in self.settings.items()
        ]

    def lines(self) -> list[str]:
        out = [
            f"ALTER SYSTEM SET {name} = '{value}' (now: '{self.current(name)}')"
            for name, value in self.settings.items()
        ]
        if self.hba.changed and any(a.startswith("hostnossl") for a in self.hba.added):
            out.append(
                "hostnossl … reject also refuses GSS-encrypted (hostgssenc) clients, which "
                "connect without SSL; add hostgssenc lines above it if you have such clients"
            )
        return out


def plan_enable(params: Params, server: Server) -> EnablePlan:
    """Read the server and decide the settings and the pg_hba.conf text; changes nothing."""
    from pgtls_helpers.postgres.probe import probe

    want_sha = fingerprint_of(_expected_leaf(params))
    rules = hba.parse_rules(list(params.hba_rules))
    raise_for_errors(
        [
            Finding(
                "warning" if params.allow_insecure_rules else "error",
                "insecure-hba-rule",
                f"hba_rules: {reason}; use hostssl with a password or certificate method, or "
                "set allow_insecure_rules: true",
            )
            for rule in rules
            if (reason := hba.insecure_reason(rule))
        ],
        what="nothing was changed",
    )
    host_ip = address_of(params.server_host)
    facts = server.facts()
    # hba_file comes from the server: the same target policy as step 3's files
    if problem := target_policy(params, facts).problem(facts.hba_file, setting="hba_file"):
        raise PreflightError(f"{problem}; pg_hba.conf and the settings were not changed")
    hba_text = facts.hba_file.read_bytes().decode()
    plan = hba.plan_hba(
        hba_text,
        rules,
        reject_non_ssl=params.reject_non_ssl,
        path=str(facts.hba_file),
        label=f"pgtls {params.change_id}",
        included=hba.included_tcp_lines(facts.hba_file, hba_text),
    )
    before = probe(host_ip, params.server_port, timeout=5.0) if facts.ssl else None
    serving_new = bool(
        before
        and before.error is None
        and before.chain
        and fingerprint_of(before.chain[0]) == want_sha
    )
    settings = {} if facts.ssl else {"ssl": "on"}
    settings.update(ssl_targets(facts)[2])
    st = facts.hba_file.stat()
    return EnablePlan(
        facts=facts,
        hba=plan,
        hba_mode=st.st_mode & 0o777,
        hba_owner=(st.st_uid, st.st_gid),
        settings=settings,
        before=before,
        serving_new=serving_new,
        want_sha=want_sha,
        host_ip=host_ip,
        sessions_refused=list(sessions.refused_sessions(server.conn, plan.after)),
    )


def rehearse_enable(params: Params) -> str | None:
    """Step 4's plan and checks, run before step 3 writes anything: why step 4 would refuse
    (the planned pg_hba.conf as the server parses it, the runbook's own login), or None. The
    whole change is judged before its first write; step 4 judges again when it runs."""
    try:
        with open_server(params) as server:
            plan = plan_enable(params, server)
            check_enable(params, server, plan, rehearsal=True)
    except (PreflightError, InputError) as exc:
        return str(exc)
    except PgtlsError:
        return None  # the server cannot be asked now: step 3 and step 4 say so themselves
    return None


def check_enable(
    params: Params, server: Server, plan: EnablePlan, *, rehearsal: bool = False
) -> None:
    """Prove the planned pg_hba.conf before it goes live: the server's own parser (a
    throwaway stand-alone backend of the same binaries, SSL on) on a copy, and the runbook's
    own connection still accepted by the planned rules."""
    if not plan.hba.changed:
        return
    owner = plan.facts.data_directory_owner or (os.geteuid(), os.getegid())
    lines = hbacheck.check_hba_text(
        plan.hba.after,
        hba_file=plan.facts.hba_file,
        data_directory=plan.facts.data_directory,
        owner=owner,
    )
    if not rehearsal:
        fault_point("enable:hba-checked")
    problems = [f"line {ln.line_number}: {ln.error}" for ln in lines if ln.error]
    if problems:
        raise PreflightError(
            f"{plan.facts.hba_file}: the server would reject {'; '.join(problems)}; the file "
            "was left as it was and nothing was reloaded"
        )
    own = server.own_connection(tls=os.environ.get("PGSSLMODE", "prefer") != "disable")
    decided = hbacheck.first_match(lines, own)
    if decided is None or decided.auth_method in ("reject", "cert"):
        why = (
            "no line would match it"
            if decided is None
            else f"line {decided.line_number} ({decided.type} … {decided.auth_method}) would "
            + (
                "refuse it"
                if decided.auth_method == "reject"
                else "ask it for a client certificate"
            )
        )
        raise PreflightError(
            f"{plan.facts.hba_file}: the planned rules would lock out the runbook's own "
            f"connection (user {own.user}, database {own.database}, from "
            f"{own.address or 'the local socket'}): {why}; add a line for it to hba_rules. "
            "Nothing was changed"
        )


def step4_enable_ssl(params: Params) -> EnableResult:
    """``ssl = on``, the pg_hba.conf rules, and proof that the server presents the new chain.

    Plan, check, apply, prove; undo on any failure. The pg_hba.conf text is checked before it
    goes live (:func:`check_enable`); SSL is turned on and confirmed from outside first, and
    only then is pg_hba.conf written, so a certificate the server cannot load never leaves it
    with TLS-only rules and no TLS. Each change is journaled before it is made
    (:mod:`pgtls_helpers.runbook.journal`), every reload is asked for and confirmed on the one
    connection opened before any change, and a failure puts back every file of the change
    (step 3's too) and reloads on that connection.
    """
    server = open_server(params)
    try:
        plan = plan_enable(params, server)
        if not params.apply or not (plan.changes or _interrupted(params)):
            return _unchanged(params, plan)
        with change_lock(
            plan.facts.data_directory, plan.facts.data_directory_owner, server, params.change_id
        ):
            plan = plan_enable(params, server)  # again, under the lock
            if not plan.changes:
                _finish_interrupted(params, server, plan)
                return _unchanged(params, plan)
            check_enable(params, server, plan)
            files.require_space(
                plan.facts.hba_file.parent,
                2 * len(plan.hba.after.encode()) + (64 << 10),
                what="the new pg_hba.conf",
            )
            journal = Journal.begin(
                params.work,
                "enable",
                server_before(params, plan.facts),
                backing_up=[
                    plan.facts.hba_file,
                    plan.facts.data_directory / "postgresql.auto.conf",
                ],
            )
            try:
                settings_write, hba_write, after, renewed = apply_enable(
                    params, server, plan, journal
                )
            except Exception:
                if params.work.journal.exists():  # not undone already
                    undo_change(params, server=server, reason="undone")
                raise
            journal.end("ok")
        res = EnableResult(
            ssl_before=plan.facts.ssl,
            ssl_after=True,
            hba_diff=plan.hba.diff(),
            hba_added=plan.hba.added,
            reloaded=True,
            presented=presented_rows(after),
            tls_version=after.tls_version,
            confirmed=True,
            changed=True,
            applied=True,
            messages=plan.lines(),
            installed=settings_write.as_dicts() + hba_write.as_dicts(),
            runbook_connection=_runbook_tls(params),
            renewal=renewed,
            sessions_refused=plan.sessions_refused,
            settings_planned=plan.planned_settings(),
            settings_applied=settings_write.changed,
            hba_written=hba_write.changed,
        )
        save_step(params, "04_enable_ssl", res.summary())
        return res
    finally:
        server.close()


def _interrupted(params: Params) -> bool:
    """An earlier step 4 of this change was stopped before it recorded its end."""
    return "enable" in wal.unfinished_steps(wal.read_entries(params.work.journal))


def _finish_interrupted(params: Params, server: Server, plan: EnablePlan) -> None:
    """Everything is written but an earlier run was stopped, perhaps before its reload: reload
    (journaled, confirmed on this connection) and prove, so the files on disk are what runs."""
    if not _interrupted(params):
        return
    journal = Journal.begin(params.work, "enable", server_before(params, plan.facts))
    try:
        journal.reload("finish", server.reload_confirmed)
        prove_hba(params, server, plan)
    except Exception:
        undo_change(params, server=server, reason="undone")
        raise
    journal.end("ok")


def _unchanged(params: Params, plan: EnablePlan) -> EnableResult:
    nothing = not plan.changes
    before = plan.before
    res = EnableResult(
        ssl_before=plan.facts.ssl,
        ssl_after=plan.facts.ssl,
        hba_diff=plan.hba.diff(),
        hba_added=plan.hba.added,
        reloaded=False,
        presented=presented_rows(before) if before else [],
        tls_version=before.tls_version if before else None,
        confirmed=nothing,
        changed=False,
        applied=params.apply,
        messages=[
            "nothing to change: SSL is on, pg_hba.conf has the rules and the "
            "server presents the new certificate"
        ]
        if nothing
        else ["plan only (apply: false): nothing was changed", *plan.lines()],
        sessions_refused=plan.sessions_refused,
        settings_planned=plan.planned_settings(),
    )
    save_step(params, "04_enable_ssl", res.summary())
    return res


def apply_enable(
    params: Params, server: Server, plan: EnablePlan, journal: Journal
) -> tuple[files.InstallResult, files.InstallResult, ProbeResult, dict[str, object] | None]:
    """Make the change, each part journaled first and proven before the next; raise (the
    caller undoes) when the server does not take it."""
    log_at = _log_offset(params)
    after, renewed = plan.before, None
    settings_write = files.InstallResult(())
    if plan.needs_ssl:
        if plan.settings:
            settings_write = _apply_settings(server, plan, journal)
        setting_errors = server.file_setting_errors()
        if setting_errors:
            raise PreflightError(
                f"configuration errors: {'; '.join(setting_errors)}; the change was undone "
                "and nothing of it stays loaded"
            )
        watch = ReloadWatch(params, plan.host_ip, plan.before)  # renewal: loop, restore proof
        try:
            journal.reload("ssl", server.reload_confirmed)
            after = prove_ssl(params, server, plan, log_at=log_at)
        except Exception as exc:
            undo_change(params, server=server, reason="undone")
            restored = watch.restored()
            if restored and isinstance(exc, ServerError):
                raise ServerError(f"{exc}; {restored}") from exc
            raise
        renewed = watch.finish(after)
    hba_write = files.InstallResult(())
    if plan.hba.changed:
        # judged again by its real path, which is then written exactly (postgres/files.py)
        hba_target = files.canonical(plan.facts.hba_file)
        if problem := target_policy(params, plan.facts).problem(hba_target, setting="hba_file"):
            raise PreflightError(problem)
        planned = files.plan_file(
            hba_target,
            plan.hba.after.encode(),
            kind="hba",
            mode=plan.hba_mode,
            owner=plan.hba_owner,
        )
        hba_write = files.InstallResult((journal.write_file(planned),))
        journal.reload("hba", server.reload_confirmed)
        prove_hba(params, server, plan)
    if after is None:
        raise ServerError(f"{params.server_host}:{params.server_port}: nothing was probed")
    return settings_write, hba_write, after, renewed


def _apply_settings(server: Server, plan: EnablePlan, journal: Journal) -> files.InstallResult:
    """``ALTER SYSTEM`` for each planned setting, journaled as a change of the auto.conf."""
    previous = {name: server.auto_conf_value(name) for name in plan.settings}

    def alter() -> None:
        for name, value in plan.settings.items():
            server.alter_system(name, value)

    auto_conf = journal.change_auto_conf(
        plan.facts.data_directory / "postgresql.auto.conf", plan.settings, previous, alter
    )
    return files.InstallResult((auto_conf,) if auto_conf is not None else ())


def prove_ssl(params: Params, server: Server, plan: EnablePlan, *, log_at: int) -> ProbeResult:
    """The server presents the new chain from outside, or :class:`ServerError` with its log."""
    after = _probe_until(plan.host_ip, params.server_port, plan.want_sha, timeout=2.0)
    if (
        after.error is None
        and after.chain
        and fingerprint_of(after.chain[0]) == plan.want_sha
        and _chain_matches_bundle(params, after)
    ):
        return after
    seen = after.error or (
        f"it presents {after.chain[0].subject.rfc4514_string()} "
        f"({fingerprint_of(after.chain[0])[:16]}…), not the new certificate"
        if after.chain
        else "no certificate"
    )
    line = _server_log_line(params, server, log_at)
    raise ServerError(
        f"{params.server_host}:{params.server_port} did not take the new "
        f"certificate ({seen}); files and settings were rolled back and the server "
        "reloaded" + (f"; the server log says: {line}" if line else "")
    )


def prove_hba(params: Params, server: Server, plan: EnablePlan) -> None:
    """The loaded pg_hba.conf has no error and a new login of the runbook's own gets in."""
    problems = server.hba_errors() or _hba_errors_after_reload(params)
    if problems:
        raise ServerError(
            f"{plan.facts.hba_file}: {'; '.join(problems)}; pg_hba.conf, settings and files "
            "were rolled back and the server reloaded"
        )


def _runbook_tls(params: Params) -> str | None:
    """What ``pg_stat_ssl`` says of a new connection of the runbook's own, after the change."""
    try:
        with open_server(params) as fresh:
            status = fresh.ssl_status()
    except PgtlsError:
        return None
    if not status.ssl:
        return "no TLS"
    return f"{status.version} {status.cipher} ({status.bits} bits)"


def _hba_errors_after_reload(params: Params) -> list[str]:
    """pg_hba.conf errors as seen by a new connection (which needs the new rules)."""
    try:
        with open_server(params) as fresh:
            return [str(e) for e in fresh.hba_errors()]
    except PgtlsError as exc:
        return [str(exc)]


def presented_rows(result: ProbeResult) -> list[dict[str, str]]:
    from pgtls_helpers.postgres.probe import chain_rows

    return chain_rows(result)


def _chain_matches_bundle(params: Params, presented: ProbeResult) -> bool:
    certs, _ = load_bundle(params)
    return [fingerprint_of(c) for c in presented.chain] == [fingerprint_of(c) for c in certs]
