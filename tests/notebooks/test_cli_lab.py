"""``pgtls lab up|status|down``: a cluster to explore, and parameters to run the runbook on it."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import yaml
from support import skip_or_fail

from pgtls_helpers.cli import main as cli_main
from pgtls_helpers.errors import PgtlsError
from pgtls_helpers.lab import LabCluster, find_bindir
from pgtls_helpers.runbook.params import load_params


@pytest.fixture
def lab_dir() -> Iterator[Path]:
    """A directory the server's OS user can reach (pytest's tmp_path is private to root)."""
    try:
        find_bindir()
    except PgtlsError as exc:
        skip_or_fail(str(exc))
    base = Path(tempfile.mkdtemp(prefix="pgtls-test-lab-"))
    yield base
    if (base / "lab.json").exists():  # the cluster, and the client OS user the lab made
        cli_main(["lab", "down", "--dir", str(base)])
    shutil.rmtree(base, ignore_errors=True)


def test_lab_up_status_down(lab_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["lab", "up", "--dir", str(lab_dir)]) == 0
    out = capsys.readouterr().out
    assert f"PGPASSFILE={lab_dir / 'pgpass'} psql" in out
    cluster = LabCluster.attach(lab_dir)
    # the commands it prints run as printed, from any directory, without an activated venv
    lines = [ln.strip() for ln in out.splitlines()]
    psql = next(ln for ln in lines if " psql " in ln)
    done = subprocess.run(
        ["sh", "-c", psql + " -XAtc 'SELECT 1'"],
        capture_output=True,
        text=True,
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert done.stdout.strip() == "1", done.stderr
    run_line = next(ln for ln in lines if " run " in ln and ln.startswith("PGPASSFILE="))
    assert Path(run_line.split()[1]).is_file(), run_line  # the pgtls beside this interpreter
    down = next(ln for ln in lines if ln.startswith("stop and remove it:"))
    down_cmd = down.removeprefix("stop and remove it:").strip()
    assert cluster.password() not in out
    # the parameters it writes are valid and point at the cluster
    params = load_params(yaml.safe_load((lab_dir / "runbook.yaml").read_text()))
    assert params.server_port == cluster.port and params.lab_cluster is False
    with psycopg.connect(**cluster.conninfo()) as conn:  # type: ignore[arg-type]
        assert conn.execute("SHOW ssl").fetchone() == ("off",)

    assert cli_main(["lab", "status", "--dir", str(lab_dir)]) == 0
    assert str(cluster.port) in capsys.readouterr().out
    assert cli_main(["lab", "up", "--dir", str(lab_dir)]) == 2  # one cluster per directory
    assert "already there" in capsys.readouterr().err

    done = subprocess.run(
        ["sh", "-c", down_cmd], capture_output=True, text=True, cwd="/", check=False
    )
    assert done.returncode == 0, done.stderr
    assert not (lab_dir / "data").exists()
    assert cli_main(["lab", "status", "--dir", str(lab_dir)]) == 2
    assert "pgtls lab up" in capsys.readouterr().err


def test_notebooks_after_the_demo_get_a_change_of_their_own(
    lab_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse

    from pgtls_helpers.cli.lab import prepare_lab_notebooks

    root = Path(__file__).resolve().parents[2]
    work = tmp_path / "work"
    # what `make demo` leaves: a CSR (and journals) of the lab change, the key long installed
    demo = work / "lab-demo"
    demo.mkdir(parents=True)
    (demo / "server.csr").write_text("the demo's CSR, for a cluster that is gone\n")
    args = argparse.Namespace(
        params=str(root / "parameters" / "lab.yaml"), dir=str(lab_dir), work=str(work)
    )
    params, target, env = prepare_lab_notebooks(args)
    assert params.change_id == "lab-demo-notebook"
    assert params.work.path == work / "lab-demo-notebook" and not params.work.csr.exists()
    assert (demo / "server.csr").exists()  # the demo's change is left alone
    assert sorted(p.name for p in target.glob("*.ipynb"))[0] == "01_key_and_csr.ipynb"
    assert "lab-demo-notebook" in (target / "02_ca_response.ipynb").read_text()
    cluster = LabCluster.attach(lab_dir)
    assert params.server_port == cluster.port and env["PGPASSFILE"] == str(cluster.passfile)
    out = capsys.readouterr().out
    assert "to start over" in out and f"lab down --dir {lab_dir}" in out
    # a second session on the same cluster keeps the same change (and its CSR)
    params.work.create()
    params.work.csr.write_text("this session's CSR\n")
    again, _, _ = prepare_lab_notebooks(args)
    assert again.change_id == "lab-demo-notebook" and again.work.csr.exists()
