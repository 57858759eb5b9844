"""A refusal, as a person meets it: through ``pgtls run`` the step is still "failed", its
reason is the sentence (no exception class), the step's page shows that sentence and no
traceback, the "next:" line runs as printed, and in a notebook run outside the runner (opened
straight from JupyterLab) the refusal is a sentence while a real bug keeps its traceback."""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import nbformat
import papermill
import pytest
from cryptography.x509.oid import NameOID
from papermill.exceptions import PapermillExecutionError
from record_checks import params_for, write_params

from pgtls_helpers.cli import build_parser
from pgtls_helpers.cli import main as cli_main
from pgtls_helpers.errors import refusal_traceback
from pgtls_helpers.lab import LabCA, LabCluster
from pgtls_helpers.pki.csr import load_csr
from pgtls_helpers.runbook.runner import NOTEBOOKS_DIR

CLASS_NAMES = re.compile(r"\b(Pgtls|Input|Preflight|Server|Rollback\w*)Error\b")


def _step(record: Path, name: str) -> dict[str, object]:
    m = json.loads((record / "manifest.json").read_text())
    (step,) = [s for s in m["steps"] if s["step"] == name]
    return dict(step)


def _record_of(out: str) -> Path:
    (index,) = re.findall(r"record: (\S+index\.html)$", out, re.M)
    return Path(index).parent


def test_a_refused_step_is_failed_with_its_sentence_and_the_next_line_runs_as_printed(
    tmp_path: Path,
    fresh_cluster: LabCluster,
    lab_ca: LabCA,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("PGPASSFILE", str(fresh_cluster.passfile))
    values = params_for(fresh_cluster, ca_mode="files", apply=False)
    params_file = write_params(tmp_path / "p.yaml", **values)
    work, records = tmp_path / "work", tmp_path / "records"
    argv = ["run", str(params_file), "--work", str(work), "--records", str(records)]
    assert cli_main([*argv, "--no-progress"]) == 0
    first = capsys.readouterr().out
    csr = work / "CHG-nb" / "server.csr"
    (line,) = [ln for ln in first.splitlines() if ln.startswith("next:")]
    assert line.startswith(f"next: send {csr} to your CA; then list the files it returns in ")

    # the command printed, run as printed: it runs (and, with ca_files still empty, waits)
    printed = shlex.split(line.split("run again: ", 1)[1])
    again = subprocess.run(printed, capture_output=True, text=True, env=os.environ, check=False)
    assert again.returncode == 0 and line in again.stdout, again.stdout + again.stderr

    # the CA's answer holds no certificate for our key: step 2 refuses, in a sentence
    leaf = lab_ca.sign_csr(load_csr(csr.read_bytes()))
    reply = lab_ca.write_response(leaf, tmp_path / "ca-reply")
    write_params(params_file, **{**values, "ca_files": [str(tmp_path / "ca-reply" / "RootCA.crt")]})
    done = subprocess.run(printed, capture_output=True, text=True, env=os.environ, check=False)
    assert done.returncode == 1, done.stdout + done.stderr
    sentence = (
        "none of the CA's files (RootCA.crt) holds a certificate for the key behind "
        "server.csr; was this CSR the one submitted?"
    )
    assert f"     {sentence}\n" in done.stdout, done.stdout
    assert not CLASS_NAMES.search(done.stdout + done.stderr), done.stdout
    record = _record_of(done.stdout)
    step = _step(record, "02_ca_response")
    assert step["status"] == "failed" and step["error"] == sentence
    page = (record / "02_ca_response.html").read_text()
    assert f"The step stopped here: {sentence}" in html.unescape(page.replace("<wbr>", ""))
    assert "Traceback" not in page and not CLASS_NAMES.search(page)
    # the class stays in the record's details: the executed notebook's error output
    nb = nbformat.read(record / "02_ca_response.ipynb", as_version=4)
    (error,) = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert error.ename == "PreflightError" and error.traceback == refusal_traceback(sentence)

    # the CA answers without the intermediate that signed the leaf: advice in run's own terms
    issuer = [c for c in lab_ca.intermediates if c.subject == leaf.issuer][0]
    cn = str(issuer.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
    values["ca_files"] = [str(p) for p in reply if p.name != f"{cn}.crt"]
    write_params(params_file, **values)
    assert cli_main([*argv, "--no-progress"]) == 1
    out, err = capsys.readouterr()
    assert "--pool" not in out + err and not CLASS_NAMES.search(out + err), out
    missing = (
        f'The issuer "{cn}" of "db1.lab.pgtls.test" is not among the files, so the chain stops '
        f'there; get the CA certificate "{cn}" and add its file to ca_files in the parameters '
        "and run again."
    )
    step = _step(_record_of(out), "02_ca_response")
    assert step["status"] == "failed"
    assert str(step["error"]).startswith("the CA's response is not usable: ")
    assert missing in str(step["error"]) and ".;" not in str(step["error"]), step["error"]
    # every option the summary names (the rollback line's, too) is one of its commands'
    run_options = {o for a in _subparser("run")._actions for o in a.option_strings}
    assert set(re.findall(r"(?<!\S)--[a-z-]+", out)) <= run_options, out


def _subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def test_a_notebook_opened_on_its_own_refuses_in_a_sentence_and_a_bug_keeps_its_traceback(
    tmp_path: Path,
) -> None:
    # as JupyterLab opens it: the parameters cell's own values (work_dir "work"), with the
    # change's id and name as a DBA would type them
    with pytest.raises(PapermillExecutionError) as refused:
        papermill.execute_notebook(
            str(NOTEBOOKS_DIR / "01_key_and_csr.ipynb"),
            str(tmp_path / "01.ipynb"),
            parameters={"change_id": "CHG-lab", "common_name": "db1.example.com"},
            kernel_name="python3",
            progress_bar=False,
            cwd=str(tmp_path),
        )
    sentence = (
        "the parameters cell: work_dir 'work' is relative, and a notebook cannot tell what it "
        "is relative to; start JupyterLab with `make notebook` (it injects your parameters "
        "file) or give an absolute work_dir"
    )
    assert refused.value.evalue == sentence and refused.value.ename == "InputError"
    # what the notebook shows: the sentence alone; the class stays in the output's details
    assert refused.value.traceback == refusal_traceback(sentence)
    assert not (tmp_path / "work").exists()

    bug = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell("import pgtls_helpers"),
            nbformat.v4.new_code_cell("def broken():\n    return {}['key']\nbroken()"),
        ]
    )
    nbformat.write(bug, tmp_path / "bug.ipynb")
    with pytest.raises(PapermillExecutionError) as crashed:
        papermill.execute_notebook(
            str(tmp_path / "bug.ipynb"),
            str(tmp_path / "bug-out.ipynb"),
            kernel_name="python3",
            progress_bar=False,
        )
    shown = "\n".join(crashed.value.traceback)
    assert (
        crashed.value.ename == "KeyError"
        and "broken()" in shown
        and len(crashed.value.traceback) > 1
    )
