"""Back out an applied change from its journals."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pgtls_helpers.errors import PreflightError
from pgtls_helpers.postgres import files
from pgtls_helpers.runbook.common import (
    address_of,
    open_server,
    save_step,
)
from pgtls_helpers.runbook.enable import keep_key_for_retry, presented_rows
from pgtls_helpers.runbook.params import Params


@dataclass(frozen=True)
class RollbackResult:
    """What a back-out restored, and how the server answers afterwards."""

    restored: list[str]
    settings: dict[str, str | None]
    ssl_after: bool
    presented: list[dict[str, str]]

    def summary(self) -> dict[str, Any]:
        return dict(self.__dict__)


def rollback_change(params: Params) -> RollbackResult:
    """Back out a completed (or half-done) change: pg_hba.conf and the settings step 4 changed,
    the files step 3 installed, each put back from its backup (bytes, owner, mode); then one
    reload. The installed key goes back to the work directory, so the change can be redone
    without a new CSR. Raises :class:`PreflightError` when there is nothing to back out.
    """
    from pgtls_helpers.postgres.probe import probe

    enable_path = params.work.enable_journal
    install_path = params.work.install_journal
    if not enable_path.exists() and not install_path.exists():
        raise PreflightError(
            f"{params.work.path}: no install or enable journal for change {params.change_id}; "
            "nothing was applied, or it was already rolled back"
        )
    restored: list[str] = []
    previous: dict[str, str | None] = {}
    stamp = files.utc_stamp()
    with open_server(params) as server:
        if enable_path.exists():
            journal = json.loads(enable_path.read_text())
            previous = dict(journal["settings_previous"])
            hba_items = [
                files.Installed.from_dict(i) for i in journal["files"] if i["kind"] == "hba"
            ]
            restored += [str(p) for p in files.rollback(hba_items)]
            for name, value in previous.items():
                server.alter_system(name, value)
            enable_path.rename(enable_path.with_name(f"enable.rolled-back-{stamp}.json"))
        if install_path.exists():
            installed = files.load_journal(install_path)
            keep_key_for_retry(params, installed)
            restored += [str(p) for p in files.rollback(installed)]
            install_path.rename(install_path.with_name(f"install.rolled-back-{stamp}.json"))
        server.reload_and_wait()
        ssl_after = server.facts().ssl
    after = probe(address_of(params.server_host), params.server_port, timeout=5.0)
    res = RollbackResult(restored, previous, ssl_after, presented_rows(after) if after.ok else [])
    save_step(params, "rollback", res.summary())
    return res
