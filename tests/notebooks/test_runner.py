"""The runbook as change management runs it: papermill, headless, into a record."""

from __future__ import annotations

import hashlib
import os
import pwd
import secrets
import stat
import sys
from pathlib import Path

import nbformat
import psycopg
import pytest
from cryptography.hazmat.primitives import hashes
from record_checks import (
    STEP_NAMES,
    assert_no_secrets,
    assert_record_shape,
    params_for,
    run_into,
    statuses,
    write_params,
)

from pgtls_helpers.cli import main as cli_main
from pgtls_helpers.lab import LabCA, LabCluster
from pgtls_helpers.runbook.runner import kernel_name, new_record_dir, run

REPO = Path(__file__).resolve().parents[2]


def _show_ssl(cluster: LabCluster) -> str:
    with psycopg.connect(**cluster.conninfo()) as conn:  # type: ignore[arg-type]
        return str(conn.execute("SHOW ssl").fetchone()[0])  # type: ignore[index]


def _data_files(cluster: LabCluster) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(cluster.pgdata.iterdir())
        if p.is_file() and p.name != "postmaster.pid"
    }


def _no_errors_in(notebook: Path) -> None:
    nb = nbformat.read(notebook, as_version=4)
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out["output_type"] != "error", (notebook.name, out.get("evalue"))
            # the notebooks show rich output only: any stream text is noise from the kernel
            # (history database, warnings) that a reviewer would have to read past
            assert out["output_type"] != "stream", (notebook.name, out.get("text"))


def test_the_demo_runs_all_five_steps_and_leaves_a_complete_record(tmp_path: Path) -> None:
    outcome = run_into(tmp_path, REPO / "parameters" / "lab.yaml")
    assert outcome.exit_code == 0, outcome.summary()
    m = assert_record_shape(outcome)
    assert statuses(outcome) == ["ok"] * 5
    assert m["outcome"] == "ok" and m["lab"]["port"]
    # the last step proves the server accepts only verified TLS
    assert m["verdict"] == "pass"
    checks = {c["check"]: c for c in m["checks"]}
    assert checks["sslmode=disable (non-SSL)"]["observed"] == "fail"
    assert all(c["passed"] for c in m["checks"])
    if os.geteuid() == 0:
        # the lab's client user logs in with a role and ~/.pgpass of its own
        psql = [c for c in m["checks"] if c["check"].startswith("psql as OS user pgtls_client")]
        assert psql and psql[0]["observed"] == "ok", psql
        assert "connected as role pgtls_client" in psql[0]["detail"]
        # that user was this run's own, and left with the run's cluster
        own = m["lab"]["client_user"]
        assert own.startswith("pgtls_client_") and f"psql as OS user {own}" in psql[0]["check"]
        with pytest.raises(KeyError):
            pwd.getpwnam(own)
    # the chain, as the article's CA shapes it, with fingerprints
    roles = [c["role"] for c in m["certificates"]]
    assert roles == ["leaf", "intermediate", "intermediate", "root"]
    assert all(len(c["sha256"]) == 64 for c in m["certificates"])
    assert m["presented_chain"][0]["sha256"] == m["certificates"][0]["sha256"]
    # every file written, with its hash; the replaced pg_hba.conf with its backup
    kinds = {f["kind"]: f for f in m["files"]}
    assert {"key", "certificate", "hba"} <= set(kinds)
    assert kinds["hba"]["action"] == "replace" and kinds["hba"]["backup"]
    assert kinds["hba"]["previous_sha256"] and kinds["key"]["sha256"]
    assert m["parameters"]["key_type"] == "rsa4096"
    for step in STEP_NAMES:
        _no_errors_in(outcome.record_dir / f"{step}.ipynb")
        # headless, the CSR was made from the parameters: no note about names from the CSR
        assert "Names from the CSR" not in (outcome.record_dir / f"{step}.ipynb").read_text()
    # the key left the work directory once installed; the directory stays private
    work = tmp_path / "work" / "lab-demo"
    assert not (work / "server.key").exists()
    assert stat.S_IMODE(work.stat().st_mode) == 0o700
    assert_no_secrets(outcome.record_dir)
    assert str(outcome.record_dir) in outcome.summary()


def test_a_running_server_the_tool_did_not_create_with_ca_mode_lab(
    tmp_path: Path, fresh_cluster: LabCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGPASSFILE", str(fresh_cluster.passfile))
    assert _show_ssl(fresh_cluster) == "off"
    outcome = run_into(tmp_path, write_params(tmp_path / "p.yaml", **params_for(fresh_cluster)))
    assert outcome.exit_code == 0, outcome.summary()
    m = assert_record_shape(outcome)
    assert m["verdict"] == "pass" and m["lab"] is None
    assert _show_ssl(fresh_cluster) == "on"
    hba = (fresh_cluster.pgdata / "pg_hba.conf").read_text()
    assert "hostnossl" in hba and "hostssl" in hba
    assert_no_secrets(outcome.record_dir, fresh_cluster.password())


def test_ca_mode_files_stops_after_the_csr_then_installs_what_the_ca_returned(
    tmp_path: Path,
    fresh_cluster: LabCluster,
    lab_ca: LabCA,
    client_user: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PGPASSFILE", str(fresh_cluster.passfile))
    values = params_for(fresh_cluster, ca_mode="files", client_system_users=[client_user])
    first = run_into(tmp_path, write_params(tmp_path / "p.yaml", **values))
    assert first.exit_code == 0, first.summary()
    assert first.outcome == "waiting-for-ca"
    assert statuses(first) == ["ok", "not-run", "not-run", "not-run", "not-run"]
    assert_record_shape(first)
    work = tmp_path / "work" / "CHG-nb"
    assert stat.S_IMODE((work / "server.key").stat().st_mode) == 0o600
    assert "send" in first.summary() and str(work / "server.csr") in first.summary()
    assert _show_ssl(fresh_cluster) == "off"

    # days later, the CA answers with the article's four files
    from pgtls_helpers.pki.csr import load_csr

    leaf = lab_ca.sign_csr(load_csr((work / "server.csr").read_bytes()))
    reply = lab_ca.write_response(leaf, tmp_path / "ca-reply")
    values["ca_files"] = [str(p) for p in reply]
    second = run_into(tmp_path, write_params(tmp_path / "p.yaml", **values))
    assert second.exit_code == 0, second.summary()
    m = assert_record_shape(second)
    assert statuses(second) == ["ok"] * 5 and m["verdict"] == "pass"
    assert m["certificates"][0]["sha256"] == leaf.fingerprint(hashes.SHA256()).hex()
    psql = [c for c in m["checks"] if c["check"].startswith(f"psql as OS user {client_user}")]
    assert psql and psql[0]["passed"]
    home = Path(pwd.getpwnam(client_user).pw_dir)
    assert (home / ".postgresql" / "root.crt").read_bytes() == reply[-1].read_bytes()
    # the two phases are two records of the same change
    assert first.record_dir.parent == second.record_dir.parent
    assert first.record_dir != second.record_dir
    assert_no_secrets(second.record_dir, fresh_cluster.password())


def test_a_failing_step_says_which_and_why_and_pg_hba_conf_stays_as_it_was(
    tmp_path: Path, fresh_cluster: LabCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGPASSFILE", str(fresh_cluster.passfile))
    hba = fresh_cluster.pgdata / "pg_hba.conf"
    before = hba.read_bytes()
    # well-formed for the parameters, refused by PostgreSQL's own parse of the planned file
    bad = {**params_for(fresh_cluster)["hba_rules"][0], "options": ["clientcert=maybe"]}
    outcome = run_into(
        tmp_path, write_params(tmp_path / "p.yaml", **params_for(fresh_cluster, hba_rules=[bad]))
    )
    assert outcome.exit_code == 1
    m = assert_record_shape(outcome)
    assert m["outcome"] == "failed"
    # step 3 judges the whole change before its first write, step 4's pg_hba.conf included
    assert statuses(outcome) == ["ok", "ok", "failed", "not-run", "not-run"]
    failed = m["steps"][2]
    assert failed["step"] == "03_install_files"
    assert "step4-would-refuse" in failed["error"] and "clientcert" in failed["error"]
    assert "\n" not in failed["error"] and "Traceback" not in failed["error"]
    assert "clientcert" in outcome.summary()
    assert "clientcert" in (outcome.record_dir / "03_install_files.html").read_text()
    assert hba.read_bytes() == before
    assert not (fresh_cluster.pgdata / "server.key").exists()
    assert _show_ssl(fresh_cluster) == "off"
    assert m["verdict"] is None


def test_apply_false_changes_nothing_on_the_server(
    tmp_path: Path, fresh_cluster: LabCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGPASSFILE", str(fresh_cluster.passfile))
    before = _data_files(fresh_cluster)
    outcome = run_into(
        tmp_path, write_params(tmp_path / "p.yaml", **params_for(fresh_cluster, apply=False))
    )
    assert outcome.exit_code == 0, outcome.summary()
    m = assert_record_shape(outcome)
    assert statuses(outcome) == ["ok", "ok", "ok", "ok", "skipped"]
    assert _data_files(fresh_cluster) == before
    assert _show_ssl(fresh_cluster) == "off"
    assert {p["action"] for p in m["planned_files"]} == {"create"}
    assert "+hostnossl" in m["hba_diff"] and m["hba_written"] is False
    assert {s["name"]: (s["before"], s["after"]) for s in m["settings"]}["ssl"] == ("off", "on")
    assert m["files"] == [] and m["verdict"] is None
    html = (outcome.record_dir / "04_enable_ssl.html").read_text()
    assert "apply is false" in html


def test_an_encrypted_key_and_its_passphrase_never_reach_the_record(
    tmp_path: Path, fresh_cluster: LabCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    passphrase = "pp-" + secrets.token_urlsafe(18)
    monkeypatch.setenv("PGPASSFILE", str(fresh_cluster.passfile))
    monkeypatch.setenv("PGTLS_TEST_KEY_PASSPHRASE", passphrase)
    # the server reads the passphrase from a file only it can read, also at reload
    pass_file = fresh_cluster.base / "key-passphrase"
    fd = os.open(pass_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(passphrase + "\n")
    if fresh_cluster.os_user:
        entry = pwd.getpwnam(fresh_cluster.os_user)
        os.chown(pass_file, entry.pw_uid, entry.pw_gid)
    with psycopg.connect(**fresh_cluster.conninfo(), autocommit=True) as conn:  # type: ignore[arg-type]
        conn.execute(f"ALTER SYSTEM SET ssl_passphrase_command = 'cat {pass_file}'")
        conn.execute("ALTER SYSTEM SET ssl_passphrase_command_supports_reload = on")
        conn.execute("SELECT pg_reload_conf()")
    values = params_for(fresh_cluster, key_passphrase_env="PGTLS_TEST_KEY_PASSPHRASE")
    outcome = run_into(tmp_path, write_params(tmp_path / "p.yaml", **values))
    assert outcome.exit_code == 0, outcome.summary()
    m = assert_record_shape(outcome)
    assert m["key_encrypted"] is True
    assert m["verdict"] == "pass"
    assert m["parameters"]["key_passphrase_env"] == "PGTLS_TEST_KEY_PASSPHRASE"
    installed = (fresh_cluster.pgdata / "server.key").read_bytes()
    assert b"ENCRYPTED PRIVATE KEY" in installed
    assert_no_secrets(outcome.record_dir, passphrase, fresh_cluster.password())


def test_unusable_input_exits_2_with_one_line_and_no_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    records = tmp_path / "records"
    cases = {
        "bad.yaml": "change_id: [unclosed\n",
        "no-cn.yaml": "change_id: CHG-1\nca_mode: lab\n",
        "missing-file.yaml": "change_id: CHG-1\ncommon_name: db1.example.com\n"
        f"ca_files: [{tmp_path / 'nowhere.crt'}]\n",
        "unset-env.yaml": "change_id: CHG-1\ncommon_name: db1.example.com\n"
        "key_passphrase_env: PGTLS_TEST_SURELY_UNSET\n",
    }
    # every hba_rules field is judged when the parameters are read: before step 1, not in
    # step 4 after step 3 has replaced the server's files
    rule = "{type: hostssl, database: all, user: all, address: 127.0.0.1/32, method: scram-sha-256}"
    for name, (old, new) in {
        "method-typo.yaml": ("scram-sha-256", "scram-sha265"),
        "cidr-typo.yaml": ("127.0.0.1/32", "127.0.0.1/33"),
        "type-typo.yaml": ("hostssl", "hostsll"),
        "eject.yaml": ("scram-sha-256", "eject"),
        "trust.yaml": ("scram-sha-256", "trust"),
        "plain-host.yaml": ("hostssl", "host"),
    }.items():
        cases[name] = (
            "change_id: CHG-1\ncommon_name: db1.example.com\n"
            f"hba_rules: [{rule.replace(old, new, 1)}]\n"
        )
    for name, text in cases.items():
        path = tmp_path / name
        path.write_text(text)
        code = cli_main(["run", str(path), "--records", str(records), "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2, (name, err)
        assert err.startswith("pgtls: ") and err.count("\n") == 1, err
        assert "Traceback" not in err
        if "hba_rules" in text:
            assert f"{name}: hba_rules[0]:" in err, err
    assert not records.exists()


def test_a_record_directory_is_never_reused(tmp_path: Path) -> None:
    first, _ = new_record_dir(tmp_path, "CHG-1")
    second, _ = new_record_dir(tmp_path, "CHG-1")
    assert first != second and first.is_dir() and second.is_dir()


def test_the_kernel_is_this_interpreter() -> None:
    from jupyter_client.kernelspec import KernelSpecManager

    name = kernel_name()
    argv0 = KernelSpecManager().get_kernel_spec(name).argv[0]
    assert argv0 in ("python", "python3") or Path(argv0).resolve() == Path(sys.executable).resolve()


def test_each_notebook_starts_with_an_empty_namespace(tmp_path: Path) -> None:
    """The five notebooks share a kernel, never names: each starts at In [1], alone."""
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    for i, step in enumerate(STEP_NAMES):
        nb = new_notebook(
            cells=[
                new_markdown_cell(f"# {step}"),
                new_code_cell("change_id: str = 'x'  # id", metadata={"tags": ["parameters"]}),
                new_code_cell(f"assert 'defined_by_{i - 1}' not in globals()\ndefined_by_{i} = 1"),
                new_code_cell("import sys\nsys.version_info >= (3, 11)"),
            ]
        )
        nb.metadata["kernelspec"] = {"name": "python3", "language": "python", "display_name": "P"}
        nbformat.write(nb, notebooks / f"{step}.ipynb")
    params = write_params(
        tmp_path / "p.yaml",
        change_id="CHG-ns",
        common_name="db1.example.com",
        ca_mode="lab",
        apply=True,
    )
    outcome = run(
        params, tmp_path / "records", tmp_path / "work", progress=False, notebooks_dir=notebooks
    )
    assert statuses(outcome) == ["ok"] * 5, outcome.summary()
    for step in STEP_NAMES:
        nb = nbformat.read(outcome.record_dir / f"{step}.ipynb", as_version=4)
        counts = [c.execution_count for c in nb.cells if c.cell_type == "code"]
        assert counts == list(range(1, len(counts) + 1)), (step, counts)
