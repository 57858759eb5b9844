"""Helpers shared by test modules (importable as ``support``)."""

from __future__ import annotations

import os

import pytest


def skip_or_fail(reason: str) -> None:
    """Skip for a missing tool, except in CI (``PGTLS_REQUIRE_ALL=1``), which never skips."""
    if os.environ.get("PGTLS_REQUIRE_ALL") == "1":
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)
