"""How long the lab runbook takes through the notebooks, and what the notebooks cost.

In one run of this script, the embedded default (``parameters/lab.yaml``: a throwaway cluster,
the article-shaped throwaway CA, an RSA 4096 key) goes through the change twice:

(a) as ``make demo`` runs it: ``runner.run`` executes the five notebooks with papermill, renders
    their HTML and writes the record;
(b) the same five steps called directly from Python (``runbook.step1_key_and_csr`` …
    ``step5_verify_clients``) on another throwaway cluster, with no notebook, kernel or record.

It prints both, step by step, with the size of each step's page in (a)'s record (and of
``index.html`` and the whole record), and the share of (a) spent on notebook execution, which is
(a) − (b). The same comparison is made once more with each side as a fresh process (``python
-m pgtls_helpers run`` against a process that imports the package and calls the five steps), so
that start-up and imports count as they do for ``make demo``. Goals: (a) under 30 s on a 2-core
machine, the notebooks' share under half.

Before all that it times the set-up a first ``make demo`` pays: ``make venv`` in a fresh clone
of this checkout (``git clone``; the venv made and the package installed, by uv where it can
be had, else pip), from this machine's wheel cache as it is, and prints it beside the
runbook's time (goal: set-up and runbook together, a cold ``make demo``, under 60 s). Run::

    .venv/bin/python bench/bench_runbook.py [--repeat 3] [--params parameters/lab.yaml] [--no-setup]

It prints figures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from pgtls_helpers import notebook as runbook
from pgtls_helpers.lab import LabCluster
from pgtls_helpers.runbook.params import load_params, read_params_file
from pgtls_helpers.runbook.runner import (
    STEPS,
    lab_client_user,
    on_lab_cluster,
    remove_lab_client_user,
    run,
)

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
    SIZES.append(record_sizes(outcome.record_dir))
    return times


SIZES: list[dict[str, int]] = []


def record_sizes(record: Path) -> dict[str, int]:
    """Bytes of each step's page, of index.html, of manifest.json, and of the whole record."""
    sizes = {step: (record / f"{step}.html").stat().st_size for step in (s.name for s in STEPS)}
    sizes["set-up and record"] = (record / "index.html").stat().st_size
    sizes["manifest.json"] = (record / "manifest.json").stat().st_size
    sizes["total"] = sum(p.stat().st_size for p in record.rglob("*") if p.is_file())
    return sizes


def direct(params_file: Path, scratch: Path) -> dict[str, float]:
    """(b): a throwaway cluster, then the five step functions in this process."""
    t0 = time.perf_counter()
    values = read_params_file(params_file)
    values["work_dir"] = str(scratch / "work-direct")
    params = load_params(values)
    cluster = LabCluster.create()
    client = None
    try:
        cluster.start()
        client = lab_client_user(private=True)  # as make demo's run has: removed afterwards
        params = on_lab_cluster(params, cluster, client_user=client)
        os.environ["PGPASSFILE"] = str(cluster.passfile)
        times = {"set-up and record": time.perf_counter() - t0}
        for step, func in zip((s.name for s in STEPS), STEP_FUNCTIONS, strict=True):
            t = time.perf_counter()
            result = func(params)
            times[step] = time.perf_counter() - t
        if not getattr(result, "passed", False):
            raise SystemExit("the direct run's verdict is not pass")
    finally:
        os.environ.pop("PGPASSFILE", None)
        t = time.perf_counter()
        cluster.remove()
        remove_lab_client_user(client)
        times["set-up and record"] += time.perf_counter() - t
    times["total"] = time.perf_counter() - t0
    return times


def cold(params_file: Path, scratch: Path) -> tuple[float, float]:
    """Both sides as fresh processes: (notebooks, direct) wall-clock seconds."""
    t = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pgtls_helpers",
            "run",
            str(params_file),
            "--no-progress",
            "--records",
            str(scratch / "records"),
            "--work",
            str(scratch / "work"),
        ],
        check=True,
        capture_output=True,
    )
    notebooks = time.perf_counter() - t
    t = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            __file__,
            "--direct-once",
            "--params",
            str(params_file),
            "--scratch",
            str(scratch),
        ],
        check=True,
        capture_output=True,
    )
    return notebooks, time.perf_counter() - t


def setup(scratch: Path) -> tuple[float, str]:
    """Seconds of ``make venv`` in a fresh clone of this checkout, and how it set up."""
    clone = scratch / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    t = time.perf_counter()
    done = subprocess.run(
        ["make", "-C", str(clone), "--no-print-directory", "venv"],
        check=True,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - t
    how = "uv" if "with uv" in done.stdout else "pip"
    shutil.rmtree(clone, ignore_errors=True)
    return seconds, how


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=1, help="runs of each (median)")
    parser.add_argument("--params", default=str(REPO / "parameters" / "lab.yaml"))
    parser.add_argument(
        "--no-setup", action="store_true", help="skip timing make venv in a fresh clone"
    )
    parser.add_argument("--direct-once", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    params_file = Path(args.params).resolve()
    if args.direct_once:  # the direct side of the fresh-process comparison
        direct(params_file, Path(args.scratch))
        return 0
    nb_runs: list[dict[str, float]] = []
    py_runs: list[dict[str, float]] = []
    cold_runs: list[tuple[float, float]] = []
    set_up: tuple[float, str] | None = None
    with tempfile.TemporaryDirectory(prefix="pgtls-bench-") as tmp:
        if not args.no_setup:
            set_up = setup(Path(tmp))
        for i in range(args.repeat):
            scratch = Path(tmp) / str(i)
            scratch.mkdir()
            cold_runs.append(cold(params_file, scratch / "cold"))
            nb_runs.append(through_notebooks(params_file, scratch))
            py_runs.append(direct(params_file, scratch))
            shutil.rmtree(scratch, ignore_errors=True)

    def med(runs: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    rows = [*(s.name for s in STEPS), "set-up and record", "total"]
    print(
        f"lab runbook ({params_file.name}), {args.repeat} run(s) each, median seconds; "
        f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}"
    )
    print(f"  {'':<22}{'notebooks':>11}{'direct':>9}{'difference':>12}{'page KB':>10}")
    for row in rows:
        a, b = med(nb_runs, row), med(py_runs, row)
        kb = statistics.median(z[row] for z in SIZES) / 1024
        print(f"  {row:<22}{a:>11.2f}{b:>9.2f}{a - b:>12.2f}{kb:>10.1f}")
    largest = max(max(z[s.name] for s in STEPS) for z in SIZES) / 1024
    manifest_kb = statistics.median(z["manifest.json"] for z in SIZES) / 1024
    print(
        "page KB: each step's HTML page; on the set-up row index.html, on the total row the "
        f"whole record (manifest.json {manifest_kb:.1f} KB); "
        f"largest step page {largest:.1f} KB (goal: under 80 KB): "
        f"{'yes' if largest < 80 else 'NO'}"
    )
    total_nb, total_py = med(nb_runs, "total"), med(py_runs, "total")
    overhead = total_nb - total_py
    share = overhead / total_nb if total_nb else 0.0
    print(
        f"notebook execution (kernels, papermill, HTML, record): {overhead:.2f} s, "
        f"{share:.0%} of the notebook run"
    )
    cold_nb = statistics.median(c[0] for c in cold_runs)
    cold_py = statistics.median(c[1] for c in cold_runs)
    cold_share = (cold_nb - cold_py) / cold_nb if cold_nb else 0.0
    print(
        f"as fresh processes: pgtls run {cold_nb:.2f} s, direct {cold_py:.2f} s; notebook "
        f"execution {cold_nb - cold_py:.2f} s, {cold_share:.0%} of the notebook run"
    )
    if set_up is not None:
        seconds, how = set_up
        first = seconds + cold_nb
        print(
            f"set-up (make venv in a fresh clone, {how}, this machine's wheel cache): "
            f"{seconds:.1f} s, {seconds / cold_nb:.1f}x the runbook's {cold_nb:.1f} s; a cold "
            f"make demo about {first:.1f} s (goal: under 60 s): {'yes' if first < 60 else 'NO'}"
        )
    worst = max(total_nb, cold_nb)
    worst_share = max(share, cold_share)
    print(
        f"goals: whole lab runbook under 30 s: {'yes' if worst < 30 else 'NO'} "
        f"({worst:.1f} s); notebook share under half: {'yes' if worst_share < 0.5 else 'NO'} "
        f"({worst_share:.0%})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
