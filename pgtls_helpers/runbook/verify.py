"""Step 5: prove from the clients' side that only verified TLS gets in."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from pgtls_helpers.errors import PreflightError
from pgtls_helpers.postgres import files
from pgtls_helpers.postgres.clients import ConnCheck
from pgtls_helpers.runbook.common import address_of, pem_of, save_step
from pgtls_helpers.runbook.params import Params

# --------------------------------------------------------------------------- step 5


@dataclass(frozen=True)
class VerifyResult:
    """Step 5: every connection check, expected against observed, and the verdict."""

    checks: list[ConnCheck]
    verdict: str

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"

    def summary(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "checks": [c.as_dict() for c in self.checks]}


def step5_verify_clients(params: Params) -> VerifyResult:
    """Connect through libpq each way that matters; the ones that must fail must fail for the
    right reason. Also runs ``psql`` as each client OS user with only its ``root.crt`` and its
    own login (``client_roles``, its own ``~/.pgpass``), never the runbook's password."""
    from pgtls_helpers.lab import LabCA
    from pgtls_helpers.postgres.clients import connection_checks, psql_as_user, resolve_client_users

    root_crt = params.work.root
    if not root_crt.exists():
        raise PreflightError(f"{root_crt}: no root certificate for this change; run step 2")
    unrelated = params.work.unrelated_root
    files.atomic_write(
        unrelated, pem_of(LabCA.create(root_name="Unrelated Root CA").root), mode=0o644
    )
    info = params.conninfo()
    if passfile := os.environ.get("PGPASSFILE"):
        info["passfile"] = passfile
    hostaddr = address_of(params.server_host)
    checks = connection_checks(
        info,
        hosts=params.hosts,
        hostaddr=hostaddr,
        root_crt=root_crt,
        unrelated_root=unrelated,
        reject_non_ssl=params.reject_non_ssl,
    )
    for user in resolve_client_users(params.client_system_users):
        # the client's own login: a role named for it (or its name) and its own ~/.pgpass
        checks.append(
            psql_as_user(
                user,
                params.conninfo(),
                host=params.hosts[0],
                hostaddr=hostaddr,
                role=params.client_roles.get(user.name),
            )
        )
    verdict = "pass" if all(c.passed for c in checks) else "fail"
    res = VerifyResult(checks, verdict)
    save_step(params, "05_verify_clients", res.summary())
    return res
