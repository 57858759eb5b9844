"""Parameters: plain values in, a validated object out, secrets only by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from pgtls_helpers.errors import InputError
from pgtls_helpers.runbook.params import PARAMETER_NAMES, load_params, read_params_file, redacted

ROOT = Path(__file__).resolve().parents[2]
ISSUE_NAMES = (
    "change_id server_host server_port server_user server_dbname pgdata common_name "
    "subject_alt_names country state locality organization organizational_unit email key_type "
    "key_passphrase_env ca_mode ca_files client_system_users hba_rules reject_non_ssl "
    "verify_hosts apply"
).split()


def test_every_documented_parameter_name_exists() -> None:
    assert set(ISSUE_NAMES) <= set(PARAMETER_NAMES)


@pytest.mark.parametrize("name", ["lab.yaml", "example.yaml"])
def test_shipped_parameter_files_load(name: str) -> None:
    params = load_params(read_params_file(ROOT / "parameters" / name), source=name)
    assert params.change_id and params.common_name
    assert not params.extra, f"{name} has names the runbook does not know: {params.extra}"


def test_verify_hosts_default_to_cn_and_sans_without_duplicates() -> None:
    params = load_params(
        {
            "change_id": "c1",
            "common_name": "db1.example.com",
            "subject_alt_names": ["DB1.example.com", "db1", "10.0.0.5"],
        }
    )
    assert params.hosts == ("db1.example.com", "db1", "10.0.0.5")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"common_name": "db1"}, "'change_id' is missing"),
        ({"change_id": "../x", "common_name": "db1"}, "must be letters"),
        ({"change_id": "c", "common_name": "db1", "ca_mode": "mail"}, "ca_mode must be"),
        (
            {"change_id": "c", "common_name": "db1", "key_passphrase_env": "hunter2 secret"},
            "name of an environment variable",
        ),
        ({"change_id": "c", "common_name": "db1", "apply": "yes"}, "apply must be true or false"),
        ({"change_id": "c", "common_name": "db1", "server_port": "five"}, "server_port"),
    ],
)
def test_bad_values_get_one_sentence(values: dict[str, object], message: str) -> None:
    with pytest.raises(InputError, match=message):
        load_params(values)


def test_a_secret_looking_value_never_survives_redaction() -> None:
    out = redacted({"key_passphrase_env": "PGTLS_PASS", "db_password": "hunter2"})
    assert out == {"key_passphrase_env": "PGTLS_PASS", "db_password": "<redacted>"}


def test_bad_yaml_names_the_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "p.yaml"
    bad.write_text("change_id: x\ncommon_name: [unclosed\n")
    with pytest.raises(InputError, match=r"p.yaml: not valid YAML at line \d"):
        read_params_file(bad)


def test_renewal_and_rotation_parameters() -> None:
    base = {"change_id": "CHG-1", "common_name": "db1.example.com"}
    params = load_params(
        {**base, "new_root": "accept", "reuse_key": True, "add_roots": "a.crt, b.crt"}
    )
    assert params.new_root == "accept" and params.reuse_key
    assert params.add_roots == ("a.crt", "b.crt") and params.remove_roots == ()
    with pytest.raises(InputError, match="new_root must be 'accept'"):
        load_params({**base, "new_root": "yes"})
    with pytest.raises(InputError, match="allow_shorter_validity must be true or false"):
        load_params({**base, "allow_shorter_validity": "yes"})


def test_remove_roots_keeps_fingerprints_and_resolves_files(tmp_path: Path) -> None:
    from pgtls_helpers.runbook.params import resolve_paths

    colons = ":".join(["AB"] * 32)
    out = resolve_paths(
        {"remove_roots": [colons, "old-root.crt"], "add_roots": ["new.crt"]},
        tmp_path / "p.yaml",
        tmp_path / "work",
    )
    assert out["remove_roots"][0] == colons
    assert out["remove_roots"][1] == str((Path.cwd() / "old-root.crt").resolve())
    assert out["add_roots"] == [str((Path.cwd() / "new.crt").resolve())]
