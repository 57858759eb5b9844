"""Kill the change at chosen instants (SIGKILL of the runner and its kernel, or Ctrl-C), then
``pgtls rollback`` (or a rerun, then the rollback): the server restarts, and pg_hba.conf,
postgresql.auto.conf and the certificate it presents are exactly as before.

The default run takes a representative subset on each PostgreSQL major; ``make faults``
(``PGTLS_FAULTS=all``) sweeps every fault point on a server with SSL off and on one with SSL on
(a renewal), each followed by a rollback and by a rerun-then-rollback.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from faultkit import ALL_POINTS, ServerState, assert_as_before, env_for, params_file, rollback
from faultkit import run_steps as run_steps_child

from pgtls_helpers import notebook as runbook
from pgtls_helpers.errors import PreflightError
from pgtls_helpers.lab import LabCA, LabCluster
from pgtls_helpers.runbook.params import Params
from tests.support import skip_or_fail

ParamsFactory = Callable[..., Params]
FULL = os.environ.get("PGTLS_FAULTS") == "all"

# (server, fault point, then): the default subset covers each kind of instant once
SUBSET = [
    ("ssl-off", "install:certificate", "rollback"),
    ("ssl-off", "enable:hba-checked", "rollback"),
    ("ssl-off", "enable:reload-ssl", "rerun-rollback"),
    ("ssl-off", "enable:hba", "rerun-rollback"),
    ("ssl-on", "install:key", "rerun-rollback"),
]
SWEEP = [
    (server, point, then)
    for server in ("ssl-off", "ssl-on")
    for point in ALL_POINTS
    if "auto.conf" not in point or server == "ssl-off"
    for then in ("rollback", "rerun-rollback")
]


def _prepare(
    cluster: LabCluster, runbook_params: ParamsFactory, tmp_path: Path, server: str
) -> tuple[Path, ServerState]:
    if server == "ssl-on":
        old_ca = LabCA.create(root_name="Old Root")
        old_key, old_cert = old_ca.issue(["old.lab.pgtls.test"])
        cluster.serve_certificate(old_key, [old_cert, *old_ca.intermediates])
    before = ServerState.of(cluster)
    # a new lab CA: a CA rotation, accepted, and the old name dropped on purpose (the clients
    # are not what these tests are about)
    rotation = {"new_root": "accept", "allow_dropped_names": True}
    params = runbook_params(cluster, **(rotation if server == "ssl-on" else {}))
    runbook.step1_key_and_csr(params)
    runbook.step2_ca_response(params)
    return params_file(params, tmp_path), before


def _fault_then_restore(
    cluster: LabCluster,
    runbook_params: ParamsFactory,
    tmp_path: Path,
    server: str,
    point: str,
    then: str,
    sig: str = "KILL",
) -> None:
    path, before = _prepare(cluster, runbook_params, tmp_path, server)
    killed = run_steps_child(path, cluster, fault=point, signal=sig)
    if sig == "KILL":
        # a renewal changes no setting, so it never reaches the auto.conf points
        unreachable = server == "ssl-on" and "auto.conf" in point
        assert killed.returncode == (0 if unreachable else -signal.SIGKILL), killed.stderr
    else:
        assert killed.returncode != 0 and "KeyboardInterrupt" in killed.stderr, killed.stderr
    if then == "rerun-rollback":
        rerun = run_steps_child(path, cluster)
        assert rerun.returncode == 0, rerun.stderr
        # the rerun finished the change: what is on disk is what runs (non-SSL is refused)
        with pytest.raises(psycopg.OperationalError, match="no encryption"):
            psycopg.connect(**cluster.conninfo(sslmode="disable"))  # type: ignore[arg-type]
    back = rollback(path, cluster)
    assert back.returncode == 0, back.stdout + back.stderr
    assert_as_before(cluster, before)


@pytest.mark.parametrize(("server", "point", "then"), SWEEP if FULL else SUBSET)
def test_killed_change_rolls_back_to_a_server_that_restarts_as_before(
    make_cluster: Callable[[], LabCluster],
    runbook_params: ParamsFactory,
    tmp_path: Path,
    server: str,
    point: str,
    then: str,
) -> None:
    _fault_then_restore(make_cluster(), runbook_params, tmp_path, server, point, then)


@pytest.mark.parametrize(
    ("server", "point"),
    [("ssl-off", "enable:hba")]
    if not FULL
    else [
        (s, p)
        for s in ("ssl-off", "ssl-on")
        for p in ALL_POINTS
        if "auto.conf" not in p or s == "ssl-off"
    ],
)
def test_ctrl_c_then_rollback_restores(
    make_cluster: Callable[[], LabCluster],
    runbook_params: ParamsFactory,
    tmp_path: Path,
    server: str,
    point: str,
) -> None:
    _fault_then_restore(
        make_cluster(), runbook_params, tmp_path, server, point, "rollback", sig="INT"
    )


def test_runner_and_kernel_killed_in_step4_then_rollback(
    fresh_cluster: LabCluster, runbook_params: ParamsFactory, tmp_path: Path
) -> None:
    """The real runner (papermill and its kernel), both killed right after pg_hba.conf."""
    before = ServerState.of(fresh_cluster)
    params = runbook_params(fresh_cluster)
    path = params_file(params, tmp_path)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pgtls_helpers",
            "run",
            str(path),
            "--records",
            str(tmp_path / "records"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        check=False,
        env=env_for(fresh_cluster, PGTLS_FAULT_AFTER="enable:hba", PGTLS_FAULT_KILL_PARENT="1"),
        start_new_session=True,
        timeout=600,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    # the killed run left a record without a manifest
    (left,) = [p for p in (tmp_path / "records" / params.change_id).iterdir() if p.is_dir()]
    assert not (left / "manifest.json").exists()
    # the kernel died too: it would otherwise still hold the change lock (5 s wait)
    back = rollback(path, fresh_cluster, "--records", str(tmp_path / "records"))
    assert back.returncode == 0, back.stdout + back.stderr
    assert "restored" in back.stdout
    assert_as_before(fresh_cluster, before)
    # the rollback sealed that record as interrupted, saying what was in place
    assert "sealed the record of an interrupted run" in back.stderr
    sealed = json.loads((left / "manifest.json").read_text())
    assert sealed["outcome"] == "interrupted"
    assert sealed["format"] == 3
    assert "enable interrupted" in sealed["in_place"][0]
    assert "pg_hba.conf" in sealed["in_place"][0]
    assert "01_key_and_csr" in [s["step"] for s in sealed["steps"]]


def test_sigterm_to_the_runner_finishes_the_record_with_each_steps_true_status(
    fresh_cluster: LabCluster, runbook_params: ParamsFactory, tmp_path: Path
) -> None:
    before = ServerState.of(fresh_cluster)
    params = runbook_params(fresh_cluster)
    path = params_file(params, tmp_path)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pgtls_helpers",
            "run",
            str(path),
            "--records",
            str(tmp_path / "records"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        check=False,
        env=env_for(
            fresh_cluster, PGTLS_FAULT_AFTER="enable:auto.conf", PGTLS_FAULT_SIGNAL="TERM-PARENT"
        ),
        start_new_session=True,
        timeout=600,
    )
    assert proc.returncode == 130, proc.stdout + proc.stderr
    (record,) = [p for p in (tmp_path / "records" / params.change_id).iterdir() if p.is_dir()]
    manifest = json.loads((record / "manifest.json").read_text())
    status = {s["step"]: s["status"] for s in manifest["steps"]}
    assert status == {
        "01_key_and_csr": "ok",
        "02_ca_response": "ok",
        "03_install_files": "ok",
        "04_enable_ssl": "interrupted",
        "05_verify_clients": "not-run",
    }
    assert "enable interrupted" in manifest["error"]
    assert "postgresql.auto.conf" in manifest["error"]
    back = rollback(path, fresh_cluster)
    assert back.returncode == 0, back.stdout + back.stderr
    assert_as_before(fresh_cluster, before)


@pytest.mark.parametrize(
    ("had_dir", "point"),
    [(True, "trust:root.crt:intent"), (True, "trust:root.crt"), (False, "trust:root.crt")],
)
def test_a_killed_client_trust_change_rolls_back_to_the_users_files(
    fresh_cluster: LabCluster,
    runbook_params: ParamsFactory,
    own_client_user: str,
    tmp_path: Path,
    had_dir: bool,
    point: str,
) -> None:
    """``pgtls trust`` killed right before or after it wrote a user's root.crt: the rollback
    gives the user's file back byte for byte (and removes a ~/.postgresql the change made)."""
    from cryptography.hazmat.primitives.serialization import Encoding

    from pgtls_helpers.postgres.clients import resolve_client_users

    old_ca = LabCA.create(root_name="Served Root")
    key, cert = old_ca.issue(["db1.lab.pgtls.test", "127.0.0.1"])
    fresh_cluster.serve_certificate(key, [cert, *old_ca.intermediates])
    (user,) = resolve_client_users([own_client_user])
    directory = user.root_crt.parent
    old_pem = old_ca.root.public_bytes(Encoding.PEM)
    if had_dir:
        directory.mkdir(mode=0o700)
        os.chown(directory, user.uid, user.gid)
        user.root_crt.write_bytes(old_pem)
        os.chown(user.root_crt, user.uid, user.gid)
        user.root_crt.chmod(0o600)
        before = (user.root_crt.read_bytes(), user.root_crt.stat().st_mode)
    roots = tmp_path / "roots.crt"
    roots.write_bytes(old_pem + LabCA.create(root_name="New Root").root.public_bytes(Encoding.PEM))
    params = runbook_params(
        fresh_cluster,
        change_id="CHG-trust-kill",
        client_system_users=[own_client_user],
        add_roots=[str(roots)],
    )
    path = params_file(params, tmp_path)
    killed = run_steps_child(path, fresh_cluster, fault=point, trust=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    if point == "trust:root.crt":  # killed after the write: the user's file is the new one
        assert len(user.root_crt.read_bytes()) > len(old_pem)
    back = rollback(path, fresh_cluster)
    assert back.returncode == 0, back.stdout + back.stderr
    if had_dir:
        assert (user.root_crt.read_bytes(), user.root_crt.stat().st_mode) == before
        assert sorted(p.name for p in directory.iterdir()) == ["root.crt"]
    else:
        assert not os.path.lexists(directory), "the change's ~/.postgresql was left behind"
    # a second rollback finds nothing left to undo and says so, changing nothing
    again = rollback(path, fresh_cluster)
    assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr
    assert "nothing to roll back; it was already rolled back" in again.stdout, again.stdout


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB file system of its own, for the work directory (a real ENOSPC)."""
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m,mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if made.returncode != 0:
        skip_or_fail(f"cannot mount a small file system here: {made.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(directory: Path, leave: int = 0) -> None:
    """Take the free space of ``directory``'s file system, all but ``leave`` bytes."""
    st = os.statvfs(directory)
    with open(directory / "filler", "wb") as fh:
        with contextlib.suppress(OSError):
            fh.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))


def test_a_full_work_disk_stops_the_change_before_its_first_write(
    fresh_cluster: LabCluster, runbook_params: ParamsFactory, tmp_path: Path, small_disk: Path
) -> None:
    before = ServerState.of(fresh_cluster)
    data_before = sorted(p.name for p in fresh_cluster.pgdata.iterdir())
    params = runbook_params(fresh_cluster, work_dir=str(small_disk / "work"))
    runbook.step1_key_and_csr(params)
    runbook.step2_ca_response(params)
    _fill(small_disk, leave=256 << 10)
    with pytest.raises(PreflightError) as err:
        runbook.step3_install_files(params)
    message = str(err.value)
    assert str(small_disk / "work") in message and "KiB free" in message
    assert "nothing was written" in message
    assert not params.work.journal.exists()
    assert sorted(p.name for p in fresh_cluster.pgdata.iterdir()) == data_before
    assert_as_before(fresh_cluster, before)


def test_a_work_disk_that_fills_during_step4_is_undone_whole_and_named(
    fresh_cluster: LabCluster, runbook_params: ParamsFactory, tmp_path: Path, small_disk: Path
) -> None:
    """The disk fills after the SSL reload (another process took the space), so the backup of
    pg_hba.conf cannot be written: the step's error names the file and the step, and the undo,
    which needs no space there, puts the server back as it was."""
    before = ServerState.of(fresh_cluster)
    params = runbook_params(fresh_cluster, work_dir=str(small_disk / "work"))
    runbook.step1_key_and_csr(params)
    runbook.step2_ca_response(params)
    path = params_file(params, tmp_path)
    marker = tmp_path / "paused"
    child = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "run_steps.py"), str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env_for(
            fresh_cluster,
            PGTLS_FAULT_AFTER="enable:reload-ssl",
            PGTLS_FAULT_SIGNAL="STOP",
            PGTLS_FAULT_PAUSE_FILE=str(marker),
        ),
        start_new_session=True,
    )
    try:
        for _ in range(1200):
            if marker.exists() and marker.read_text().strip() or child.poll() is not None:
                break
            time.sleep(0.1)
        assert marker.exists(), child.communicate()[1]
        _fill(small_disk)
    finally:
        if marker.exists():
            os.kill(int(marker.read_text()), signal.SIGCONT)
    _out, err = child.communicate(timeout=180)
    assert child.returncode == 1, err
    last = err.strip().splitlines()[-1]
    assert "the backup of" in last and "pg_hba.conf could not be written in the enable" in last
    assert "No space left on device" in last and "Traceback" not in last, last
    (small_disk / "filler").unlink()
    assert_as_before(fresh_cluster, before)
