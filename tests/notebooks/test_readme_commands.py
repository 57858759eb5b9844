"""Every command the README shows exists as written: make targets and pgtls subcommands."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from pgtls_helpers.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
TARGETS = set(re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), re.M))


def _shown(pattern: str) -> list[str]:
    blocks = re.findall(r"```\n(.*?)```", README, re.S)
    inline = re.findall(r"`([^`\n]+)`", README)
    lines = [ln.split("#", 1)[0].strip() for b in blocks for ln in b.splitlines()]
    return sorted({c for c in lines + inline if re.match(pattern, c)})


@pytest.mark.parametrize("command", _shown(r"make( |$)"))
def test_each_make_command_is_a_target(command: str) -> None:
    words = [w for w in shlex.split(command)[1:] if "=" not in w]
    assert all(w in TARGETS for w in words), (command, sorted(TARGETS))


def _runnable(command: str) -> bool:
    """A command to type, not a usage line (``[--opt]``, ``…``, ``<dir>``) or a bare mention."""
    return not re.search(r"[…\[<|]|PARAMS|DIR|FILE", command) and len(command.split()) > 2


PGTLS = [c for c in _shown(r"(\.venv/bin/)?pgtls [a-z]") if _runnable(c)]


def test_the_readme_shows_pgtls_commands() -> None:
    assert len(PGTLS) >= 3, PGTLS


@pytest.mark.parametrize("command", PGTLS)
def test_each_pgtls_command_parses(command: str) -> None:
    args = shlex.split(command)[1:]
    assert build_parser().parse_args(args).func  # a bad one exits 2 (SystemExit)


def test_make_rollback_is_shown_beside_make_run() -> None:
    assert "make rollback PARAMS=parameters/CHG0012345.yaml" in README
    assert "rollback" in TARGETS


def test_make_rollback_passes_the_dry_run_on() -> None:
    import subprocess

    def dry(*extra: str) -> str:
        return subprocess.run(
            ["make", "-n", "-C", str(ROOT), "rollback", "PARAMS=p.yaml", *extra],
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    assert re.search(r"pgtls_helpers rollback p\.yaml .*--dry-run", dry("DRY_RUN=1"))
    assert "--dry-run" not in dry()
