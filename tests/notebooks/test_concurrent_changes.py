"""One change at a time, from its first write to its sealed record: two operators (or an
operator and a rollback) acting on one server, as real ``pgtls`` processes.

The first change is held half-way at a real fault point (its kernel stops itself with SIGSTOP
right after writing ``server.key``), the second is started against the same server, and the
test asserts the second waited for the whole of the first: nothing it wrote interleaves, its
backups are the first change's files, and rolling both back in reverse order gives the
server's original bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from record_checks import params_for, write_params

from pgtls_helpers.lab import LabCluster
from tests.faults.faultkit import ServerState

EXCLUDED = {"postmaster.pid", "postmaster.opts", "pgtls.lock"}


def _data_files(cluster: LabCluster) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(cluster.pgdata.iterdir())
        if p.is_file() and not p.is_symlink() and p.name not in EXCLUDED
    }


def _env(cluster: LabCluster, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PGTLS_FAULT", "PGTLS_LOCK"))}
    env.update(PGPASSFILE=str(cluster.passfile), **extra)
    return env


def _pgtls(tmp_path: Path, cluster: LabCluster, *args: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pgtls_helpers",
            *args,
            "--records",
            str(tmp_path / "records"),
            "--work",
            str(tmp_path / "work"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(cluster, **env),
        start_new_session=True,
    )


def _finish(proc: subprocess.Popen[str], timeout: float = 240) -> tuple[int, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out + err


def _paused(
    tmp_path: Path, cluster: LabCluster, params: Path, point: str
) -> tuple[subprocess.Popen[str], int]:
    """``pgtls run`` stopped at ``point``: the process and its stopped kernel's pid."""
    marker = tmp_path / f"paused-{params.stem}"
    proc = _pgtls(
        tmp_path,
        cluster,
        "run",
        str(params),
        "--no-progress",
        PGTLS_FAULT_AFTER=point,
        PGTLS_FAULT_SIGNAL="STOP",
        PGTLS_FAULT_PAUSE_FILE=str(marker),
    )
    deadline = time.monotonic() + 180
    while not marker.exists() or not marker.read_text().strip():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {point}: {_finish(proc)[1]}")
        assert time.monotonic() < deadline, f"the run never reached {point}"
        time.sleep(0.1)
    return proc, int(marker.read_text())


def _lock_holder(cluster: LabCluster) -> str | None:
    try:
        return str(json.loads((cluster.pgdata / "pgtls.lock").read_text()).get("change_id"))
    except (OSError, ValueError):
        return None


def _journal_ops(tmp_path: Path, change_id: str) -> list[dict[str, object]]:
    path = tmp_path / "work" / change_id / "journal.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _params(tmp_path: Path, cluster: LabCluster, change_id: str) -> Path:
    return write_params(tmp_path / f"{change_id}.yaml", **params_for(cluster, change_id=change_id))


@pytest.mark.spread
@pytest.mark.parametrize("ssl", ["off", "on"])
def test_a_second_change_waits_for_the_whole_first_one_and_both_roll_back(
    tmp_path: Path, fresh_cluster: LabCluster, monkeypatch: pytest.MonkeyPatch, ssl: str
) -> None:
    monkeypatch.setenv("PGPASSFILE", str(fresh_cluster.passfile))
    if ssl == "on":  # a server that already serves a certificate of an earlier change
        code, out = _finish(
            _pgtls(tmp_path, fresh_cluster, "run", str(_params(tmp_path, fresh_cluster, "CHG-0")))
        )
        assert code == 0, out
    before_files, before = _data_files(fresh_cluster), ServerState.of(fresh_cluster)
    assert before.ssl == ssl

    first = _params(tmp_path, fresh_cluster, "CHG-first")
    second = _params(tmp_path, fresh_cluster, "CHG-second")
    run_a, kernel_a = _paused(tmp_path, fresh_cluster, first, "install:key")
    try:
        assert _lock_holder(fresh_cluster) == "CHG-first"
        run_b = _pgtls(
            tmp_path, fresh_cluster, "run", str(second), "--no-progress", PGTLS_LOCK_WAIT="240"
        )
        # the second change gets as far as its CSR and then waits: nothing written on the server
        deadline = time.monotonic() + 60
        while not (tmp_path / "work" / "CHG-second" / "ca").exists():
            assert run_b.poll() is None, _finish(run_b)[1]
            assert time.monotonic() < deadline, "the second change never reached step 3"
            time.sleep(0.2)
        time.sleep(3)
        assert run_b.poll() is None, "the second change did not wait"
        assert not [e for e in _journal_ops(tmp_path, "CHG-second") if e["op"] != "begin"]
        assert _lock_holder(fresh_cluster) == "CHG-first"
    finally:
        os.kill(kernel_a, signal.SIGCONT)
    code_a, out_a = _finish(run_a)
    assert code_a == 0, out_a
    code_b, out_b = _finish(run_b)
    assert code_b == 0, out_b
    # the second change's backups are the first change's files, not the server's originals
    key_a = next(
        e for e in _journal_ops(tmp_path, "CHG-first") if e["op"] == "file" and e["kind"] == "key"
    )
    key_b = next(
        e for e in _journal_ops(tmp_path, "CHG-second") if e["op"] == "file" and e["kind"] == "key"
    )
    assert key_b["previous_sha256"] == key_a["planned_sha256"]
    # each record was sealed by its own run, and says so
    for change_id in ("CHG-first", "CHG-second"):
        (record,) = (p for p in (tmp_path / "records" / change_id).iterdir() if p.is_dir())
        assert json.loads((record / "manifest.json").read_text())["outcome"] == "ok"

    # the first change cannot be backed out under the second one
    code, out = _finish(_pgtls(tmp_path, fresh_cluster, "rollback", str(first)))
    assert code == 1 and "after change CHG-first" in out, out
    assert "roll back change CHG-second first" in out and out.count("\n") == 1, out
    for params in (second, first):
        code, out = _finish(_pgtls(tmp_path, fresh_cluster, "rollback", str(params)))
        assert code == 0, out
    assert _data_files(fresh_cluster) == before_files
    fresh_cluster.restart()
    assert ServerState.of(fresh_cluster) == before


def test_a_rollback_started_during_its_run_waits_and_leaves_the_live_record_alone(
    tmp_path: Path, fresh_cluster: LabCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGPASSFILE", str(fresh_cluster.passfile))
    before_files, before = _data_files(fresh_cluster), ServerState.of(fresh_cluster)
    params = _params(tmp_path, fresh_cluster, "CHG-live")
    run, kernel = _paused(tmp_path, fresh_cluster, params, "enable:hba")
    try:
        (record,) = (p for p in (tmp_path / "records" / "CHG-live").iterdir() if p.is_dir())
        code, out = _finish(
            _pgtls(tmp_path, fresh_cluster, "rollback", str(params), PGTLS_LOCK_WAIT="2")
        )
        assert code != 0, out
        assert "change CHG-live (pid" in out and "is changing this server now" in out, out
        assert "Traceback" not in out
        assert not (record / "manifest.json").exists(), "the live run's record was sealed"
        assert _data_files(fresh_cluster) != before_files, "the rollback undid the live run"
    finally:
        os.kill(kernel, signal.SIGCONT)
    code, out = _finish(run)
    assert code == 0, out
    manifest = json.loads((record / "manifest.json").read_text())
    assert manifest["outcome"] == "ok"
    code, out = _finish(_pgtls(tmp_path, fresh_cluster, "rollback", str(params)))
    assert code == 0, out
    assert _data_files(fresh_cluster) == before_files
    fresh_cluster.restart()
    assert ServerState.of(fresh_cluster) == before
