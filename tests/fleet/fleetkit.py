"""Shared by the fleet tests: Ansible from this venv, the wheelhouse, a lab fleet's hosts, a
host's files hashed."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from support import skip_or_fail

from pgtls_helpers.lab import LabCluster
from pgtls_helpers.lab.fleet import build_wheelhouse, clusters_of, down, up

ROOT = Path(__file__).resolve().parents[2]
HOST_PYTHON = "/usr/bin/python3"
# Built wheelhouses and the venv installed from them outlive one pytest run (keyed by the
# source's hash), so a second run does not pay ~1 min for them again.
CACHE = Path(tempfile.gettempdir()) / "pgtls-fleet-cache"


def ansible_playbook() -> Path:
    exe = Path(sys.executable).parent / "ansible-playbook"
    if not exe.exists():
        skip_or_fail("ansible-playbook is not installed (pip install -e '.[fleet]')")
    if not Path(HOST_PYTHON).exists():
        skip_or_fail(f"the fleet hosts' Python {HOST_PYTHON} is missing")
    return exe


def source_digest() -> str:
    """A hash of what goes into the pgtls wheel."""
    h = hashlib.sha256()
    files = [ROOT / "pyproject.toml", ROOT / "README.md"]
    files += sorted((ROOT / "pgtls_helpers").rglob("*.py"))
    files += sorted((ROOT / "notebooks").glob("*.ipynb"))
    for path in files:
        h.update(str(path.relative_to(ROOT)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def dependencies_digest() -> str:
    """A hash of what the wheelhouse's dependency wheels come from: the project's declared
    dependencies and the hosts' Python that resolves them."""
    h = hashlib.sha256((ROOT / "pyproject.toml").read_bytes())
    h.update(str(Path(HOST_PYTHON).resolve()).encode())
    return h.hexdigest()[:16]


@contextmanager
def cache_lock() -> Iterator[None]:
    """The cache to this process alone: the fleet modules run in worker processes of their
    own at the same time, and one builds or installs what the others then use."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def wheelhouse() -> Path:
    """The wheelhouse of this checkout, built once per source state; its dependency wheels are
    resolved once per ``pyproject.toml`` and kept, so a change to the source alone rebuilds
    only the pgtls wheel."""
    with cache_lock():
        return _wheelhouse()


def _wheelhouse() -> Path:
    digest = source_digest()
    target = CACHE / f"wheelhouse-{digest}.tar"
    if not target.exists():
        deps = CACHE / f"dependencies-{dependencies_digest()}"
        for old in CACHE.iterdir():  # wheelhouses and venvs of earlier source states
            if digest in old.name or old == deps:
                continue
            if old.is_dir():
                shutil.rmtree(old)
            else:
                old.unlink()
        build_wheelhouse(ROOT, target, python=HOST_PYTHON, dependencies=deps)
    return target


@dataclass
class Played:
    returncode: int
    output: str

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.output.splitlines()[-lines:])


def play(
    playbook: str,
    inventory: Path,
    control: Path,
    wheels: Path,
    *extra: str,
    timeout: float = 600,
) -> Played:
    """``ansible-playbook fleet/<playbook>`` with the control machine's folders in ``control``."""
    env = dict(os.environ)
    env["ANSIBLE_CONFIG"] = str(ROOT / "fleet" / "ansible.cfg")
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env["ANSIBLE_NOCOLOR"] = "1"
    proc = subprocess.run(
        [
            str(ansible_playbook()),
            "-i",
            str(inventory),
            str(ROOT / "fleet" / playbook),
            "-e",
            f"pgtls_control_dir={control}",
            "-e",
            f"pgtls_wheelhouse={wheels}",
            *extra,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    return Played(proc.returncode, proc.stdout + proc.stderr)


_SKIP = {"postmaster.pid", "postmaster.opts"}


def host_files(pgdata: Path, home: Path | None = None) -> dict[str, str]:
    """Every file a change could touch on a host, hashed: the data directory's own files
    (configuration, key, certificates) and, when given, the host's pgtls home."""
    out = {}
    for path in sorted(pgdata.iterdir()):
        if path.is_file() and path.name not in _SKIP:
            out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    if home is not None and home.exists():
        for path in sorted(home.rglob("*")):
            if path.is_file():
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def clear(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


@contextmanager
def lab_dir(prefix: str) -> Iterator[Path]:
    """A folder for one module's lab fleet, removed with its clusters afterwards.

    It is made outside pytest's own folders, which are 0700: the clusters run as postgres,
    which must pass through.
    """
    base = Path(tempfile.mkdtemp(prefix=prefix))
    base.chmod(0o711)
    try:
        yield base
    finally:
        down(base / "fleet")
        shutil.rmtree(base, ignore_errors=True)


class LabHosts:
    """A lab fleet (``db1``…) in ``base/fleet`` as the control machine sees it: the inventory,
    the clusters, each host's pgtls home, and ``base/control`` where the records come home.

    ``venv`` names the hosts' venv in :data:`CACHE` (one per source state, installed on first
    use and kept): hosts whose ca_mode needs the ``ca`` extra keep a venv of their own.
    """

    def __init__(self, base: Path, *, hosts: int, change_id: str, venv: str = "venv") -> None:
        self.base = base
        self.wheels = wheelhouse()
        self.venv = CACHE / f"{venv}-{source_digest()}"
        self.inventory = up(base / "fleet", hosts=hosts, change_id=change_id, venv=self.venv)
        self.clusters: dict[str, LabCluster] = clusters_of(base / "fleet")
        self.control = base / "control"
        self.control.mkdir()

    def pgdata(self, host: str) -> Path:
        return self.clusters[host].pgdata

    def home(self, host: str) -> Path:
        return self.base / "fleet" / "hosts" / host

    def files(self, host: str, *, with_home: bool = False) -> dict[str, str]:
        return host_files(self.pgdata(host), self.home(host) if with_home else None)

    def play(self, playbook: str, *extra: str, inventory: Path | None = None) -> Played:
        """``ansible-playbook``; while the hosts' venv is not installed yet, with the cache to
        itself, so that two modules do not install the same venv at once."""
        run = inventory or self.inventory
        if (self.venv / ".pgtls-wheelhouse").exists():
            return play(playbook, run, self.control, self.wheels, *extra)
        with cache_lock():
            return play(playbook, run, self.control, self.wheels, *extra)
