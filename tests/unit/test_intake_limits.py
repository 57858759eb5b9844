"""CA files that are not regular files, or too large, are refused with one sentence."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pgtls_helpers.errors import InputError
from pgtls_helpers.pki.intake import read_ca_response


def test_dev_zero_is_refused_at_once() -> None:
    with pytest.raises(InputError, match="/dev/zero is not a regular file"):
        read_ca_response(["/dev/zero"])


def test_a_fifo_is_refused_without_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "ca.pem"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="not a regular file"):
        read_ca_response([str(fifo)])


def test_a_file_over_10_mb_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.pem"
    with open(big, "wb") as fh:
        fh.truncate(10 * 1024 * 1024 + 1)
    with pytest.raises(InputError, match="over the 10 MB"):
        read_ca_response([str(big)])
