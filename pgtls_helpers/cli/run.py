"""``pgtls run PARAMS.yaml``: the five notebooks, headless, and the record of the change.

:func:`run_runbook` is also how ``pgtls clients`` and ``pgtls trust`` run their notebooks, after
their own checks of the parameters file (:func:`checked_params`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pgtls_helpers.runbook.params import Params, load_params, read_params_file, resolve_paths
from pgtls_helpers.runbook.runner import run
from pgtls_helpers.runbook.steps import SERVER, Step


def main(args: argparse.Namespace) -> int:
    """Run the runbook; print where the record is and a summary; return the exit status."""
    return run_runbook(args, SERVER)


def run_runbook(args: argparse.Namespace, steps: tuple[Step, ...]) -> int:
    """Run ``steps`` headless as ``args`` say; print the summary and where the record is."""
    outcome = run(
        args.params,
        records_dir=args.records,
        work_dir=args.work,
        progress=not args.no_progress,
        steps=steps,
    )
    sys.stdout.write(outcome.summary() + "\n")
    return outcome.exit_code


def checked_params(params_file: Path, work: str) -> Params:
    """The parameters file read as the runner will read it (exit 2 on anything unusable)."""
    values = resolve_paths(read_params_file(params_file), params_file, work)
    return load_params(values, source=str(params_file))
