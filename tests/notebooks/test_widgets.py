"""The notebook displays and the CSR form, without a kernel."""

from __future__ import annotations

from pathlib import Path

import certfactory
import pytest

from pgtls_helpers import notebook as widgets
from pgtls_helpers.errors import InputError, PreflightError
from pgtls_helpers.pki.chain import order_chain
from pgtls_helpers.pki.findings import CODES, check_chain
from pgtls_helpers.runbook.ca_response import CaResponseResult
from pgtls_helpers.runbook.params import load_params


def _params(**overrides: object) -> object:
    values: dict[str, object] = {
        "change_id": "CHG-w",
        "common_name": "db1.example.com",
        "subject_alt_names": ["db1"],
        "country": "US",
        "organization": "Example Corp",
        "key_type": "ecdsa-p256",
        "ca_mode": "lab",
    }
    values.update(overrides)
    return load_params(values)


def _ca_result(
    tmp_path: Path, chain: certfactory.Chain, *, drop: int | None = None
) -> CaResponseResult:
    certs = chain.leaf_first()
    if drop is not None:
        del certs[drop]
    result = order_chain(certs, leaf=chain.leaf.cert)
    findings = check_chain(result, key=chain.leaf.key, hosts=["db1.example.com"])
    return CaResponseResult(["reply.pem"], result, findings, [], tmp_path / "server.crt", None)


def test_the_form_is_prefilled_and_checks_each_field() -> None:
    params = _params()
    form = widgets.csr_form(params)  # type: ignore[arg-type]
    assert form.inputs["common_name"].value == "db1.example.com"
    assert form.inputs["subject_alt_names"].value == "db1"
    assert form.inputs["key_type"].value == "ecdsa-p256"
    assert form.params is params and form.source == "the parameters"

    form.inputs["country"].value = "USA"
    assert "two letters" in form._errors["country"].value
    form.button.click()
    assert "two letters" in form.status.value
    assert form.params is params  # a bad form never replaces the parameters
    with pytest.raises(InputError, match="Country"):
        form.values()

    form.inputs["country"].value = "de"
    assert form._errors["country"].value == ""
    form.inputs["common_name"].value = "db2.example.com"
    form.inputs["subject_alt_names"].value = "db2\n10.0.0.7"
    form.inputs["key_type"].value = "rsa2048"
    assert form.params is params  # nothing is taken before the button is pressed
    form.button.click()
    chosen = form.params
    assert form.source == "the form"
    assert (chosen.common_name, chosen.country, chosen.key_type) == (
        "db2.example.com",
        "DE",
        "rsa2048",
    )
    assert chosen.subject_alt_names == ("db2", "10.0.0.7")
    assert chosen.change_id == "CHG-w"
    table = widgets.show_values(form)
    assert "db2.example.com" in table.html and "10.0.0.7" in table.text
    assert "the form" in table.text

    form.inputs["subject_alt_names"].value = "db_2"
    assert "host name" in form._errors["subject_alt_names"].value
    assert "changed" in form.status.value


def test_the_form_renders_as_plain_text_where_no_widgets_can_be_drawn() -> None:
    bundle = widgets.csr_form(_params())._repr_mimebundle_()  # type: ignore[arg-type]
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert bundle["text/plain"].startswith("[CSR form")


def test_chain_displays_show_order_validity_and_what_to_do(tmp_path: Path) -> None:
    good = _ca_result(tmp_path, certfactory.article_chain())
    picture = widgets.chain_picture(good)
    assert picture.text.index("RootCA") < picture.text.index("IntermediateCA_BAR")
    assert picture.text.index("IntermediateCA_FOO") < picture.text.index("db1.example.com")
    timeline = widgets.validity_timeline(good)
    assert "<svg" in timeline.html and "today" in timeline.html
    assert "expired" not in timeline.text
    table = widgets.inspection_table(good)
    assert "0 leaf" in table.html and "3 root" in table.html
    assert widgets.stop_on_errors(good).text.startswith("Go")

    # an expired leaf and a missing intermediate: both shown, then the run stops
    bad = _ca_result(tmp_path, certfactory.article_chain(expired=True), drop=1)
    assert "[missing" in widgets.chain_picture(bad).text
    assert "expired" in widgets.validity_timeline(bad).text
    findings = widgets.show_findings(bad)
    assert CODES["missing-issuer"] in findings.html and CODES["expired"] in findings.html
    with pytest.raises(PreflightError, match="missing-issuer"):
        widgets.stop_on_errors(bad)


def test_host_coverage_explains_each_name(tmp_path: Path) -> None:
    ca = _ca_result(tmp_path, certfactory.article_chain())
    shown = widgets.host_coverage(ca, _params(verify_hosts=["db1.example.com", "db9"]))  # type: ignore[arg-type]
    assert "accepted" in shown.text and "refused" in shown.text
    assert 'does not match host name "db9"' in shown.html.replace("&quot;", '"')


def test_parameters_show_names_of_secrets_never_values() -> None:
    params = _params(key_passphrase_env="PGTLS_KEY_PASSPHRASE")
    shown = widgets.show_parameters(params)  # type: ignore[arg-type]
    assert "PGTLS_KEY_PASSPHRASE" in shown.text
    assert "plan only" in shown.text  # apply defaults to false
    assert widgets.plan_only(_params(apply=True)).apply is False  # type: ignore[arg-type]


def test_a_secret_given_to_the_form_never_appears_in_any_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "Kx9-never-print-this-7Qz"
    monkeypatch.setenv("PGTLS_KEY_PASSPHRASE", secret)
    params = _params(
        key_passphrase_env="PGTLS_KEY_PASSPHRASE", work_dir=str(tmp_path / "work"), apply=True
    )
    form = widgets.csr_form(params)  # type: ignore[arg-type]
    form.inputs["common_name"].value = "db3.example.com"
    form.button.click()
    assert form.source == "the form"

    from pgtls_helpers.runbook.key_and_csr import step1_key_and_csr

    result = step1_key_and_csr(form.params)
    assert result.encrypted  # the passphrase was used ...
    outputs = [
        widgets.show_parameters(params),  # type: ignore[arg-type]
        widgets.show_parameters(form.params),
        widgets.show_values(form),
        widgets.show_key_and_csr(result, form.params),
    ]
    texts = [o.html for o in outputs] + [o.text for o in outputs]
    texts += [str(v) for v in form._repr_mimebundle_().values()]
    texts += [form.status.value, *(e.value for e in form._errors.values())]
    texts += [str(w.value) for w in form.inputs.values()]
    texts += [repr(form.params), repr(result), str(result.summary())]
    assert all(o.html and o.text for o in outputs)
    # ... and is absent from every output, while its variable's name is shown
    assert not [t for t in texts if secret in t]
    assert any("PGTLS_KEY_PASSPHRASE" in t for t in texts)
