"""Retiring a client root from ``ssl_ca_file`` cuts out exactly its PEM block, and the refusal
to empty the file looks for the lines that ask for a client certificate."""

from __future__ import annotations

import certfactory

from pgtls_helpers.pki import chain as chainmod
from pgtls_helpers.runbook import client_roots, client_trust_plan


def test_retiring_a_root_cuts_its_block_and_keeps_every_other_byte() -> None:
    old, new, other = (certfactory.make_ca(n).cert for n in ("Old Root", "New Root", "Other"))
    data = (
        b"# client roots\n"
        + certfactory.pem(old)
        + b"\n# kept\n"
        + certfactory.pem(new)
        + certfactory.pem(other)
    )
    cut = client_roots.without_certs(data, {chainmod.fingerprint(old)})
    assert cut == b"# client roots\n\n# kept\n" + certfactory.pem(new) + certfactory.pem(other)
    assert client_roots.without_certs(data, set()) == data


def test_cert_lines_are_found_by_method_or_clientcert() -> None:
    assert client_trust_plan._has_cert_lines("hostssl all alice 10.0.0.0/8 cert\n")
    assert client_trust_plan._has_cert_lines(
        "hostssl all all 10.0.0.0/8 scram-sha-256 clientcert=verify-full\n"
    )
    assert client_trust_plan._has_cert_lines("local all all cert\n")
    assert not client_trust_plan._has_cert_lines(
        "# hostssl all all 10.0.0.0/8 cert\nhostssl all all 10.0.0.0/8 scram-sha-256\n"
    )
