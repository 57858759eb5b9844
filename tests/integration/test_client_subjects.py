"""Step c1's client form and what it saves: the values pass the parameters file's checks, are
saved in the change's work directory, and step c1 run headless makes its CSRs from them;
anything refused leaves no file and says what to fix."""

from __future__ import annotations

import json
import re
from html import unescape
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from pgtls_helpers import notebook as pgtls
from pgtls_helpers.errors import InputError
from pgtls_helpers.runbook.client_keys import step_c1_client_keys
from pgtls_helpers.runbook.client_subjects import saved_clients
from pgtls_helpers.runbook.params import Params, load_params

RULE = {"type": "hostssl", "database": "all", "address": "10.0.0.0/8", "method": "cert"}


def _params(tmp_path: Path, **over: Any) -> Params:
    values: dict[str, Any] = {
        "change_id": "CHG-form",
        "common_name": "db1.lab.pgtls.test",
        "key_type": "ecdsa-p256",
        "ca_mode": "lab",
        "work_dir": str(tmp_path / "work"),
        "clients": [
            {"os_user": "alice", "role": "alice"},
            {"os_user": "bob", "role": "bob_db", "subject": "CN=bob,OU=dba,O=Example"},
        ],
        "ident_maps": [{"map": "certmap", "system_user": "bob", "role": "bob_db"}],
        "hba_rules": [
            {**RULE, "user": "alice"},
            {**RULE, "user": "bob_db", "options": ["map=certmap"]},
        ],
    }
    values.update(over)
    return load_params(values, source="test")


def _text(html: str) -> str:
    return " ".join(unescape(re.sub(r"<[^>]+>", " ", html)).split())


def _csr_subject(params: Params, os_user: str) -> str:
    csr = x509.load_pem_x509_csr(params.work.client(os_user).csr.read_bytes())
    return csr.subject.rfc4514_string()


def test_a_subject_taken_in_the_form_is_what_step_c1_makes_headless(tmp_path: Path) -> None:
    params = _params(tmp_path)
    form = pgtls.client_form(params)
    alice = form.rows[0]
    assert (alice.role.value, alice.kind.value, alice.map.value) == ("alice", "cn", "")
    alice.kind.value = "dn"
    alice.dn.value = "CN=alice,OU=ops,O=Example"
    # the DN as the server will see it: as clientname=DN matches it, as pg_stat_ssl shows it
    preview = _text(alice.preview.value)
    assert "CN=alice,OU=ops,O=Example" in preview and "/O=Example/OU=ops/CN=alice" in preview
    form.button.click()
    assert "the next cells use these values" in form.status.value
    saved = json.loads(params.work.client_subjects.read_text())
    assert saved["format"] == 1 and saved["clients"][0]["subject"] == "CN=alice,OU=ops,O=Example"

    # a headless run of the same parameters: step c1 alone, no form, reads the saved values
    result = step_c1_client_keys(params)
    assert [c.subject for c in result.clients] == [
        "CN=alice,OU=ops,O=Example",
        "CN=bob,OU=dba,O=Example",
    ]
    assert _csr_subject(params, "alice") == "CN=alice,OU=ops,O=Example"
    assert _csr_subject(params, "bob") == "CN=bob,OU=dba,O=Example"


def test_without_a_saved_file_the_parameters_are_used_as_they_are(tmp_path: Path) -> None:
    params = _params(tmp_path)
    assert saved_clients(params) is None
    pgtls.client_form(params)  # drawing the form saves nothing
    assert not params.work.client_subjects.exists()
    step_c1_client_keys(params)
    assert _csr_subject(params, "alice") == "CN=alice"


def test_a_bad_value_shows_its_sentence_and_leaves_no_file(tmp_path: Path) -> None:
    params = _params(tmp_path)
    form = pgtls.client_form(params)
    bob = form.rows[1]
    bob.dn.value = "CN=bob,,O=Example"
    assert "is not a distinguished name" in _text(bob.error.value)
    form.button.click()
    assert "not taken" in form.status.value
    assert not params.work.client_subjects.exists()
    with pytest.raises(InputError, match="were not taken"):
        _ = form.params
    bob.dn.value = "CN=bob,OU=dba,O=Example"
    bob.role.value = "bob db"
    assert "name the role as one word" in _text(bob.error.value)
    bob.role.value = "bob_db"
    assert bob.error.value == ""
    with pytest.raises(InputError, match="were not taken"):
        _ = form.params  # the refusal holds until the button is pressed again
    form.button.click()
    assert [dict(c) for c in form.params.clients][1]["subject"] == "CN=bob,OU=dba,O=Example"
    bob.role.value = "bob_admin"
    with pytest.raises(InputError, match="was not pressed"):
        _ = form.params


def test_a_dn_the_hba_line_cannot_map_is_flagged_with_step_c4s_sentence(tmp_path: Path) -> None:
    params = _params(tmp_path)
    form = pgtls.client_form(params)
    alice = form.rows[0]
    alice.kind.value = "dn"
    alice.dn.value = "CN=Alice Smith,OU=dba,O=Example"
    flag = _text(alice.preview.value)
    assert "step c4 will refuse this: clients: alice's certificate names 'Alice Smith'" in flag
    assert "add map=NAME to the line and an ident_maps line for it" in flag
    # a map in bob's line: the form writes the pg_ident.conf line the new DN needs
    bob = form.rows[1]
    assert bob.map.value == "certmap"
    bob.dn.value = "CN=robert,OU=dba,O=Example"
    assert "certmap robert bob_db" in _text(bob.preview.value)
    assert "will refuse" not in _text(bob.preview.value)
    bob.map.value = "othermap"
    assert "which has no line mapping it to role bob_db" in _text(bob.preview.value)
    bob.map.value = "certmap"
    alice.kind.value = "cn"
    form.button.click()
    saved = saved_clients(params)
    assert saved is not None
    assert [dict(m) for m in saved.ident_maps] == [
        {"map": "certmap", "system_user": "robert", "role": "bob_db"}
    ]
    shown = pgtls.show_client_values(pgtls.client_form(params))
    assert "the form, as saved in" in shown.text and "CN=robert,OU=dba,O=Example" in shown.text


def test_a_saved_file_for_other_clients_or_damaged_is_refused_with_the_fix(
    tmp_path: Path,
) -> None:
    params = _params(tmp_path)
    pgtls.client_form(params).button.click()
    fewer = _params(tmp_path, clients=[{"os_user": "alice", "role": "alice"}])
    with pytest.raises(InputError, match="saved for the clients alice, bob, but the parameters"):
        step_c1_client_keys(fewer)
    path = params.work.client_subjects
    path.write_text('{"format": 1, "clients": "alice"}')
    with pytest.raises(InputError, match="client_subjects.json: clients is not a list"):
        step_c1_client_keys(params)
    data = {"format": 1, "clients": [{"os_user": "alice", "role": "alice", "subject": "OU=x"}]}
    data["clients"].append({"os_user": "bob", "role": "bob_db"})
    path.write_text(json.dumps({**data, "ident_maps": []}))
    with pytest.raises(InputError, match="subject must be a DN with a CN"):
        step_c1_client_keys(params)
    assert not params.work.clients.exists() or not any(params.work.clients.rglob("*.csr"))


def test_the_parameters_file_refuses_a_role_that_is_not_one_word(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"test: clients\[0\]: role 'app user' holds a space"):
        _params(tmp_path, clients=[{"os_user": "alice", "role": "app user"}])
    with pytest.raises(InputError, match="longer than the 63 bytes"):
        _params(tmp_path, clients=[{"os_user": "alice", "role": "r" * 64}])
