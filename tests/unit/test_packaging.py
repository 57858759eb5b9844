"""The two dependency lists (pip and conda) say the same thing."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
# conda-forge spells a few packages differently; everything else must match by name
CONDA_NAMES = {"psycopg[binary]": "psycopg", "types-pyyaml": "types-pyyaml"}
CONDA_ONLY = {"python", "postgresql", "openssl", "pip"}


def _name(requirement: str) -> str:
    name = re.split(r"[<>=!~ ]", requirement.strip(), maxsplit=1)[0].lower()
    return CONDA_NAMES.get(name, name)


def _pip() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    return {_name(r) for r in reqs}


def _conda_reqs() -> list[str]:
    """Conda packages, and the pip section's for what conda-forge does not carry."""
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    reqs = [d for d in env["dependencies"] if isinstance(d, str)]
    for d in env["dependencies"]:
        if isinstance(d, dict):
            reqs += d.get("pip", [])
    return reqs


def _conda() -> set[str]:
    return {_name(d) for d in _conda_reqs()} - CONDA_ONLY


def test_pyproject_and_environment_list_the_same_packages() -> None:
    pip, conda = _pip(), _conda()
    assert pip - conda == set(), f"missing from environment.yml: {sorted(pip - conda)}"
    assert conda - pip == set(), f"missing from pyproject.toml: {sorted(conda - pip)}"


def test_environment_brings_the_server_binaries() -> None:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert "postgresql" in {_name(d) for d in env["dependencies"] if isinstance(d, str)}


def test_lower_bounds_agree() -> None:
    def bounds(reqs: list[str]) -> dict[str, str]:
        out = {}
        for r in reqs:
            m = re.search(r">=\s*([\w.]+)", r)
            if m:
                out[_name(r)] = m.group(1)
        return out

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pip_reqs = list(project["dependencies"]) + [
        r for extra in project["optional-dependencies"].values() for r in extra
    ]
    conda_reqs = _conda_reqs()
    pb, cb = bounds(pip_reqs), bounds(conda_reqs)
    assert {k: v for k, v in pb.items() if k in cb} == {k: v for k, v in cb.items() if k in pb}


def test_the_wheel_carries_the_package_layers_and_the_notebooks(tmp_path: Path) -> None:
    import shutil
    import subprocess
    import sys
    import zipfile

    # from a copy of the source: a build in the checkout reuses a stale build/lib
    source = tmp_path / "source"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "records", "work"),
    )

    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            "-w",
            str(tmp_path),
            str(source),
        ],
        check=True,
    )
    (wheel,) = tmp_path.glob("pgtls-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    # every module of the checkout, each layer included (ca/ too, whatever .gitignore says)
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "pgtls_helpers").rglob("*.py")} - {
        n for n in names if n.endswith(".py")
    }
    assert modules == set()
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    notebooks = sorted(n for n in names if n.startswith("pgtls_helpers/notebooks/"))
    committed = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
    assert [n.rsplit("/", 1)[1] for n in notebooks] == committed
