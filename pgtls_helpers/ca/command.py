"""``ca_mode: command``: any program signs the CSR.

``ca_settings``::

    command: [step, ca, sign, "{csr}", "{out}/server.crt", --not-after, 2160h]
    timeout: 120            # seconds; the CA is given up as unavailable after it
    unavailable_exit: [75]  # exit codes that mean "try later" (EX_TEMPFAIL by default)

The program gets ``{csr}`` (the CSR's path), ``{out}`` (an empty folder for its answer) and
``{cn}`` (the common name) in its arguments, is run without a shell, with this process's
environment (so its secrets come from the environment or files it reads itself), and must leave
in ``{out}`` the files the CA returned (certificate and chain, in PEM, DER or PKCS#12, in any
order); step 2 reads them like any CA's files. Its output is never recorded: a program may print
a secret.
"""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pgtls_helpers.ca import (
    CaRefused,
    CaUnavailable,
    Signed,
    SignRequest,
    known_settings,
)
from pgtls_helpers.errors import InputError

__all__ = ["CommandCA"]

_KNOWN = ("command", "timeout", "unavailable_exit")


@dataclass(frozen=True)
class CommandCA:
    """A program that signs: its argument list, with ``{csr}``, ``{out}`` and ``{cn}``."""

    argv: tuple[str, ...]
    timeout: float = 120.0
    unavailable_exit: tuple[int, ...] = (75,)

    @property
    def name(self) -> str:
        return f"command {Path(self.argv[0]).name}"

    @classmethod
    def from_settings(cls, settings: Mapping[str, object], source: str) -> CommandCA:
        known_settings(settings, _KNOWN, source, mode="command")
        raw = settings.get("command")
        if isinstance(raw, str):
            raw = shlex.split(raw)
        if (
            not isinstance(raw, Sequence)
            or not raw
            or not all(isinstance(a, str) and a for a in raw)
        ):
            raise InputError(
                f"{source}: ca_settings.command is missing; give the program and its arguments "
                "as a list, with {csr} and {out} where the CSR and the answer's folder go"
            )
        argv = tuple(str(a) for a in raw)
        if not any("{out}" in a for a in argv):
            raise InputError(
                f"{source}: ca_settings.command never names {{out}}, the folder the program "
                "must leave the CA's answer in"
            )
        timeout = settings.get("timeout", 120)
        if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0:
            raise InputError(f"{source}: ca_settings.timeout must be a number of seconds above 0")
        codes = settings.get("unavailable_exit", [75])
        if not isinstance(codes, list) or not all(isinstance(c, int) for c in codes):
            raise InputError(f"{source}: ca_settings.unavailable_exit must be a list of exit codes")
        return cls(argv, float(timeout), tuple(codes))

    def _argv(self, csr: Path, out: Path, cn: str) -> list[str]:
        values = {"{csr}": str(csr), "{out}": str(out), "{cn}": cn}
        args = []
        for arg in self.argv:
            for key, value in values.items():
                arg = arg.replace(key, value)
            args.append(arg)
        return args

    def sign(self, request: SignRequest, out: Path) -> Signed:
        csr = out.parent / f"{out.name}.csr"
        csr.write_bytes(request.csr_pem)
        out.mkdir(mode=0o700, exist_ok=True)
        argv = self._argv(csr, out, request.common_name)
        try:
            done = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=self.timeout,
                check=False,
            )
        except FileNotFoundError:
            raise CaUnavailable(
                f"the CA command {argv[0]} was not found; install it or fix ca_settings.command"
            ) from None
        except subprocess.TimeoutExpired:
            raise CaUnavailable(
                f"the CA command {Path(argv[0]).name} did not finish in {self.timeout:g} s; "
                "nothing was installed, run again later or raise ca_settings.timeout"
            ) from None
        finally:
            csr.unlink(missing_ok=True)
        if done.returncode != 0:
            # its last line of stderr says why; the rest may hold anything, even a secret
            why = (done.stderr.decode(errors="replace").strip().splitlines() or ["no message"])[-1]
            cls = CaUnavailable if done.returncode in self.unavailable_exit else CaRefused
            raise cls(
                f"the CA command {Path(argv[0]).name} exited with status {done.returncode} "
                f"({why[:200]}); nothing was installed"
            )
        files = tuple(sorted(p for p in out.iterdir() if p.is_file()))
        if not files:
            raise CaRefused(
                f"the CA command {Path(argv[0]).name} left nothing in {out}; it must write the "
                "certificate (and its chain) there"
            )
        return Signed(files=files, ca=self.name, reference=None)
