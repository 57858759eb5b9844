"""The CRL file of ``client_crl_file`` as step c4 reads it: PEM (several CRLs) or one DER CRL,
and the client it revokes."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from pgtls_helpers.errors import InputError, PreflightError
from pgtls_helpers.lab import LabCA
from pgtls_helpers.runbook.client_crl import crl_row, load_crls, revoked_by

NOW = datetime.now(timezone.utc)


def test_pem_crls_one_der_crl_and_what_is_no_crl() -> None:
    ca = LabCA.create()
    _key, leaf = ca.issue(["db1.example.com"])
    crls = ca.sign_crls(last_update=NOW - timedelta(hours=1), next_update=NOW + timedelta(days=1),
                        revoked=[leaf])  # fmt: skip
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in crls)
    assert [c.issuer for c in load_crls(pem, "x")] == [
        ca.root.subject,
        *(i.subject for i in reversed(ca.intermediates)),
    ]
    der = crls[-1].public_bytes(serialization.Encoding.DER)
    assert load_crls(der, "x") == [crls[-1]]
    assert revoked_by(crls, leaf) == crls[-1]
    assert revoked_by(crls[:-1], leaf) is None
    assert crl_row(crls[-1])["revoked"] == 1 and crl_row(crls[0])["revoked"] == 0
    with pytest.raises(PreflightError, match=r"^x: not a CRL \(PEM or DER\)"):
        load_crls(b"-----BEGIN CERTIFICATE-----\n", "x")
    with pytest.raises(PreflightError, match="Nothing was changed"):
        load_crls(b"\x30\x03\x02\x01\x00", "x")


def test_only_a_ca_made_here_signs_a_crl_for_each_of_its_cas(tmp_path: Path) -> None:
    ca = LabCA.create()
    ca.save(str(tmp_path))
    with pytest.raises(InputError, match="only its signer's key is kept"):
        LabCA.load(str(tmp_path)).sign_crls(last_update=NOW, next_update=NOW)
