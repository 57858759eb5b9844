"""The runbooks' steps, listed once: name, title, notebook, when a step is skipped, whether it
writes to the server or a client's home, and the type its summary comes from.

The runner (:mod:`pgtls_helpers.runbook.runner`) walks a tuple of :class:`Step` and asks each
step, never its name, whether it runs: :data:`SERVER` is the server runbook's five notebooks,
:data:`TRUST` the client-trust change of ``pgtls trust``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pgtls_helpers.runbook.params import Params

__all__ = ["SERVER", "TRUST", "Step"]


@dataclass(frozen=True)
class Step:
    """One notebook of a runbook.

    Attributes:
        name: the notebook's stem, also the name of its summary (``steps/<name>.json``).
        title: how pages and the terminal name it.
        result: the module and dataclass whose ``summary()`` the step saves.
        writes: it writes server or client files (the run's change lock is taken before the
            first such step and held until the record is sealed).
        needs_ca: it needs the CA's answer: in phase one (``ca_mode: files`` and no
            ``ca_files`` yet) it waits, and the run ends "waiting for the CA".
        proves: it proves an applied change, so it is skipped when ``apply`` is false.
    """

    name: str
    title: str
    result: str
    writes: bool = False
    needs_ca: bool = False
    proves: bool = False

    @property
    def notebook(self) -> str:
        return f"{self.name}.ipynb"

    def skipped(self, params: Params, *, phase_one: bool) -> tuple[str, str] | None:
        """``(status, why)`` when this step does not run for ``params``, else ``None``."""
        # phase_one: the run's steps need the CA's answer and it has not come (see needs_ca)
        if phase_one and self.needs_ca:
            return "not-run", "waiting for the CA's response (ca_files is empty)"
        if self.proves and not params.apply:
            return "skipped", "apply is false: nothing was changed, so there is nothing to verify"
        return None


SERVER: tuple[Step, ...] = (
    Step(
        "01_key_and_csr",
        "Key and CSR",
        "pgtls_helpers.runbook.key_and_csr:KeyCsrResult",
    ),
    Step(
        "02_ca_response",
        "CA response",
        "pgtls_helpers.runbook.ca_response:CaResponseResult",
        needs_ca=True,
    ),
    Step(
        "03_install_files",
        "Install files",
        "pgtls_helpers.runbook.install:InstallStepResult",
        writes=True,
        needs_ca=True,
    ),
    Step(
        "04_enable_ssl",
        "Enable SSL",
        "pgtls_helpers.runbook.enable:EnableResult",
        writes=True,
        needs_ca=True,
    ),
    Step(
        "05_verify_clients",
        "Verify clients",
        "pgtls_helpers.runbook.verify:VerifyResult",
        needs_ca=True,
        proves=True,
    ),
)

TRUST: tuple[Step, ...] = (
    Step(
        "client_trust",
        "Client trust",
        "pgtls_helpers.runbook.trust:TrustResult",
        writes=True,
    ),
)
