"""pgtls: take a PostgreSQL server from SSL off to verified TLS with CA-signed certificates.

The names below are what the runbook notebooks call: the five steps and the displays that show
their evidence. They are imported on first use, so ``pgtls chain inspect`` does not pay for
ipywidgets or pandas.
"""

from __future__ import annotations

import importlib

# typing costs a few milliseconds at start-up, which every `pgtls probe` would pay; mypy reads
# any constant named TYPE_CHECKING as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from pgtls_helpers.runbook import (
        step1_key_and_csr,
        step2_ca_response,
        step3_install_files,
        step4_enable_ssl,
        step5_verify_clients,
    )
    from pgtls_helpers.widgets import (
        apply_step,
        chain_picture,
        csr_form,
        host_coverage,
        inspection_table,
        key_match,
        notebook_params,
        plan_only,
        require_pass,
        show_checks,
        show_enabled,
        show_findings,
        show_install_plan,
        show_installed,
        show_key_and_csr,
        show_parameters,
        show_sources,
        show_ssl_plan,
        show_values,
        stop_on_errors,
        validity_timeline,
    )

__all__ = [
    "apply_step",
    "chain_picture",
    "csr_form",
    "host_coverage",
    "inspection_table",
    "key_match",
    "notebook_params",
    "plan_only",
    "require_pass",
    "show_checks",
    "show_enabled",
    "show_findings",
    "show_install_plan",
    "show_installed",
    "show_key_and_csr",
    "show_parameters",
    "show_sources",
    "show_ssl_plan",
    "show_values",
    "step1_key_and_csr",
    "step2_ca_response",
    "step3_install_files",
    "step4_enable_ssl",
    "step5_verify_clients",
    "stop_on_errors",
    "validity_timeline",
]

# the five steps live in runbook, everything else the notebooks call in widgets
_HOME = {
    name: "pgtls_helpers.runbook"
    if name.startswith("step") and name[4].isdigit()
    else "pgtls_helpers.widgets"
    for name in __all__
}


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module 'pgtls_helpers' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
