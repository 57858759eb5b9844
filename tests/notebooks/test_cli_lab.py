"""``pgtls lab up|status|down``: a cluster to explore, and parameters to run the runbook on it."""

from __future__ import annotations

import shutil
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
    if (base / "lab.json").exists():
        LabCluster.attach(base).remove()
    shutil.rmtree(base, ignore_errors=True)


def test_lab_up_status_down(lab_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["lab", "up", "--dir", str(lab_dir)]) == 0
    out = capsys.readouterr().out
    assert f"PGPASSFILE={lab_dir / 'pgpass'} psql" in out
    assert "pgtls run" in out and "pgtls lab down" in out
    cluster = LabCluster.attach(lab_dir)
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

    assert cli_main(["lab", "down", "--dir", str(lab_dir)]) == 0
    assert not (lab_dir / "data").exists()
    assert cli_main(["lab", "status", "--dir", str(lab_dir)]) == 2
    assert "pgtls lab up" in capsys.readouterr().err
