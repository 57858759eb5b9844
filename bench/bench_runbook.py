"""How long the lab runbook takes through the notebooks, and what the notebooks cost.

In one run of this script, the embedded default (``parameters/lab.yaml``: a throwaway cluster,
the article-shaped throwaway CA, an RSA 4096 key) goes through the change twice:

(a) as ``make demo`` runs it: ``runner.run`` executes the five notebooks with papermill, renders
    their HTML and writes the record;
(b) the same five steps called directly from Python (``runbook.step1_key_and_csr`` …
    ``step5_verify_clients``) on another throwaway cluster, with no notebook, kernel or record.

It prints both, step by step, and the share of (a) spent on notebook execution, which is
(a) − (b). Goals: (a) under 30 s on a 2-core machine, the notebooks' share under half. Run::

    .venv/bin/python bench/bench_runbook.py [--repeat 3] [--params parameters/lab.yaml]

It prints figures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from pgtls_helpers import runbook
from pgtls_helpers.lab import LabCluster
from pgtls_helpers.params import load_params, read_params_file
from pgtls_helpers.runner import STEPS, _lab_client_user, run

REPO = Path(__file__).resolve().parents[1]
STEP_FUNCTIONS = (
    runbook.step1_key_and_csr,
    runbook.step2_ca_response,
    runbook.step3_install_files,
    runbook.step4_enable_ssl,
    runbook.step5_verify_clients,
)


def through_notebooks(params_file: Path, scratch: Path) -> dict[str, float]:
    """(a): the runner, as ``make demo`` calls it."""
    t0 = time.perf_counter()
    outcome = run(params_file, scratch / "records", scratch / "work", progress=False)
    total = time.perf_counter() - t0
    if outcome.exit_code != 0:
        raise SystemExit(f"the notebook run failed:\n{outcome.summary()}")
    times = {s.step: s.seconds for s in outcome.steps}
    times["set-up and record"] = total - sum(times.values())
    times["total"] = total
    return times


def direct(params_file: Path, scratch: Path) -> dict[str, float]:
    """(b): a throwaway cluster, then the five step functions in this process."""
    t0 = time.perf_counter()
    values = read_params_file(params_file)
    values["work_dir"] = str(scratch / "work-direct")
    params = load_params(values)
    cluster = LabCluster.create()
    try:
        cluster.start()
        users = [*params.client_system_users]
        if client := _lab_client_user():
            users.append(client)
        params = dataclasses.replace(
            params,
            server_host=cluster.host,
            server_port=cluster.port,
            server_log_file=str(cluster.log_path),
            client_system_users=tuple(users),
        )
        os.environ["PGPASSFILE"] = str(cluster.passfile)
        times = {"set-up and record": time.perf_counter() - t0}
        for (step, _), func in zip(STEPS, STEP_FUNCTIONS, strict=True):
            t = time.perf_counter()
            result = func(params)
            times[step] = time.perf_counter() - t
        if not getattr(result, "passed", False):
            raise SystemExit("the direct run's verdict is not pass")
    finally:
        os.environ.pop("PGPASSFILE", None)
        t = time.perf_counter()
        cluster.remove()
        times["set-up and record"] += time.perf_counter() - t
    times["total"] = time.perf_counter() - t0
    return times


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=1, help="runs of each (median)")
    parser.add_argument("--params", default=str(REPO / "parameters" / "lab.yaml"))
    args = parser.parse_args(argv)
    params_file = Path(args.params).resolve()
    nb_runs: list[dict[str, float]] = []
    py_runs: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="pgtls-bench-") as tmp:
        for i in range(args.repeat):
            scratch = Path(tmp) / str(i)
            scratch.mkdir()
            nb_runs.append(through_notebooks(params_file, scratch))
            py_runs.append(direct(params_file, scratch))
            shutil.rmtree(scratch, ignore_errors=True)

    def med(runs: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    rows = [*(s for s, _ in STEPS), "set-up and record", "total"]
    print(
        f"lab runbook ({params_file.name}), {args.repeat} run(s) each, median seconds; "
        f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}"
    )
    print(f"  {'':<22}{'notebooks':>11}{'direct':>9}{'difference':>12}")
    for row in rows:
        a, b = med(nb_runs, row), med(py_runs, row)
        print(f"  {row:<22}{a:>11.2f}{b:>9.2f}{a - b:>12.2f}")
    total_nb, total_py = med(nb_runs, "total"), med(py_runs, "total")
    overhead = total_nb - total_py
    share = overhead / total_nb if total_nb else 0.0
    print(
        f"notebook execution (kernels, papermill, HTML, record): {overhead:.2f} s, "
        f"{share:.0%} of the notebook run"
    )
    print(
        f"goals: whole lab runbook under 30 s: {'yes' if total_nb < 30 else 'NO'} "
        f"({total_nb:.1f} s); notebook share under half: {'yes' if share < 0.5 else 'NO'} "
        f"({share:.0%})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
