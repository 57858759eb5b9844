"""Parameters: plain values in, a validated object out, secrets only by name."""

from __future__ import annotations

import re
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
        (
            {"change_id": "c", "common_name": "db1", "ca_mode": "mail"},
            "ca_mode .mail. is not one of",
        ),
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


_BASE = {"change_id": "c", "common_name": "db1"}
_RULE = {
    "type": "hostssl",
    "database": "all",
    "user": "all",
    "address": "10.0.0.0/24",
    "method": "scram-sha-256",
}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {**_BASE, "reject_nonssl": True},
            "unknown parameter 'reject_nonssl' (did you mean 'reject_non_ssl'?)",
        ),
        (
            {"change_id": "c", "comon_name": "db1"},
            "unknown parameter 'comon_name' (did you mean 'common_name'?)",
        ),
        ({**_BASE, "zzz_qqq": 1}, "unknown parameter 'zzz_qqq' (known names are change_id,"),
        (
            {**_BASE, "hba_rules": [{**_RULE, "metod": "md5"}]},
            "hba_rules[0]: unknown key 'metod' (did you mean 'method'?)",
        ),
        (
            {**_BASE, "hba_rules": [_RULE, {**_RULE, "adress": "x"}]},
            "hba_rules[1]: unknown key 'adress' (did you mean 'address'?)",
        ),
    ],
)
def test_unknown_names_are_refused_with_a_suggestion(
    values: dict[str, object], message: str
) -> None:
    with pytest.raises(InputError, match=re.escape(message)) as info:
        load_params(values)
    text = str(info.value)
    assert text.count(". ") == 0 and "\n" not in text  # one sentence


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("common_name", 42, "common_name must be text"),
        ("country", False, "country must be text"),  # YAML reads NO as false
        ("reject_non_ssl", "no", "reject_non_ssl must be true or false"),
        ("server_port", True, "server_port must be a whole number"),
        ("subject_alt_names", {"a": 1}, "subject_alt_names must be a list"),
        ("subject_alt_names", ["db1", 7], r"subject_alt_names\[1\] must be text"),
        ("hba_rules", ["hostssl all all"], r"hba_rules\[0\] must be a mapping"),
        ("client_roles", ["bob"], "client_roles must be a mapping"),
        ("client_roles", {"bob": 3}, r"client_roles\[bob\] must be text"),
    ],
)
def test_wrong_types_get_one_sentence(name: str, value: object, message: str) -> None:
    with pytest.raises(InputError, match=message):
        load_params({**_BASE, name: value})


def test_the_known_names_come_from_the_dataclass() -> None:
    from dataclasses import fields

    from pgtls_helpers.runbook.params import Params

    assert PARAMETER_NAMES == tuple(f.name for f in fields(Params))
    params = load_params(
        {
            **_BASE,
            "client_system_users": ["bob"],
            "client_roles": {"bob": "app_reader"},
            "server_port": "6543",
        }
    )
    assert params.client_roles == {"bob": "app_reader"} and params.server_port == 6543
    assert load_params({**_BASE, "pgdata": ""}).pgdata is None


def test_a_typo_in_a_parameters_file_runs_nothing(tmp_path: Path) -> None:
    import subprocess
    import sys

    params = tmp_path / "change.yaml"
    params.write_text("change_id: c1\ncommon_name: db1\nca_mode: lab\nreject_nonssl: false\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pgtls_helpers",
            "run",
            str(params),
            "--records",
            str(tmp_path / "records"),
            "--work",
            str(tmp_path / "work"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "reject_nonssl" in lines[0] and "did you mean 'reject_non_ssl'?" in lines[0]
    assert str(params) in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "records").exists() and not (tmp_path / "work").exists()


def test_a_typo_in_a_notebook_parameters_cell_is_refused() -> None:
    from pgtls_helpers import notebook as pgtls

    namespace = {
        "__annotations__": {"change_id": str, "common_name": str, "comon_name": str},
        "change_id": "c1",
        "common_name": "db1",
        "comon_name": "db2",
        "work_dir": "/tmp/pgtls-work",
    }
    with pytest.raises(InputError, match="did you mean 'common_name'"):
        pgtls.notebook_params(namespace)
