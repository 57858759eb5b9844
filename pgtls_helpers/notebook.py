"""What the notebooks call, and nothing more: the five steps and the displays of their
evidence, the client-certificate runbook's five, and the watch report. Notebooks import this
one module (``from pgtls_helpers import notebook as pgtls``)."""

from __future__ import annotations

from pgtls_helpers.display.chain import (
    chain_picture,
    host_coverage,
    inspection_table,
    key_match,
    show_findings,
    show_sources,
    stop_on_errors,
    validity_timeline,
)
from pgtls_helpers.display.changes import (
    apply_step,
    require_pass,
    show_checks,
    show_enabled,
    show_install_plan,
    show_installed,
    show_ssl_plan,
)
from pgtls_helpers.display.client_form import (
    client_form,
    show_client_parameters,
    show_client_values,
)
from pgtls_helpers.display.clients import show_client_step
from pgtls_helpers.display.form import (
    csr_form,
    notebook_params,
    plan_only,
    show_key_and_csr,
    show_parameters,
    show_values,
)
from pgtls_helpers.display.renewal import (
    show_renewal,
    show_served,
    show_trust,
    show_trust_plan,
)
from pgtls_helpers.display.watch import (
    check_client_files,
    client_table,
    days_picture,
    expiry_timeline,
    run_watch,
    sessions_table,
    show_reasons,
    show_summary,
    watch_table,
)
from pgtls_helpers.runbook.ca_response import step2_ca_response
from pgtls_helpers.runbook.client_keys import (
    step_c1_client_keys,
    step_c2_client_certs,
    step_c3_install_clients,
)
from pgtls_helpers.runbook.client_proof import step_c5_verify_clients
from pgtls_helpers.runbook.client_server import step_c4_server_trust
from pgtls_helpers.runbook.enable import step4_enable_ssl
from pgtls_helpers.runbook.install import step3_install_files
from pgtls_helpers.runbook.key_and_csr import step1_key_and_csr
from pgtls_helpers.runbook.trust import client_trust
from pgtls_helpers.runbook.verify import step5_verify_clients

__all__ = [
    "apply_step",
    "chain_picture",
    "client_trust",
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
    "show_renewal",
    "show_served",
    "show_sources",
    "show_ssl_plan",
    "show_trust",
    "show_trust_plan",
    "show_values",
    "step1_key_and_csr",
    "step2_ca_response",
    "step3_install_files",
    "step4_enable_ssl",
    "step5_verify_clients",
    "stop_on_errors",
    "validity_timeline",
    # notebooks/c1_*.ipynb to c5_*.ipynb: the client-certificate runbook
    "client_form",
    "show_client_parameters",
    "show_client_step",
    "show_client_values",
    "step_c1_client_keys",
    "step_c2_client_certs",
    "step_c3_install_clients",
    "step_c4_server_trust",
    "step_c5_verify_clients",
    # notebooks/watch.ipynb
    "check_client_files",
    "client_table",
    "days_picture",
    "expiry_timeline",
    "run_watch",
    "sessions_table",
    "show_reasons",
    "show_summary",
    "watch_table",
]
