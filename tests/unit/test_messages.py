"""What a person reads: each sentence exact, no exception class names, advice that names only
options of the command that printed it, and "next:" lines that run as printed."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import certfactory
import pytest

from pgtls_helpers.cli import build_parser
from pgtls_helpers.cli.chain import ADD_ON_COMMAND_LINE
from pgtls_helpers.errors import PreflightError, is_refusal, refusal_traceback
from pgtls_helpers.pki.chain import order_chain
from pgtls_helpers.pki.findings import check_chain, raise_for_errors, reasons
from pgtls_helpers.runbook.common import ADD_TO_CA_FILES
from pgtls_helpers.runbook.manifest import Manifest, StepRecord
from pgtls_helpers.runbook.params import PARAMETER_NAMES
from pgtls_helpers.runbook.record import pgtls_command
from pgtls_helpers.runbook.terminal import run_summary

CLASS_NAMES = re.compile(r"\b(Pgtls|Input|Preflight|Server|Rollback\w*)Error\b")


def _options(*path: str) -> set[str]:
    """Every option string of ``pgtls PATH...``'s own parser."""
    parser = build_parser()
    for name in path:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return {o for a in parser._actions for o in a.option_strings}


def test_a_missing_intermediate_is_advised_in_each_commands_own_terms() -> None:
    chain = certfactory.make_chain(intermediates=("IntermediateCA_BAR", "IntermediateCA_FOO"))
    without = [c for c in chain.leaf_first() if c != chain.intermediates[-1].cert]
    result = order_chain(without, leaf=chain.leaf.cert)

    (run,) = [f for f in check_chain(result, add=ADD_TO_CA_FILES) if f.code == "missing-issuer"]
    assert run.message == (
        'The issuer "IntermediateCA_FOO" of "db1.example.com" is not among the files, so the '
        'chain stops there; get the CA certificate "IntermediateCA_FOO" and add its file to '
        "ca_files in the parameters and run again."
    )
    assert "--" not in run.message and "ca_files" in PARAMETER_NAMES
    with pytest.raises(PreflightError) as refused:
        raise_for_errors(check_chain(result, add=ADD_TO_CA_FILES), what="the CA's response")
    assert "--pool" not in str(refused.value)

    (cli,) = [f for f in check_chain(result, add=ADD_ON_COMMAND_LINE) if f.code == "missing-issuer"]
    assert cli.message.endswith(
        "add its file to the command line, or pass --pool with a folder or bundle that holds it."
    )
    named = set(re.findall(r"--[a-z-]+", cli.message))
    assert named == {"--pool"}
    assert named <= _options("chain", "inspect") and named <= _options("chain", "bundle")
    assert "--pool" not in _options("run")  # why the runbook must not name it


def test_findings_read_as_sentences_without_stray_punctuation() -> None:
    root = certfactory.make_ca("Root")
    leaf = certfactory.issue("db1.example.com", issuer=root, sans=["db1.example.com"], expired=True)
    findings = check_chain(order_chain([leaf.cert, root.cert]), verify=False)
    with pytest.raises(PreflightError) as refused:
        raise_for_errors(findings, what="the CA's response is not usable")
    text = str(refused.value)
    assert re.fullmatch(
        r'the CA\'s response is not usable: expired: The leaf certificate "db1.example.com" '
        r"expired on \d{4}-\d\d-\d\d \d\d:\d\d UTC; renew it with a new CSR\.",
        text,
    ), text
    assert ".;" not in text and ";." not in text and ".." not in text
    assert not CLASS_NAMES.search(text)
    both = reasons([findings[0], findings[0]])
    assert both.count(".") == 2 * findings[0].message.count(".") and ".;" not in both


def test_a_refusal_renders_as_its_sentence_and_a_bug_keeps_its_traceback() -> None:
    err = PreflightError("ca_files is empty: send server.csr to your CA")
    shown = err._render_traceback_()
    assert shown == refusal_traceback(str(err)) and len(shown) == 1
    assert "PreflightError" not in shown[0] and "Traceback" not in shown[0]
    assert is_refusal(shown, str(err))
    assert not is_refusal(["Traceback (most recent call last):", "KeyError: 'x'"], "'x'")
    assert not hasattr(KeyError("x"), "_render_traceback_")


def _waiting(tmp_path: Path) -> tuple[Manifest, Path]:
    work = tmp_path / "my work"
    m = Manifest(
        kind="change",
        change_id="CHG1",
        outcome="waiting-for-ca",
        server="db1:5432",
        ca_mode="files",
        parameters_file=str(tmp_path / "p.yaml"),
        parameters={"work_dir": str(work), "change_id": "CHG1"},
        csr_file=str(work / "CHG1" / "server.csr"),
        steps=(StepRecord(step="01_key_and_csr", title="key and CSR", status="ok"),),
    )
    return m, tmp_path / "recs" / "CHG1" / "20261203T000000Z"


def test_the_next_line_runs_as_printed(tmp_path: Path) -> None:
    m, record = _waiting(tmp_path)
    (line,) = [ln for ln in run_summary(m, record).splitlines() if ln.startswith("next:")]
    command = line.split("run again: ", 1)[1]
    argv = shlex.split(command)
    assert argv[0] == shlex.split(pgtls_command())[0] and Path(argv[0]).is_absolute()
    assert Path(argv[0]).exists()
    args = build_parser().parse_args(argv[len(shlex.split(pgtls_command())) :])
    assert args.command == "run" and args.params == str(tmp_path / "p.yaml")
    assert args.work == str(tmp_path / "my work") and args.records == str(tmp_path / "recs")


def test_the_step_error_of_a_refusal_names_no_class() -> None:
    m = Manifest(
        kind="change",
        change_id="CHG1",
        outcome="failed",
        server="db1:5432",
        error="ca_files is empty",
        steps=(
            StepRecord(
                step="02_ca_response",
                title="CA response",
                status="failed",
                error="ca_files is empty",
            ),
        ),
    )
    assert not CLASS_NAMES.search(run_summary(m, Path("/r/CHG1/x")))
