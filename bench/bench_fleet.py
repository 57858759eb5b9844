"""What Ansible costs on top of the runbook: a lab fleet of four in waves against four
``pgtls run`` one after another.

On a lab fleet (four throwaway clusters as ``db1``..``db4``, ``ansible_connection: local``):

(a) ``fleet/pgtls.yml`` phase 2 (install, enable, verify) with ``serial: [1, "25%", "100%"]``:
    three waves (1, 1, 2 hosts), records brought home;
(b) the same change on the same four servers (rolled back in between) as four ``pgtls run``
    processes one after another, with the parameters files the playbook wrote and the venv it
    installed: the runbook itself, with nothing around it.

Phase 1, the venv installation and the rollback are not timed. It prints both wall times and
Ansible's overhead per host, ((a) − (b)) / 4 (goal: under 3 s), and the same with (b) replaced
by the sum over waves of the slowest ``pgtls run`` in the wave, as the playbook measured it
(what the waves cost beyond waiting for the runbook). Run::

    .venv/bin/python bench/bench_fleet.py [--wheelhouse dist/pgtls-wheelhouse.tar]

It prints figures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pgtls_helpers.lab_fleet import build_wheelhouse, clusters_of, down, sign, up

REPO = Path(__file__).resolve().parents[1]
CHANGE = "bench-fleet"


def _play(playbook: str, inventory: Path, control: Path, wheels: Path) -> float:
    env = dict(os.environ)
    env["ANSIBLE_CONFIG"] = str(REPO / "fleet" / "ansible.cfg")
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "ansible-playbook"),
            "-i",
            str(inventory),
            str(REPO / "fleet" / playbook),
            "-e",
            f"pgtls_control_dir={control}",
            "-e",
            f"pgtls_wheelhouse={wheels}",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{playbook} failed:\n{proc.stdout[-3000:]}{proc.stderr[-2000:]}")
    return took


def _latest_run(control: Path) -> dict[str, list[float]]:
    """Per wave, the seconds of each host's ``pgtls run`` in the latest fleet run."""
    records = control / "records" / CHANGE
    run = sorted(p.stem for p in (records / "fleet-runs").glob("*.json"))[-1]
    waves: dict[str, list[float]] = {}
    for note_path in records.glob("*/*.fleet.json"):
        note = json.loads(note_path.read_text())
        if note.get("run") != run or not note.get("record"):
            continue
        manifest = json.loads((note_path.parent / note["record"] / "manifest.json").read_text())
        waves.setdefault(str(note["wave"]), []).append(float(manifest["seconds"]))
    return waves


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheelhouse", default=str(REPO / "dist" / "pgtls-wheelhouse.tar"))
    parser.add_argument("--host-python", default="/usr/bin/python3")
    args = parser.parse_args()
    wheels = Path(args.wheelhouse).resolve()
    if not wheels.exists():
        print(f"building the wheelhouse {wheels} …", flush=True)
        build_wheelhouse(REPO, wheels, python=args.host_python)

    base = Path(tempfile.mkdtemp(prefix="pgtls-bench-fleet-"))
    base.chmod(0o711)  # the clusters run as postgres
    try:
        inventory = up(base / "fleet", hosts=4, change_id=CHANGE)
        clusters = clusters_of(base / "fleet")
        control = base / "control"
        print("phase 1 and the venv (not timed) …", flush=True)
        _play("pgtls.yml", inventory, control, wheels)
        sign(control, CHANGE)

        fleet_wall = _play("pgtls.yml", inventory, control, wheels)
        waves = _latest_run(control)
        runbook_in_waves = sum(max(times) for times in waves.values())
        _play("rollback.yml", inventory, control, wheels)

        pgtls = base / "fleet" / "venv" / "bin" / "pgtls"
        t0 = time.perf_counter()
        for host, cluster in clusters.items():
            home = base / "fleet" / "hosts" / host
            proc = subprocess.run(
                [
                    str(pgtls),
                    "run",
                    str(home / "params" / f"{CHANGE}.yaml"),
                    "--records",
                    str(base / "sequential" / host),
                    "--work",
                    str(home / "work"),
                    "--no-progress",
                ],
                env={**os.environ, "PGPASSFILE": str(cluster.passfile)},
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                raise SystemExit(f"pgtls run on {host} failed:\n{proc.stdout}{proc.stderr}")
        sequential = time.perf_counter() - t0
    finally:
        down(base / "fleet")
        shutil.rmtree(base, ignore_errors=True)

    n = 4
    print(
        f"\n(a) fleet/pgtls.yml, 4 hosts in waves {[len(w) for w in waves.values()]}: "
        f"{fleet_wall:6.1f} s wall"
    )
    print(f"(b) 4 x pgtls run, one after another:          {sequential:6.1f} s wall")
    print(f"    ratio (a)/(b): {fleet_wall / sequential:.2f}")
    print(
        f"Ansible's overhead per host, ((a) - (b)) / 4:  {(fleet_wall - sequential) / n:6.2f} s"
        "   (goal: under 3 s)"
    )
    print(
        f"beyond the slowest runbook of each wave, / 4:   "
        f"{(fleet_wall - runbook_in_waves) / n:6.2f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
