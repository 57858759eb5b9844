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


def test_the_lab_ca_is_named_in_step_2_only_in_a_lab_run(tmp_path: Path) -> None:
    chain = certfactory.make_chain(intermediates=("IntermediateCA_BAR", "IntermediateCA_FOO"))
    ca = _ca_result(tmp_path, chain)
    lab = widgets.show_sources(ca, _params(ca_mode="lab"))  # type: ignore[arg-type]
    signers = "Test Root CA → IntermediateCA_BAR → IntermediateCA_FOO"
    assert f"Lab mode: the throwaway CA ({signers}) signed the CSR" in lab.text
    assert "Lab CA" in lab.html
    files = widgets.show_sources(ca, _params(ca_mode="files"))  # type: ignore[arg-type]
    for shown in (files, widgets.show_sources(ca)):
        assert "Lab" not in shown.text and "throwaway" not in shown.html


def test_the_form_is_prefilled_and_checks_each_field(tmp_path: Path) -> None:
    params = _params(work_dir=str(tmp_path / "work"))
    form = widgets.csr_form(params)  # type: ignore[arg-type]
    assert form.inputs["common_name"].value == "db1.example.com"
    assert form.inputs["subject_alt_names"].value == "db1"
    assert form.inputs["key_type"].value == "ecdsa-p256"
    assert form.params is params and form.source == "the parameters"

    form.inputs["country"].value = "USA"
    assert "two letters" in form._errors["country"].value
    form.button.click()
    assert "two letters" in form.status.value and "not taken" in form.status.value
    # a refused form never falls back to the parameters: the next cell stops with the reason
    with pytest.raises(InputError, match="not taken.*two letters"):
        form.params  # noqa: B018
    with pytest.raises(InputError, match="Country"):
        form.values()
    assert not (tmp_path / "work" / "CHG-w" / "subject.json").exists()

    form.inputs["country"].value = "de"
    assert form._errors["country"].value == ""
    form.inputs["common_name"].value = "db2.example.com"
    form.inputs["subject_alt_names"].value = "db2\n10.0.0.7"
    form.inputs["key_type"].value = "rsa2048"
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

    saved = tmp_path / "work" / "CHG-w" / "subject.json"
    assert str(saved) in form.status.value
    assert '"common_name": "db2.example.com"' in saved.read_text()

    form.inputs["subject_alt_names"].value = "db_2"
    assert "host name" in form._errors["subject_alt_names"].value
    assert "changed" in form.status.value
    # changed but not taken: the next cell stops rather than use stale values
    with pytest.raises(InputError, match="was not pressed"):
        form.params  # noqa: B018
    form.inputs["subject_alt_names"].value = "db2\n10.0.0.7"
    assert form.params == chosen  # back to what was taken

    # a new kernel (or Run All again) finds the saved choice, in the form and in params
    again = widgets.csr_form(params)  # type: ignore[arg-type]
    assert again.inputs["common_name"].value == "db2.example.com"
    assert again.params == chosen and "subject.json" in again.source


def test_nothing_is_taken_before_the_button_is_pressed(tmp_path: Path) -> None:
    params = _params(work_dir=str(tmp_path / "work"))
    form = widgets.csr_form(params)  # type: ignore[arg-type]
    assert form.params is params  # untouched (a headless run): the parameters
    form.inputs["common_name"].value = "db9.example.com"
    with pytest.raises(InputError, match="was not pressed"):
        form.params  # noqa: B018
    assert not (tmp_path / "work").exists()


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
    form.inputs["common_name"].value = "db3.example.com"  # the saved subject.json too
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
    texts.append((tmp_path / "work" / "CHG-w" / "subject.json").read_text())
    assert all(o.html and o.text for o in outputs)
    # ... and is absent from every output, while its variable's name is shown
    assert not [t for t in texts if secret in t]
    assert any("PGTLS_KEY_PASSPHRASE" in t for t in texts)


def test_later_steps_take_the_names_from_the_csr_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pgtls_helpers.runbook.key_and_csr import names_from_csr, step1_key_and_csr

    params = _params(work_dir=str(tmp_path / "work"), subject_alt_names=["db1", "10.0.0.5"])
    assert names_from_csr(params) is params  # no CSR yet
    step1_key_and_csr(params)
    # made from these very parameters: the same object, so a headless record is unchanged
    assert names_from_csr(params) is params

    form = widgets.csr_form(params)  # type: ignore[arg-type]
    form.inputs["common_name"].value = "db7.example.com"
    form.inputs["subject_alt_names"].value = "db7\n10.0.0.7"
    form.button.click()
    (tmp_path / "work" / "CHG-w" / "server.csr").unlink()  # start the change over
    (tmp_path / "work" / "CHG-w" / "server.key").unlink()
    step1_key_and_csr(form.params)

    later = names_from_csr(params)  # what notebooks 02-05 read from their parameters cell
    assert later.common_name == "db7.example.com"
    assert later.subject_alt_names == ("db7", "10.0.0.7")
    assert later.hosts == ("db7.example.com", "db7", "10.0.0.7")
    pinned = names_from_csr(_params(work_dir=str(tmp_path / "work"), verify_hosts=["db1"]))
    assert pinned.common_name == "db7.example.com" and pinned.hosts == ("db1",)

    namespace = {
        name: getattr(params, name)
        for name in ("change_id", "common_name", "work_dir", "key_type", "ca_mode")
    }
    shown: list[object] = []
    monkeypatch.setattr("pgtls_helpers.display.form.show_now", shown.append)
    in_notebook = widgets.notebook_params(namespace, names_from_csr=True)
    assert in_notebook.common_name == "db7.example.com"
    assert len(shown) == 1 and "db7.example.com" in shown[0].text  # type: ignore[attr-defined]
    assert "server.csr" in shown[0].text  # type: ignore[attr-defined]
    assert widgets.notebook_params(namespace).common_name == "db1.example.com"


def test_a_damaged_subject_file_is_named_with_the_fix(tmp_path: Path) -> None:
    params = _params(work_dir=str(tmp_path / "work"))
    saved = tmp_path / "work" / "CHG-w" / "subject.json"
    saved.parent.mkdir(parents=True)
    saved.write_text('{"common_name": "db1", "password": "x"}')
    with pytest.raises(InputError, match="subject.json: not a subject saved by the CSR form"):
        widgets.csr_form(params)  # type: ignore[arg-type]
    saved.write_text('{"common_name": "db 1"}')
    with pytest.raises(InputError):
        widgets.csr_form(params)  # type: ignore[arg-type]
