"""Step 4: switch SSL on and require TLS in ``pg_hba.conf``, proven from outside."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509

from pgtls_helpers.errors import PgtlsError, PreflightError, ServerError
from pgtls_helpers.postgres import files, hba, keyfiles, sessions
from pgtls_helpers.runbook.common import (
    address_of,
    fingerprint_of,
    load_bundle,
    open_server,
    save_step,
    ssl_targets,
)
from pgtls_helpers.runbook.params import Params
from pgtls_helpers.runbook.renewal import ReloadWatch

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
    sessions_refused: list[dict[str, Any]] = field(default_factory=list)  # see postgres.sessions

    def summary(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _expected_leaf(params: Params) -> x509.Certificate:
    certs, _ = load_bundle(params)
    return certs[0]


def _probe_until(host: str, port: int, want_sha: str, timeout: float = 15.0) -> Any:
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


def _server_log_line(params: Params, server: Any, since: int = 0) -> str | None:
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


def step4_enable_ssl(params: Params) -> EnableResult:
    """``ssl = on``, the pg_hba.conf rules, and proof that the server presents the new chain.

    Order matters, because one reload applies everything at once: the pg_hba.conf text is
    checked by the server itself (``pg_hba_file_rules``) before anything is reloaded; then SSL
    is turned on and confirmed from outside; only then is pg_hba.conf written and reloaded, so
    a certificate the server cannot load never leaves it with TLS-only rules and no TLS. Any
    failure rolls back this step's settings, pg_hba.conf and the files of step 3, and reloads.
    The whole step runs on one connection opened before any change, so a rollback never needs
    a new login.
    """
    expected = _expected_leaf(params)
    want_sha = fingerprint_of(expected)
    rules = hba.parse_rules(list(params.hba_rules))
    host_ip = address_of(params.server_host)
    from pgtls_helpers.postgres.probe import probe

    server = open_server(params)
    try:
        facts = server.facts()
        hba_text = facts.hba_file.read_text()
        plan = hba.plan_hba(
            hba_text,
            rules,
            reject_non_ssl=params.reject_non_ssl,
            path=str(facts.hba_file),
            label=f"pgtls {params.change_id}",
        )
        refused = sessions.refused_sessions(server.conn, plan.after)
        before = probe(host_ip, params.server_port, timeout=5.0) if facts.ssl else None
        serving_new = bool(
            before
            and before.error is None
            and before.chain
            and fingerprint_of(before.chain[0]) == want_sha
        )
        settings = {} if facts.ssl else {"ssl": "on"}
        settings.update(ssl_targets(facts)[2])
        needs_ssl = bool(settings) or not serving_new
        planned = [
            f"ALTER SYSTEM SET {name} = '{value}' (now: "
            f"'{'off' if name == 'ssl' else facts.as_dict().get(name, '')}')"
            for name, value in settings.items()
        ]
        if not params.apply or not (needs_ssl or plan.changed):
            nothing = not (needs_ssl or plan.changed)
            res = EnableResult(
                facts.ssl,
                facts.ssl,
                plan.diff(),
                plan.added,
                False,
                presented_rows(before) if before else [],
                before.tls_version if before else None,
                confirmed=nothing,
                changed=False,
                applied=params.apply,
                messages=[
                    "nothing to change: SSL is on, pg_hba.conf has the rules and the "
                    "server presents the new certificate"
                ]
                if nothing
                else ["plan only (apply: false): nothing was changed", *planned],
                sessions_refused=refused,
            )
            save_step(params, "04_enable_ssl", res.summary())
            return res

        stamp = files.utc_stamp()
        hba_st = facts.hba_file.stat()
        hba_mode, hba_owner = hba_st.st_mode & 0o777, (hba_st.st_uid, hba_st.st_gid)
        if plan.changed:
            _validate_hba(server, facts, plan, hba_mode, hba_owner, stamp)

        log_at = _log_offset(params)
        undo = _Undo(params, server, {name: server.auto_conf_value(name) for name in settings})
        after, renewed = before, None
        settings_write = files.InstallResult(())
        if needs_ssl:
            if settings:

                def alter() -> None:
                    for name, value in settings.items():
                        server.alter_system(name, value)

                auto_conf = _auto_conf_change(facts, stamp, alter)
                if auto_conf is not None:
                    settings_write = files.InstallResult((auto_conf,))
            setting_errors = server.file_setting_errors()
            if setting_errors:
                undo.run(reload=False)
                raise PreflightError(
                    f"configuration errors: {'; '.join(setting_errors)}; "
                    "the setting was restored and nothing was reloaded"
                )
            watch = ReloadWatch(params, host_ip, before)  # renewal: loop, restore proof
            server.reload_and_wait()
            after = _probe_until(host_ip, params.server_port, want_sha, timeout=2.0)
            if not (
                after.error is None
                and after.chain
                and fingerprint_of(after.chain[0]) == want_sha
                and _chain_matches_bundle(params, after)
            ):
                undo.run()
                restored = watch.restored()
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
                    "reloaded"
                    + (f"; {restored}" if restored else "")
                    + (f"; the server log says: {line}" if line else "")
                )
            renewed = watch.finish(after)

        hba_write = files.InstallResult(())
        if plan.changed:
            hba_write = files.apply_plan(
                [
                    files.plan_file(
                        facts.hba_file,
                        plan.after.encode(),
                        kind="hba",
                        mode=hba_mode,
                        owner=hba_owner,
                    )
                ],
                stamp=stamp,
            )
            undo.hba = hba_write
            problems = server.hba_errors()
            if not problems:
                server.reload_and_wait()
                problems = _hba_errors_after_reload(params)
            if problems:
                undo.run()
                raise ServerError(
                    f"{facts.hba_file}: {'; '.join(problems)}; pg_hba.conf, settings and files "
                    "were rolled back and the server reloaded"
                )
        assert after is not None
        own = _runbook_tls(params)
        res = EnableResult(
            facts.ssl,
            True,
            plan.diff(),
            plan.added,
            True,
            presented_rows(after),
            after.tls_version,
            confirmed=True,
            changed=True,
            applied=True,
            messages=planned,
            installed=settings_write.as_dicts() + hba_write.as_dicts(),
            runbook_connection=own,
            renewal=renewed,
            sessions_refused=refused,
        )
        _save_enable_journal(params, undo.previous, settings_write, hba_write)
        save_step(params, "04_enable_ssl", res.summary())
        return res
    finally:
        server.close()


def _save_enable_journal(
    params: Params,
    previous: dict[str, str | None],
    settings_write: files.InstallResult,
    hba_write: files.InstallResult,
) -> None:
    """What step 4 changed, for a back-out days later: settings' old values, file backups."""
    path = params.work.enable_journal
    journal = {
        "settings_previous": previous,
        "files": settings_write.as_dicts() + hba_write.as_dicts(),
    }
    files.atomic_write(path, (json.dumps(journal, indent=2) + "\n").encode(), mode=0o600)


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


def _auto_conf_change(facts: Any, stamp: str, change: Any) -> files.Installed | None:
    """Run an ``ALTER SYSTEM`` with a backup of ``postgresql.auto.conf`` taken first.

    ``ALTER SYSTEM RESET`` undoes the setting; the backup is for the reviewer and for a DBA
    who wants the file back byte for byte. None when the file is not readable from here.
    """
    path = Path(facts.data_directory) / "postgresql.auto.conf"
    try:
        before = path.read_bytes()
        backup = files.backup_copy(path, stamp)
    except OSError:
        change()
        return None
    change()
    after = path.read_bytes()
    return files.Installed(
        path, "other", "replace", files.sha256_hex(after), files.sha256_hex(before), backup
    )


def _validate_hba(
    server: Any, facts: Any, plan: hba.HbaPlan, mode: int, owner: tuple[int, int], stamp: str
) -> None:
    """Let the server parse the planned pg_hba.conf, then put the current one back.

    While SSL is off the server reports every hostssl line as "cannot match" and parses no
    further, which would hide a bad option; so our new lines are checked as host lines then.
    No reload happens in between: the running server never sees this text.
    """
    check_text = plan.after if facts.ssl else _as_host_lines(plan)
    trial = files.apply_plan(
        [files.plan_file(facts.hba_file, check_text.encode(), kind="hba", mode=mode, owner=owner)],
        stamp=stamp,
    )
    try:
        problems = [
            e for e in server.hba_errors() if not (not facts.ssl and "because SSL is disabled" in e)
        ]
    finally:
        files.rollback(trial)
        for item in trial.installed:
            if item.backup is not None:
                item.backup.unlink(missing_ok=True)
    if problems:
        raise PreflightError(
            f"{facts.hba_file}: the server would reject {'; '.join(problems)}; the file was "
            "left as it was and nothing was reloaded"
        )


class _Undo:
    """Everything step 4 changed, and step 3's files, undone on the one open connection."""

    def __init__(self, params: Params, server: Any, previous: dict[str, str | None]):
        """``previous``: each setting step 4 changes, and its value in postgresql.auto.conf
        before (None: not set there, so RESET)."""
        self.params, self.server, self.previous = params, server, previous
        self.hba: files.InstallResult = files.InstallResult(())

    def run(self, *, reload: bool = True) -> None:
        files.rollback(self.hba)
        journal = self.params.work.install_journal
        if journal.exists():
            installed = files.load_journal(journal)
            keep_key_for_retry(self.params, installed)
            files.rollback(installed)
            journal.rename(journal.with_name(f"install.rolled-back-{files.utc_stamp()}.json"))
        for name, value in self.previous.items():
            self.server.alter_system(name, value)
        if reload:
            self.server.reload_and_wait()


def keep_key_for_retry(params: Params, installed: files.InstallResult) -> None:
    """Before a rollback overwrites the new key, move it back to the work directory, so that a
    retry needs no new CSR and the key still exists in one place only."""
    work_key = params.work.key
    for item in installed.installed:
        if item.kind == "key" and item.action != "unchanged" and not work_key.exists():
            try:
                data = item.target.read_bytes()
            except OSError:
                continue
            keyfiles.write_private_key(work_key, data)


def _as_host_lines(plan: hba.HbaPlan) -> str:
    added = set(plan.added)
    return "".join(
        ("host   " + line[len("hostssl") :])
        if line.rstrip("\n") in added and line.startswith("hostssl")
        else line
        for line in plan.after.splitlines(keepends=True)
    )


def _hba_errors_after_reload(params: Params) -> list[str]:
    """pg_hba.conf errors as seen by a new connection (which needs the new rules)."""
    try:
        with open_server(params) as fresh:
            return [str(e) for e in fresh.hba_errors()]
    except PgtlsError as exc:
        return [str(exc)]


def presented_rows(result: Any) -> list[dict[str, str]]:
    from pgtls_helpers.postgres.probe import chain_rows

    return chain_rows(result)


def _chain_matches_bundle(params: Params, presented: Any) -> bool:
    certs, _ = load_bundle(params)
    return [fingerprint_of(c) for c in presented.chain] == [fingerprint_of(c) for c in certs]
