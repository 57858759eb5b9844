"""A DBA's first run: ``make demo`` in a fresh clone, with no ``.venv`` yet.

The clone's venv is new (made by uv where uv can be had, else pip); the packages come from this
machine's wheel cache where it has them (uv's or pip's, as a second clone on the same machine
would find it). The test prints how long the whole first ``make demo`` took.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import skip_or_fail

from pgtls_helpers.errors import PgtlsError
from pgtls_helpers.lab import find_bindir

ROOT = Path(__file__).resolve().parents[2]

# what our own tooling must never print on a first run (uv's, pip's, setuptools', ours)
NOISE = re.compile(r"WARNING|deprecat|transitional", re.IGNORECASE)
# this machine's pip configuration (an extra index on a local path it does not have) is not
# ours: pip says so for every package it looks up, whoever calls it
MACHINE_PIP_CONFIG = re.compile(r"^WARNING: Location '\S+' is ignored: it is neither a file")


# run by the clone's interpreter: where the runbook's kernel imports pgtls_helpers from
KERNEL_SAYS_WHERE = """
from jupyter_client.manager import start_new_kernel
from pgtls_helpers.runbook.kernel import KERNEL_ARGS, kernel_name
km, kc = start_new_kernel(kernel_name=kernel_name(), extra_arguments=KERNEL_ARGS)
out = []
try:
    kc.execute_interactive(
        "import pgtls_helpers; print(pgtls_helpers.__file__)",
        timeout=60,
        output_hook=lambda m: out.append(m["content"].get("text", "")),
    )
finally:
    kc.stop_channels()
    km.shutdown_kernel(now=True)
print("".join(out).strip())
"""


@pytest.fixture
def clone() -> Iterator[Path]:
    """A fresh clone of this checkout where the lab cluster's OS user can read the venv (the
    PostgreSQL 17 binaries may come from it); pytest's tmp_path is private to root."""
    if shutil.which("git") is None or shutil.which("make") is None:
        skip_or_fail("git and make are needed to clone the checkout and run make demo")
    try:
        find_bindir()
    except PgtlsError as exc:
        skip_or_fail(str(exc))
    base = Path(tempfile.mkdtemp(prefix="pgtls-first-run-"))
    base.chmod(0o755)
    subprocess.run(["git", "clone", "-q", str(ROOT), str(base / "pgtls")], check=True)
    yield base / "pgtls"
    shutil.rmtree(base, ignore_errors=True)


def test_a_cold_make_demo_is_quiet_and_says_once_that_the_lab_is_gone(clone: Path) -> None:
    assert not (clone / ".venv").exists()
    # the clone's own make, not the one (and the venv) this test runs under
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "VIRTUAL_ENV", "PYTHONPATH"}
    }
    t = time.monotonic()
    done = subprocess.run(
        ["make", "--no-print-directory", "demo"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        check=False,
        timeout=600,
    )
    seconds = time.monotonic() - t
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    how = "uv" if "setting up .venv with uv" in out else "pip"
    print(f"cold make demo in a fresh clone: {seconds:.1f} s (venv by {how}, local wheel cache)")

    noise = [ln for ln in out.splitlines() if NOISE.search(ln) and not MACHINE_PIP_CONFIG.match(ln)]
    assert noise == [], out
    # the lab cluster is gone when the summary prints: said once, nothing that points into it
    assert out.count("removed after the run") == 1, out
    assert not re.search(r"^wrote ", out, re.M), out
    assert "to roll back" not in out and "lab down" not in out, out
    assert re.search(r"^verdict: pass ", out, re.M), out

    # an editable install of the clone: its pgtls and its kernels import the clone's package
    python = clone / ".venv" / "bin" / "python"
    where = subprocess.run(
        [str(python), "-c", "import pgtls_helpers; print(pgtls_helpers.__file__)"],
        cwd="/",
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(where.stdout.strip()) == clone / "pgtls_helpers" / "__init__.py"
    # and so does the notebooks' kernel
    kernel = subprocess.run(
        [str(python), "-c", KERNEL_SAYS_WHERE], cwd="/", capture_output=True, text=True, check=True
    )
    assert Path(kernel.stdout.strip()) == clone / "pgtls_helpers" / "__init__.py", kernel
    cli = subprocess.run(
        [str(clone / ".venv" / "bin" / "pgtls"), "lab", "--help"],
        cwd="/",
        capture_output=True,
        text=True,
        check=False,
    )
    assert cli.returncode == 0 and "notebook" in cli.stdout, cli.stderr
