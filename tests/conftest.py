"""Shared fixtures: throwaway CAs and real PostgreSQL clusters; ``import certfactory`` works
from every test directory."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from pgtls_helpers.errors import PgtlsError  # noqa: E402
from pgtls_helpers.lab import LabCA, LabCluster, find_bindir  # noqa: E402


def skip_or_fail(reason: str) -> None:
    """Skip for a missing tool, except in CI (``PGTLS_REQUIRE_ALL=1``), which never skips."""
    if os.environ.get("PGTLS_REQUIRE_ALL") == "1":
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)


def _bindir_or_skip() -> None:
    try:
        find_bindir()
    except PgtlsError as exc:
        skip_or_fail(str(exc))


@pytest.fixture(scope="session")
def lab_ca() -> LabCA:
    """Root → IntermediateCA_BAR → IntermediateCA_FOO, as in the article."""
    return LabCA.create()


@pytest.fixture(scope="session")
def lab_cluster() -> Iterator[LabCluster]:
    """One running cluster (SSL off, stock pg_hba.conf) for tests that only read or
    that restore what they change."""
    _bindir_or_skip()
    cluster = LabCluster.create()
    cluster.start()
    yield cluster
    cluster.remove()


@pytest.fixture
def make_cluster() -> Iterator[Callable[[], LabCluster]]:
    """A factory of fresh running clusters, each removed after the test."""
    _bindir_or_skip()
    made: list[LabCluster] = []

    def make() -> LabCluster:
        cluster = LabCluster.create()
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
