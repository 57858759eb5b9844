"""Step 2 with a CA back-end (``ca_mode: command`` or ``vault``): the CSR goes to the CA, the
CA's answer comes back as files into the change's work directory, and step 2 reads them as it
reads any CA's files. A CA that is down, slow or refuses leaves the server untouched, says which
CA and why in one sentence, and gives the run an exit status of its own
(:data:`pgtls_helpers.ca.CaUnavailable.exit_code`, :data:`~pgtls_helpers.ca.CaRefused.exit_code`).
"""

from __future__ import annotations

from pathlib import Path

from pgtls_helpers.ca import CaError, Signed, SignRequest, backend_for
from pgtls_helpers.pki import chain as chainmod
from pgtls_helpers.postgres.files import utc_stamp
from pgtls_helpers.runbook.common import save_step
from pgtls_helpers.runbook.params import Params

__all__ = ["sign_with_backend"]


def sign_with_backend(params: Params, csr_path: Path) -> Signed:
    """Ask the CA of ``params.ca_mode`` to sign the change's CSR; its answer's files."""
    from pgtls_helpers.pki.csr import load_csr

    backend = backend_for(params.ca_mode, params.ca_settings, "ca_settings")
    data = csr_path.read_bytes()
    csr = load_csr(data, source=str(csr_path))
    names = tuple(dict.fromkeys([params.common_name, *chainmod.names_of(csr)]))
    out = params.work.path / "ca-answers" / utc_stamp()
    out.parent.mkdir(mode=0o700, exist_ok=True)
    try:
        request = SignRequest(
            data, params.common_name, names, params.change_id, state_dir=params.work.path.parent
        )
        return backend.sign(request, out)
    except CaError as exc:
        # what the runner reads to give the run the CA's exit status; never a secret
        save_step(
            params,
            "02_ca_response",
            {"signed_by": backend.name, "ca_failure": exc.kind, "ca_error": str(exc)},
        )
        raise
