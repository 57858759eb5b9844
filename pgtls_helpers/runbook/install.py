"""Step 3: put the key, the certificate chain and the clients' root in place, with backups."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from pgtls_helpers.errors import PreflightError
from pgtls_helpers.pki import chain as chainmod
from pgtls_helpers.pki import keys
from pgtls_helpers.pki.findings import Finding, raise_for_errors
from pgtls_helpers.postgres import files
from pgtls_helpers.postgres.clients import ClientUser
from pgtls_helpers.postgres.lock import change_lock
from pgtls_helpers.postgres.server import ServerFacts
from pgtls_helpers.runbook.common import (
    ADD_TO_CA_FILES,
    check_pgdata,
    key_passphrase,
    load_bundle,
    open_server,
    passphrase_or_none,
    pem_of,
    save_step,
    server_before,
    ssl_targets,
    target_policy,
)
from pgtls_helpers.runbook.journal import Journal
from pgtls_helpers.runbook.params import Params
from pgtls_helpers.runbook.renewal import RenewalPlan, assess
from pgtls_helpers.runbook.undo import undo_change

# --------------------------------------------------------------------------- step 3


@dataclass(frozen=True)
class InstallStepResult:
    """Step 3: the plan (always) and what was written (when ``apply``)."""

    facts: dict[str, Any]
    plan: list[dict[str, object]]
    preflight: list[Finding]
    installed: files.InstallResult | None
    applied: bool
    renewal: RenewalPlan | None = None  # on a server that serves TLS already
    planned: list[dict[str, object]] = dataclasses.field(default_factory=list)  # for the record

    @property
    def changed(self) -> bool:
        return bool(self.installed and self.installed.changed)

    def summary(self) -> dict[str, Any]:
        return {
            "facts": self.facts,
            "plan": self.plan,
            "planned_files": self.planned,
            "preflight": [f.__dict__ for f in self.preflight],
            "applied": self.applied,
            "changed": self.changed,
            "installed": self.installed.as_dicts() if self.installed else [],
            "renewal": self.renewal.summary() if self.renewal else None,
        }


def step3_install_files(params: Params) -> InstallStepResult:
    """Plan and make the installs: key and certificate where the server's settings point,
    ``root.crt`` for each client OS user. Preflight first; backups of all that is replaced."""
    from pgtls_helpers.pki.findings import check_chain
    from pgtls_helpers.postgres.clients import plan_root_crt, resolve_client_users

    certs, root = load_bundle(params)
    leaf = certs[0]
    key_path = params.work.key
    with open_server(params) as server:
        facts = server.facts()
    check_pgdata(params, facts)
    owner = facts.data_directory_owner or (os.geteuid(), os.getegid())

    cert_target, installed_key, _ = ssl_targets(facts)
    # both paths come from the server's settings: refused before anything is written when
    # they lead outside the places a change may write (postgres/targets.py)
    policy = target_policy(params, facts)
    refused = [
        Finding("error", "target-policy", problem)
        for setting, path in (("ssl_cert_file", cert_target), ("ssl_key_file", installed_key))
        if (problem := policy.problem(path, setting=setting))
    ]
    if refused:
        save_step(
            params,
            "03_install_files",
            InstallStepResult(
                facts=facts.as_dict(), plan=[], preflight=refused, installed=None, applied=False
            ).summary(),
        )
        raise_for_errors(refused, what="nothing was installed")
    # the key: from the work directory, or already installed by an earlier run
    key_bytes: bytes | None = key_path.read_bytes() if key_path.exists() else None
    if key_bytes is None:
        if installed_key.exists() and keys.public_key_matches(
            keys.load_key(
                installed_key.read_bytes(),
                passphrase_or_none(params, installed_key),
                source=str(installed_key),
                validate=False,
            ),
            leaf,
        ):
            key_bytes = installed_key.read_bytes()
        else:
            raise PreflightError(
                f"{key_path}: the private key for this change is gone (it is removed once "
                "installed); start a new change from step 1"
            )
    encrypted = keys.is_encrypted_pem(key_bytes)
    # Only the public halves are compared here, as the server's own check does; a key whose
    # private half were damaged fails the handshake in step 4, which then rolls back.
    key = keys.load_key(
        key_bytes,
        key_passphrase(params) if encrypted else None,
        source=str(key_path),
        validate=False,
    )
    result = chainmod.order_chain([*certs, *([root] if root else [])], leaf=leaf)
    preflight = check_chain(result, key=key, hosts=params.hosts, add=ADD_TO_CA_FILES)
    del key
    if encrypted and not facts.ssl_passphrase_command:
        preflight.append(
            Finding(
                "error",
                "encrypted-key",
                f"{key_path.name} is encrypted but ssl_passphrase_command is not set, so the "
                "server could not read it at reload or restart; set ssl_passphrase_command, or "
                "generate the key without a passphrase",
            )
        )
    # keep a root-owned 0640 key scheme (Debian's ssl-cert group) when that is what is there
    key_owner, key_mode = owner, 0o600
    if installed_key.exists():
        st = installed_key.stat()
        if st.st_uid == 0 and (st.st_mode & 0o777) == 0o640:
            key_owner, key_mode = (0, st.st_gid), 0o640
    server_uid = owner[0]
    if problem := files.key_file_problem(key_mode, key_owner[0], key_owner[1], server_uid):
        preflight.append(
            Finding(
                "error", "key-permissions", f"{installed_key} {problem}; the server would refuse it"
            )
        )
    plan = [
        files.plan_file(installed_key, key_bytes, kind="key", mode=key_mode, owner=key_owner),
        files.plan_file(
            cert_target,
            chainmod.bundle_pem(result),
            kind="certificate",
            mode=0o644,
            owner=owner,
        ),
    ]
    users = resolve_client_users(params.client_system_users)
    # renewal: served now against new, same root or rotation (while one is under way, merge)
    renewal = assess(params, facts, certs, root, users, encrypted_key=encrypted)
    preflight += renewal.findings if renewal else []
    merge = params.client_root_merge or bool(renewal and renewal.rotation)
    if users and root is None:
        preflight.append(
            Finding(
                "error", "missing-issuer", "the chain has no root certificate to give the clients"
            )
        )
    if root is not None:
        plan += [plan_root_crt(u, pem_of(root), merge=merge) for u in users]
    if not any(f.is_error for f in preflight):
        # the whole change before its first write: what step 4 would refuse stops it here
        from pgtls_helpers.runbook.enable import rehearse_enable

        if (refusal := rehearse_enable(params)) is not None:
            preflight.append(
                Finding("error", "step4-would-refuse", f"step 4 would stop: {refusal}")
            )
    planned = InstallStepResult(
        facts=facts.as_dict(),
        plan=[p.describe() for p in plan],
        preflight=preflight,
        installed=None,
        applied=False,
        renewal=renewal,
        planned=[p.record() for p in plan],
    )
    if any(f.is_error for f in preflight) or not params.apply:
        save_step(params, "03_install_files", planned.summary())
        raise_for_errors(preflight, what="nothing was installed")
        return planned
    installed = apply_install(params, facts, plan, users, root, merge=merge)
    # After the install the only copies of the key are the installed one and its backup.
    if key_path.exists():
        key_path.unlink()
    res = dataclasses.replace(planned, installed=installed, applied=True)
    save_step(params, "03_install_files", res.summary())
    return res


def apply_install(
    params: Params,
    facts: ServerFacts,
    plan: list[files.PlannedFile],
    users: list[ClientUser],
    root: x509.Certificate | None,
    *,
    merge: bool,
) -> files.InstallResult:
    """Write the planned files under the server's change lock, each journaled before it is
    written; a failure puts back every file the change touched."""
    from pgtls_helpers.postgres.clients import plan_root_crt

    client_plan = (
        [plan_root_crt(u, pem_of(root), merge=merge) for u in users] if root is not None else []
    )
    if all(p.action == "unchanged" for p in [*plan, *client_plan]):
        # nothing to write: no lock, no journal entry (a no-change rerun leaves no trace)
        return files.InstallResult(tuple(Journal.unchanged(p) for p in [*plan, *client_plan]))
    with (
        open_server(params) as server,
        change_lock(facts.data_directory, facts.data_directory_owner, server, params.change_id),
    ):
        # planned again under the lock: another change may have finished while we waited,
        # and the targets judged again by the same policy as the preflight, by the real path
        # that is then written exactly (a link swapped in afterwards fails the write)
        policy = target_policy(params, facts)
        exact = [(p, files.canonical(p.target)) for p in plan if p.kind != "root.crt"]
        for p, target in exact:  # a client's root.crt: the client-home rules (clients.py)
            if problem := policy.problem(target, setting=f"the {p.kind} file"):
                raise PreflightError(f"{problem}; nothing was installed")
        plan = [
            files.plan_file(target, p.data, kind=p.kind, mode=p.mode, owner=(p.uid, p.gid))
            for p, target in exact
        ]
        # room first: in the work directory for the journal and backups, beside each target
        # for its new file (a full disk stops the step here, before its first write)
        for p in plan:
            files.require_space(
                p.target.parent, 2 * len(p.data) + (64 << 10), what=f"the new {p.target.name}"
            )
        journal = Journal.begin(
            params.work,
            "install",
            server_before(params, facts),
            backing_up=[p.target for p in plan] + [u.root_crt for u in users],
        )
        try:
            done = list(journal.write_files(plan).installed)
            if root is not None:
                for user in users:
                    journal.client_dir(user)
                    planned = plan_root_crt(user, pem_of(root), merge=merge)
                    done.append(journal.write_file(planned))
        except Exception:
            undo_change(params, server=server, reason="undone")
            raise
        journal.end("ok")
    return files.InstallResult(tuple(done))
