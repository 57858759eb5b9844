"""Steps 3 and 4 of a change, as the runbook's kernel runs them (for the fault tests);
with ``--trust``, the client-trust change of ``pgtls trust`` instead."""

from __future__ import annotations

import sys
from pathlib import Path

from pgtls_helpers import notebook as runbook
from pgtls_helpers.runbook.params import load_params, read_params_file, resolve_paths


def main(path: str, *, trust: bool = False) -> int:
    values = resolve_paths(read_params_file(path), Path(path))
    params = load_params(values, source=path)
    if trust:
        runbook.client_trust(params)
        return 0
    runbook.step3_install_files(params)
    runbook.step4_enable_ssl(params)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], trust="--trust" in sys.argv[2:]))
