"""The record's format (runbook/manifest.py): typed, versioned, read back as written, and
older records read into the same type."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from pgtls_helpers.runbook import manifest as mf
from pgtls_helpers.runbook.pages import change_page, run_page
from pgtls_helpers.runbook.terminal import rollback_summary, run_summary

LEAF = mf.Certificate(
    role="leaf",
    subject="CN=db1.example.com,O=Example",
    issuer="CN=Issuing CA",
    sha256="ab" * 32,
    not_after="2027-12-01T00:00:00+00:00",
    names=("db1.example.com", "10.0.0.5"),
)


def _plan() -> mf.Manifest:
    facts = mf.from_steps(
        {
            "02_ca_response": {
                "chain": [
                    {
                        "role": "leaf",
                        "subject": LEAF.subject,
                        "issuer": LEAF.issuer,
                        "sha256": LEAF.sha256,
                        "not_after": LEAF.not_after,
                        "names": list(LEAF.names),
                    }
                ]
            },
            "03_install_files": {
                "planned_files": [
                    {
                        "target": "/srv/pg/server.crt",
                        "kind": "certificate",
                        "action": "create",
                        "sha256": "cd" * 32,
                        "current_sha256": None,
                    }
                ]
            },
            "04_enable_ssl": {
                "settings_planned": [{"name": "ssl", "before": "off", "after": "on"}],
                "hba_diff": "+hostnossl all all all reject",
                "hba_added": ["hostnossl all all all reject"],
                "changed": False,
            },
        }
    )
    before = mf.ServerState(
        settings={"ssl": "off", "ssl_cert_file": "server.crt"}, served=None, error=None
    )
    return mf.Manifest(
        kind="change",
        change_id="CHG-1",
        outcome="ok",
        server="db1:5432",
        apply=False,
        ca_mode="files",
        certificates=facts.certificates,
        planned_files=facts.planned_files,
        settings=facts.settings(before, before),
        hba_diff=facts.hba_diff,
        hba_added=facts.hba_added,
        server_before=before,
        server_after=before,
        steps=(mf.StepRecord("01_key_and_csr", "Key and CSR", "ok", 1.0),),
    )


def test_a_manifest_reads_back_as_written() -> None:
    m = _plan()
    data = json.loads(json.dumps(m.to_json()))
    assert data["format"] == mf.FORMAT
    assert mf.from_json(data) == m


def test_a_plan_says_planned_settings_as_planned_and_the_certificate_to_install() -> None:
    m = _plan()
    assert [(s.name, s.before, s.after) for s in m.settings if s.changes] == [("ssl", "off", "on")]
    assert m.result == "plan: no change made" and not m.changed
    page = run_page(m)
    assert "Settings now → planned (not applied)" in page
    assert "Certificate to be installed" in page and "db1.example.com, 10.0.0.5" in page
    assert "pg_hba.conf (planned, not written)" in page
    assert "throwaway" not in page  # no lab text in a files-mode record
    terminal = run_summary(m, Path("/r"))
    assert "would run ALTER SYSTEM SET ssl = 'on' (now: 'off')" in terminal
    assert "would write /srv/pg/server.crt (create)" in terminal


def test_a_format_2_rollback_and_a_format_1_sealed_record_read_as_the_same_type() -> None:
    rollback = {
        "record_format": 2,
        "kind": "rollback",
        "dry_run": True,
        "change_id": "CHG-1",
        "server": "db1:5432",
        "files": [{"target": "/srv/pg/server.crt", "kind": "certificate", "what": "removed"}],
        "settings": {"ssl": None},
        "outcome": "planned",
    }
    m = mf.from_json(rollback)
    assert m.backout[0].target == "/srv/pg/server.crt" and m.files == ()
    assert m.reset_settings == {"ssl": None} and m.result == "dry run: nothing restored"
    assert "would be removed: /srv/pg/server.crt" in rollback_summary(m, None)
    sealed = mf.from_json(
        {
            "record_format": 1,
            "change_id": "CHG-1",
            "outcome": "interrupted",
            "in_place": "enable interrupted; pg_hba.conf replaced",
            "steps_with_a_summary": ["01_key_and_csr"],
        }
    )
    assert sealed.in_place == ("enable interrupted; pg_hba.conf replaced",)
    assert [s.step for s in sealed.steps] == ["01_key_and_csr"] and sealed.result == "interrupted"
    page = change_page("CHG-1", [("20261203T000000Z", sealed), ("20261202T000000Z", m)])
    assert "interrupted" in page and "dry run" in page


def test_a_damaged_manifest_still_renders() -> None:
    m = mf.from_json({"kind": 7, "steps": "not a list", "checks": [1, None], "seconds": "x"})
    assert m.kind == "change" and m.steps == () and m.checks == () and m.seconds == 0.0
    assert "<html" in run_page(m)


def test_a_clients_page_says_whether_the_crls_were_installed_or_only_planned() -> None:
    crl = mf.ClientCrl(
        file="/srv/pg/client_ca.crl",
        issuer="CN=Client CA",
        last_update="2026-12-01T00:00:00+00:00",
        next_update="2026-12-08T00:00:00+00:00",
        revoked=1,
        sha256="cd" * 32,
    )
    plan = mf.Manifest(kind="clients", change_id="CHG-c", outcome="ok", client_crls=(crl,))
    assert "CRLs in ssl_crl_file (planned, not written)" in run_page(plan)
    wrote = mf.FileWrite(crl.file, "crl", "create", "ef" * 32, None, None)
    done = mf.Manifest(
        kind="clients", change_id="CHG-c", outcome="ok", apply=True, client_crls=(crl,),
        files=(wrote,),
    )  # fmt: skip
    assert "CRLs in ssl_crl_file (installed)" in run_page(done)


def _clients_used(saved_in: str | None, bob: str) -> mf.ClientsUsed:
    alice = mf.ClientSubject("alice", "alice", "CN=alice")
    maps = (mf.IdentMap("certmap", "bob", "bob_db"),)
    given = (alice, mf.ClientSubject("bob", "bob_db", "CN=bob,OU=dba,O=Example"))
    return mf.ClientsUsed(
        saved_in=saved_in,
        clients=(alice, mf.ClientSubject("bob", "bob_db", bob)),
        ident_maps=maps,
        parameters_clients=given if saved_in else (),
        parameters_ident_maps=maps if saved_in else (),
    )


def test_a_clients_record_says_which_subjects_were_used_and_where_they_came_from(
    tmp_path: Path,
) -> None:
    form = _clients_used("/w/CHG-c/client_subjects.json", "CN=bob,OU=ops,O=Example")
    # each client step keeps what it used; the first step that ran speaks for the run
    later = _clients_used(None, "CN=bob,OU=dba,O=Example")
    facts = mf.from_steps(
        {
            "c1_client_keys": {"clients_used": form.to_json()},
            "c4_server_trust": {"clients_used": later.to_json()},
        }
    )
    assert facts.clients_used == form
    m = mf.Manifest(
        kind="clients", change_id="CHG-c", outcome="ok", clients_used=facts.clients_used
    )
    assert mf.from_json(json.loads(json.dumps(m.to_json()))) == m
    page = run_page(m).replace("<wbr>", "")
    assert (
        "clients and ident_maps: from the c1 form (/w/CHG-c/client_subjects.json), not the "
        "parameters file" in page
    )
    used, _, not_used = page.partition('id="clients-not-used"')
    assert "CN=bob,OU=ops,O=Example" in used and "CN=bob,OU=dba,O=Example" not in used
    assert (
        "Not used: the parameters file says clients alice as alice: CN=alice; bob as " in not_used
    )
    assert "CN=bob,OU=dba,O=Example" in not_used
    summary = run_summary(m, tmp_path)
    assert (
        "clients and ident_maps: from the c1 form (/w/CHG-c/client_subjects.json), not " in summary
    )
    # from the parameters file: said on the page, nothing said to be unused, the terminal quiet
    plain = dataclasses.replace(m, clients_used=later)
    assert "clients and ident_maps: from the parameters file" in run_page(plain)
    assert "Not used" not in run_page(plain) and "clients and" not in run_summary(plain, tmp_path)
    # a record written before the clients were kept reads as not saying
    assert mf.from_json({"kind": "clients", "format": 3}).clients_used is None
