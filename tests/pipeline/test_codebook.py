"""data.codebook: coded values get their names and columns their units wherever a value is shown."""

import json

import numpy as np
import pandas as pd
import pytest

from auditml_core import data
from auditml_core.codebook import load_codebook, show_condition, show_value
from auditml_core.config import load_config
from auditml_core.errors import DataError
from pipeline import evaluate
from pipeline.report import html_page

CODEBOOK = {"sex": {"codes": {"1": "female", "2": "male"}}, "age": {"units": "years"}, "outcome": {"units": "points"}}


def _table(tmp_path, n=300, seed=0):
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {"sex": rng.integers(1, 3, n), "age": rng.integers(20, 80, n), "bmi": rng.normal(27, 4, n).round(1)}
    )
    frame["outcome"] = 2 * frame["age"] + 3 * frame["bmi"] + 10 * frame["sex"] + rng.normal(0, 5, n)
    frame.to_csv(tmp_path / "patients.csv", index=False)
    (tmp_path / "codebook.json").write_text(json.dumps(CODEBOOK))
    return tmp_path / "patients.csv", tmp_path / "codebook.json"


def _cfg(csv, codebook):
    return load_config(None, [f'data.tabular_csv="{csv}"', 'data.target="outcome"', f'data.codebook="{codebook}"'])


def test_subgroups_and_cohorts_name_coded_values_and_units(tmp_path):
    ds = data.prepare(_cfg(*_table(tmp_path)), seed=0)["tabular"]
    assert ds.codebook["sex"]["codes"] == [[1.0, "female"], [2.0, "male"]]
    assert len(ds.provenance["codebook"]["sha256"]) == 64
    y = ds.target_to_original(ds.y["test"])
    groups = evaluate.subgroup_metrics(ds, "test", y, y + 1.0, seed=0)
    assert [g["group"] for g in groups["sex"]["groups"]] == ["sex = female (1)", "sex = male (2)"]
    assert all(g["group"].endswith(" years") for g in groups["age"]["groups"])
    x = evaluate._dataset_units(ds, "test")
    err = np.where(x[:, 0] > 1.5, 5.0, 1.0)  # the model is worse for code 2: the tree splits on sex
    co = evaluate.cohort_errors(x, list(ds.feature_names), y, y + err, seed=0, max_depth=1, codebook=ds.codebook)
    assert {c["rule"] for c in co["cohorts"]} == {"sex = female", "sex = male"}
    # Null: without a codebook the same values print as numbers, as before.
    plain = evaluate.cohort_errors(x, list(ds.feature_names), y, y + err, seed=0, max_depth=1)
    assert {c["rule"] for c in plain["cohorts"]} == {"sex <= 1.5", "sex > 1.5"}
    # The recorded dataset keeps it, and the report's data section shows the dictionary.
    again = data.load(lambda rel: data.dump({"tabular": ds, "images": ds})[rel])["tabular"]
    assert again.codebook == ds.codebook
    html = html_page.render_section("data", {"data": {"tabular": again.summary()}, "privacy": {"enabled": False}})
    assert "Data dictionary" in html and "1 = female, 2 = male" in html and "points" in html


def test_value_and_condition_formatting():
    cb, _ = {"grade": {"units": "", "codes": [[1.0, "I"], [2.0, "II"], [3.0, "III"]]}, "bmi": {"units": "kg/m²"}}, None
    assert show_value(cb, "grade", 2.0) == "II (2)" and show_value(cb, "bmi", 27.25) == "27.25 kg/m²"
    assert show_value(cb, "other", 0.5) == "0.5"
    assert show_condition(cb, "grade", "<=", 2.5) == "grade in {I, II}"
    assert show_condition(cb, "grade", ">", 2.5) == "grade = III"
    assert show_condition(cb, "bmi", ">", 30.0) == "bmi > 30 kg/m²"


@pytest.mark.parametrize(
    "text,suffix,fragment",
    [
        ('{"height": {"units": "cm"}}', ".json", "'height', which the table does not have"),
        ('{"sex": {"codes": {"one": "female"}}}', ".json", "code 'one' of 'sex' is not a number"),
        ('{"sex": {"labels": {"1": "female"}}}', ".json", "must hold 'codes'"),
        ('{"sex": {"codes": {"1": "female", "1.0": "male"}}}', ".json", "listed twice"),
        ("[sex\ncodes = 1", ".toml", "not valid TOML"),
    ],
)
def test_a_bad_codebook_is_refused_in_one_line(tmp_path, text, suffix, fragment):
    path = tmp_path / f"cb{suffix}"
    path.write_text(text)
    with pytest.raises(DataError) as info:
        load_codebook(str(path), ["sex", "age", "outcome"])
    assert fragment in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(DataError, match="does not exist"):
        load_codebook(str(tmp_path / "missing.json"), ["sex"])


def test_toml_codebook(tmp_path):
    path = tmp_path / "cb.toml"
    path.write_text('[sex]\ncodes = { "1" = "female", "2" = "male" }\n\n[age]\nunits = "years"\n')
    cb, prov = load_codebook(str(path), ["sex", "age"])
    assert cb == {
        "sex": {"units": "", "codes": [[1.0, "female"], [2.0, "male"]]},
        "age": {"units": "years", "codes": []},
    }
    assert prov["source"] == str(path)


@pytest.mark.slow
def test_a_run_with_a_codebook_labels_report_cards_and_predictions(tmp_path, tiny_overrides):
    from pipeline.__main__ import main

    csv, codebook = _table(tmp_path)
    frame = pd.read_csv(csv)
    frame.insert(0, "patient_id", np.arange(len(frame)))  # refused unless ignored
    frame.to_csv(csv, index=False)
    args = [f'data.tabular_csv="{csv}"', 'data.target="outcome"', f'data.codebook="{codebook}"', *tiny_overrides]
    assert main(["--out", str(tmp_path / "runs"), "--quiet", *args]) == 2  # the id column
    assert main(["--out", str(tmp_path / "runs"), "--quiet", 'data.ignore_columns=["patient_id"]', *args]) == 0
    (run,) = [r for r in (tmp_path / "runs").iterdir() if (r / "report.html").exists()]
    html = (run / "report.html").read_text()
    assert "Data dictionary" in html and "sex = female (1)" in html and "1 = female, 2 = male" in html
    card = (run / "model_card_regressor.md").read_text()
    assert "Data dictionary (data.codebook)" in card and "sex = male (2)" in card
    report = json.loads((run / "report.json").read_text())
    assert report["data"]["tabular"]["codebook"]["age"]["units"] == "years"
    new_rows = frame.drop(columns=["outcome"]).iloc[:5]
    new_rows.to_csv(tmp_path / "new.csv", index=False)
    out = tmp_path / "p.csv"
    argv = ["predict", str(run), "--input", str(tmp_path / "new.csv"), "--out", str(out)]
    assert main([*argv, "--ignore-columns", "patient_id"]) == 0
    prov = json.loads((tmp_path / "p.csv.provenance.json").read_text())
    assert prov["data_dictionary"]["sex"]["codes"] == [[1.0, "female"], [2.0, "male"]]
    assert "points" in prov["output"]["columns"]
