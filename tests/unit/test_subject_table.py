"""The certificate subject is one table (pki.subject.SUBJECT_FIELDS): the subject, the
parameters, the CSR form, subject.json, the CSR's summary and openssl-style names all follow it."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from pgtls_helpers.errors import InputError
from pgtls_helpers.pki.csr import build_csr, format_name, load_csr, render_csr
from pgtls_helpers.pki.keys import generate_key
from pgtls_helpers.pki.subject import (
    READING_ORDER,
    SUBJECT_FIELDS,
    Subject,
    make_subject,
    subject_from,
)
from pgtls_helpers.runbook.key_and_csr import SAVED_FIELDS, subject_of
from pgtls_helpers.runbook.params import Params, load_params

FULL = {
    "common_name": "db1.example.com",
    "country": "US",
    "state": "Pennsylvania",
    "locality": "Malvern",
    "organization": "Example Corp",
    "organizational_unit": "Databases",
    "email": "dba@example.com",
}


def test_the_table_is_the_subjects_fields_and_names_each_once() -> None:
    names = [f.name for f in SUBJECT_FIELDS]
    assert len(set(names)) == len(names) == 7
    assert len({f.oid for f in SUBJECT_FIELDS}) == len({f.label for f in SUBJECT_FIELDS}) == 7
    assert [f.name for f in dataclasses.fields(Subject)] == [f.name for f in READING_ORDER] + [
        "sans"
    ]
    assert READING_ORDER[0].name == "common_name"
    assert set(FULL) == set(names)


def test_params_carry_every_field_flat_and_give_the_subject() -> None:
    hints = typing.get_type_hints(Params)
    for f in SUBJECT_FIELDS:
        assert hints[f.name] == (str if f.name == "common_name" else str | None), f.name
    params = load_params({"change_id": "c", **FULL, "subject_alt_names": ["db1"]})
    assert params.subject == make_subject(sans=["db1"], **FULL) == subject_of(params)


def test_parameters_with_a_bad_subject_field_are_refused_when_read() -> None:
    with pytest.raises(InputError, match=r"^lab.yaml: Country \(C\) must be two letters"):
        load_params({"change_id": "c", **FULL, "country": "USA"}, source="lab.yaml")
    with pytest.raises(InputError, match=r"^p: Organizational unit \(OU\) is 65 characters"):
        load_params({"change_id": "c", **FULL, "organizational_unit": "x" * 65}, source="p")
    with pytest.raises(InputError, match=r"^p: Common name \(CN\) 'my db' is not a host name"):
        load_params({"change_id": "c", "common_name": "my db"}, source="p")


def test_the_distinguished_name_follows_the_table_and_reads_as_openssl_prints_it() -> None:
    subject = subject_from(FULL)
    name = subject.to_x509_name()
    assert [a.oid for a in name] == [f.oid for f in SUBJECT_FIELDS]
    assert format_name(name) == ", ".join(f"{f.short}={FULL[f.name]}" for f in SUBJECT_FIELDS)
    csr = load_csr(build_csr(subject, generate_key("ecdsa-p256")).public_bytes(_pem()))
    assert f"Subject:             {format_name(name)}" in render_csr(csr)


def test_the_csr_summary_and_display_use_the_tables_labels() -> None:
    labels = [label for label, _ in subject_from(FULL).fields()]
    assert labels == [f.label for f in READING_ORDER] + ["Subject alternative names"]


def test_subject_json_keys_are_the_tables_names_the_sans_and_the_key_type() -> None:
    assert set(SAVED_FIELDS) == {f.name for f in SUBJECT_FIELDS} | {
        "subject_alt_names",
        "key_type",
    }


def test_the_csr_form_has_one_input_per_field_labelled_from_the_table(tmp_path: Path) -> None:
    from pgtls_helpers.display.form import csr_form

    params = load_params({"change_id": "c", **FULL, "work_dir": str(tmp_path)})
    form = csr_form(params)
    texts = [n for n in form.inputs if n not in ("subject_alt_names", "key_type")]
    assert texts == [f.name for f in READING_ORDER]
    for f in READING_ORDER:
        widget = form.inputs[f.name]
        assert (widget.description, widget.placeholder, widget.value) == (
            f.label,
            f.example,
            FULL[f.name],
        )
    form.inputs["locality"].value = "Berlin"
    assert form.values() == dataclasses.replace(params, locality="Berlin")


def _pem() -> typing.Any:
    from cryptography.hazmat.primitives import serialization

    return serialization.Encoding.PEM
