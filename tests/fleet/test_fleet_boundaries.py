"""What a fleet host can make the control machine do, and a fresh host's first call.

A host's output is the host's to write: ``bring_home.yml`` takes the record stamp from it, so a
hostile or broken host that prints a path instead of a stamp must not get a file written
outside ``records/`` on the control machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from fleetkit import ROOT, ansible_playbook

HOST_SH = ROOT / "fleet" / "roles" / "pgtls" / "files" / "host.sh"


def test_a_fresh_hosts_first_call_reads_its_stdin_before_asking_for_an_install(
    tmp_path: Path,
) -> None:
    proc = subprocess.Popen(
        [
            "sh",
            str(HOST_SH),
            "run",
            str(tmp_path / "home"),
            "CHG-1",
            str(tmp_path / "no-venv"),
            "abc",
            "csr",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None
    # more than a pipe holds: a host that leaves before reading breaks this write
    proc.stdin.write(b"\n" + b"change_id: CHG-1\n" * 60000)
    proc.stdin.close()
    assert proc.stdout is not None and proc.stderr is not None
    out = proc.stdout.read()
    proc.stderr.close()
    proc.stdout.close()
    assert proc.wait(timeout=30) == 75, out
    assert b"needs installing" in out


def test_a_host_printing_a_path_for_its_stamp_gets_nothing_written_outside_records(
    tmp_path: Path,
) -> None:
    control = tmp_path / "control"
    home = tmp_path / "host"
    (home / "outbox").mkdir(parents=True)
    # the hostile stamp: from outbox/ it reaches a file the host planted two levels above the
    # test's folder; from records/CHG-1/h1/ the copy would land in the test's folder itself
    name = f"planted-{os.getpid()}"
    evil = f"../../../../{name}"
    planted = tmp_path.parent.parent / f"{name}.tar"
    planted.write_bytes(b"not a record\n")
    landed = tmp_path / f"{name}.tar"
    playbook = tmp_path / "bring.yml"
    playbook.write_text(
        yaml.safe_dump(
            [
                {
                    "hosts": "all",
                    "gather_facts": False,
                    "vars": {
                        "change_id": "CHG-1",
                        "pgtls_run": "r1",
                        "pgtls_playbook": "pgtls.yml",
                        "pgtls_wave": 1,
                        "pgtls_phase_now": "install",
                        "pgtls_home": str(home),
                        "pgtls_records_dir": str(control / "records"),
                        "pgtls_csr_dir": str(control / "csr"),
                        "pgtls_final": {
                            "rc": 0,
                            "stdout": f"done\npgtls-fleet-record: {evil}",
                            "stderr": "",
                        },
                    },
                    "tasks": [
                        {
                            "ansible.builtin.include_role": {
                                "name": "pgtls",
                                "tasks_from": "bring_home",
                            }
                        }
                    ],
                }
            ]
        )
    )
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(
        yaml.safe_dump(
            {
                "all": {
                    "hosts": {
                        "h1": {
                            "ansible_connection": "local",
                            "ansible_python_interpreter": sys.executable,
                        }
                    }
                }
            }
        )
    )
    env = dict(os.environ)
    env["ANSIBLE_CONFIG"] = str(ROOT / "fleet" / "ansible.cfg")
    env["ANSIBLE_ROLES_PATH"] = str(ROOT / "fleet" / "roles")
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    try:
        proc = subprocess.run(
            [str(ansible_playbook()), "-i", str(inventory), str(playbook)],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
            check=False,
        )
    finally:
        planted.unlink()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # nothing fetched anywhere; the host's note says it sent no record
    assert not landed.exists(), "the host's output chose where the control machine wrote"
    host_dir = control / "records" / "CHG-1" / "h1"
    (note,) = host_dir.glob("*.fleet.json")
    assert note.name == "r1-no-record.fleet.json"
    assert json.loads(note.read_text())["record"] is None
    assert [p.name for p in host_dir.iterdir()] == [note.name]
