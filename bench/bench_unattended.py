"""What an unattended renewal costs against one signed by the lab CA.

On one throwaway cluster, a first change brings it to TLS; then a renewal change (a new key,
the same names, the reload watched by a verify-full client loop, the record) runs twice per
round: once with ``ca_mode: lab`` (the throwaway CA signs in-process), once with
``ca_mode: vault`` against a real OpenBao dev server started here (the CSR goes over HTTP to
``pki/sign/<role>``), and, when Debian's ``pebble`` is installed, once with ``ca_mode: acme``
(an order, Pebble's own http-01 validation against this host, finalization). It prints the wall
time of each, and their ratio to the lab's. Run::

    .venv/bin/python bench/bench_unattended.py [--repeat 3]

It prints figures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import yaml

from pgtls_helpers.lab import LabCluster, cas
from pgtls_helpers.runbook.runner import run


def _values(cluster: LabCluster, change_id: str, mode: str, settings: dict[str, object]) -> dict:
    return cluster.runbook_values(
        change_id,
        ca_mode=mode,
        ca_settings=settings,
        subject_alt_names=[cluster.host],
        # the lab, OpenBao and Pebble are different roots: a renewal across them is a rotation
        new_root="accept",
        allow_shorter_validity=True,  # OpenBao's role and Pebble issue for less than the lab
    )


def _change(base: Path, values: dict) -> float:
    params = base / f"{values['change_id']}.yaml"
    params.write_text(yaml.safe_dump(values, sort_keys=False))
    t0 = time.monotonic()
    outcome = run(params, records_dir=base / "records", work_dir=base / "work", progress=False)
    took = time.monotonic() - t0
    if outcome.exit_code != 0:
        raise SystemExit(f"{values['change_id']} failed:\n{outcome.summary()}")
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    times: dict[str, list[float]] = {"lab": [], "vault": [], "acme": []}
    with ExitStack() as stack:
        base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pgtls-bench-")))
        bao = stack.enter_context(cas.openbao(base))
        pebble = None
        if shutil.which("pebble") and shutil.which("pebble-challtestsrv"):
            (base / "pebble").mkdir()
            pebble = stack.enter_context(cas.pebble(base / "pebble"))
        cluster = LabCluster.create()
        stack.callback(cluster.remove)
        cluster.start()
        os.environ["PGPASSFILE"] = str(cluster.passfile)
        _change(base, _values(cluster, "first", "lab", {}))
        for i in range(args.repeat):
            times["lab"].append(_change(base, _values(cluster, f"lab{i}", "lab", {})))
            times["vault"].append(_change(base, _values(cluster, f"bao{i}", "vault", bao.settings)))
            if pebble is not None:
                times["acme"].append(
                    _change(base, _values(cluster, f"acme{i}", "acme", pebble.settings))
                )
    lab = statistics.median(times["lab"])
    print(f"renewal change, median of {args.repeat} (each with its record and client loop):")
    print(f"  lab CA (in-process)     {lab:6.2f} s")
    for mode, label in (("vault", "OpenBao (vault)"), ("acme", "Pebble (acme)")):
        if times[mode]:
            t = statistics.median(times[mode])
            print(f"  {label:<23} {t:6.2f} s   {t / lab:4.2f}x the lab's")
        else:
            print(f"  {label:<23}   (pebble is not installed)")


if __name__ == "__main__":
    main()
