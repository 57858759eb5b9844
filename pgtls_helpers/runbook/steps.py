"""The runbooks' steps, listed once: name, title, notebook, when a step is skipped, whether it
writes to the server or a client's home, and the type its summary comes from.

The runner (:mod:`pgtls_helpers.runbook.runner`) walks a tuple of :class:`Step` and asks each
step, never its name, whether it runs: :data:`SERVER` is the server runbook's five notebooks,
:data:`TRUST` the client-trust change of ``pgtls trust``, :data:`CLIENTS` the client-certificate
runbook of ``pgtls clients``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pgtls_helpers.runbook.params import Params

__all__ = ["CLIENTS", "SERVER", "TRUST", "Step", "waits_for_the_ca"]


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
        answer: the parameter that lists the CA's answer files for ``needs_ca`` steps.
        issues: it issues or installs client certificates, so a client-CA rotation's change
            that only trusts or retires roots (``trust_client_roots``,
            ``retire_client_roots``) skips it.
    """

    name: str
    title: str
    result: str
    writes: bool = False
    needs_ca: bool = False
    proves: bool = False
    answer: str = "ca_files"
    issues: bool = False  # it issues client files: not in a rotation's trust or retire change

    @property
    def notebook(self) -> str:
        return f"{self.name}.ipynb"

    def waits(self, params: Params) -> bool:
        """In ``ca_mode: files`` with no answer listed yet, this step waits for the CA."""
        if _rotation_only(params):
            return False  # a client-CA rotation's trust or retire change sends no CSR
        return self.needs_ca and params.ca_mode == "files" and not getattr(params, self.answer)

    def skipped(self, params: Params, *, phase_one: bool) -> tuple[str, str] | None:
        """``(status, why)`` when this step does not run for ``params``, else ``None``."""
        # phase_one: the run's steps need the CA's answer and it has not come (see needs_ca)
        if phase_one and self.needs_ca:
            return "not-run", f"waiting for the CA's response ({self.answer} is empty)"
        if self.issues and _rotation_only(params):
            return "skipped", (
                "this change only trusts or retires client roots: the clients keep their files"
            )
        if self.proves and not params.apply:
            return "skipped", "apply is false: nothing was changed, so there is nothing to verify"
        return None


def _rotation_only(params: Params) -> bool:
    """A client-CA rotation's change that only trusts or retires roots."""
    return bool(params.trust_client_roots or params.retire_client_roots)


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

CLIENTS: tuple[Step, ...] = (
    Step(
        "c1_client_keys",
        "Client keys",
        "pgtls_helpers.runbook.client_keys:ClientKeysResult",
        issues=True,
    ),
    Step(
        "c2_client_certs",
        "Client certificates",
        "pgtls_helpers.runbook.client_keys:ClientCertsResult",
        issues=True,
        needs_ca=True,
        answer="client_ca_files",
    ),
    Step(
        "c3_install_clients",
        "Install client files",
        "pgtls_helpers.runbook.client_keys:ClientInstallResult",
        issues=True,
        writes=True,
        needs_ca=True,
        answer="client_ca_files",
    ),
    Step(
        "c4_server_trust",
        "Server trusts clients",
        "pgtls_helpers.runbook.client_server:ServerTrustResult",
        writes=True,
        needs_ca=True,
        answer="client_ca_files",
    ),
    Step(
        "c5_verify_clients",
        "Verify client logins",
        "pgtls_helpers.runbook.client_proof:ClientProofResult",
        needs_ca=True,
        answer="client_ca_files",
        proves=True,
    ),
)


def waits_for_the_ca(params: Params, steps: tuple[Step, ...]) -> bool:
    """The run waits for the CA: a step needs its answer and none is listed yet."""
    return any(s.waits(params) for s in steps)
