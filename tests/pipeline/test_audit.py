"""The audit stage (membership inference) and its place in the report: round trip, schema, loud caveats."""

import copy
import json

import numpy as np
import pytest

from auditml_core import config as config_mod
from auditml_core.config import load_config
from pipeline import audit, report, runner
from pipeline.report.audit import audit_section
from pipeline.rundir import RunDir
from tests.tiny import AUDIT, EXPLAIN, TRAIN

jsonschema = pytest.importorskip("jsonschema")


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    """A tiny DP run through every stage the report reads, the audit included."""
    overrides = TRAIN + EXPLAIN + AUDIT + ["dp.enabled=true", "dp.target_epsilon=3"]
    cfg = load_config(None, overrides)
    run = RunDir.create(
        tmp_path_factory.mktemp("audit") / "runs",
        config_toml=config_mod.to_toml(cfg),
        command=["python", "-m", "pipeline", *overrides],
        device="cpu",
    )
    runner.run_stages(cfg, run, ["data", "train", "evaluate", "explain", "audit", "report"])
    return cfg, run


@pytest.mark.slow  # a DP run through explain and report: ~30 s alone, minutes on a loaded machine
def test_audit_stage_round_trips_through_the_run_directory(dp_run):
    cfg, run = dp_run
    loaded = audit.load(run.read)
    assert loaded["enabled"] and set(loaded["models"]) == {"regressor", "cnn"}
    again = audit.load(lambda rel: audit.dump(loaded)[rel])
    assert again["models"] == loaded["models"]
    for name, arrays in loaded["scores"].items():
        assert set(arrays) == set(again["scores"][name])
        for key, value in arrays.items():
            np.testing.assert_array_equal(value, again["scores"][name][key])
        n = loaded["models"][name]["n_members"]
        assert arrays["members"].sum() == n and len(arrays["target_loss"]) == 2 * n
    rec = loaded["models"]["cnn"]
    assert rec["dp"] and rec["claimed_epsilon"] <= 3.0
    for attack in rec["attacks"].values():
        assert 0 <= attack["auc"] <= 1 and attack["auc_ci95"][0] <= attack["auc"] <= attack["auc_ci95"][1]
        for row in attack["tpr_at_fpr"]:
            assert row["fpr"] <= row["target_fpr"] and row["dp_bound"] >= row["target_fpr"]


@pytest.mark.slow  # a DP run through explain and report: ~30 s alone, minutes on a loaded machine
def test_report_shows_the_audit_and_the_public_only_baseline(dp_run):
    _, run = dp_run
    content = json.loads(run.read("report.json"))
    jsonschema.validate(content, report.schema())
    a = content["audit"]
    assert a["ran"] and set(a["models"]) == {"regressor", "cnn"}
    for m in a["models"].values():
        assert {x["attack"] for x in m["attacks"]} == {"loss", "lira"} and len(m["control"]["attacks"]) == 2
        assert m["claimed_epsilon"] is not None
    for name in ("regressor", "cnn"):
        po = content["models"][name]["public_only_baseline"]
        assert po["available"] and po["statement"]
        lo, hi = po["private_gain_ci95"]
        assert lo <= po["private_gain"] <= hi
        assert po["private_gain"] == pytest.approx(po["released"] - po["public_only"], abs=1e-9)
        assert po["private_data_contributed"] == (lo > 0)
    for name in ("regressor", "cnn"):  # a model at chance is said so, in its section and the caveats (#23 item 4)
        tb = content["models"][name]["trivial_baseline"]
        assert (
            tb["metric"] in ("r2", "accuracy") and (tb["statement"] in content["privacy"]["caveats"]) == tb["no_better"]
        )
    for m in a["models"].values():  # what the audit could certify, and its verdict
        assert m["certifiable_epsilon"]["canaries"] > m["claimed_epsilon"] and m["canaries"]["ran"]
        assert m["control"]["kind"] == "noise mutant" and m["verdict"]["verdict"] in ("passed", "no verdict")
    html = run.read("report.html").decode()
    assert "Privacy audit (membership inference)" in html and "Utility from the private data" in html
    assert "One-run audit with gradient canaries" in html and "What this audit can certify" in html
    card = run.read("model_card_cnn.md").decode()
    assert "Privacy audit (membership inference)" in card and "Public pretraining" in card
    assert "models/cnn_public_only.safetensors" in run.manifest["artifacts"]


@pytest.mark.slow  # a DP run through explain and report: ~30 s alone, minutes on a loaded machine
def test_an_empirical_epsilon_above_the_claim_is_a_loud_caveat(dp_run):
    loaded = audit.load(dp_run[1].read)
    broken = copy.deepcopy({k: v for k, v in loaded.items() if k != "scores"})
    rec = broken["models"]["cnn"]
    rec["attacks"]["lira"]["empirical_epsilon"]["epsilon_lower_bound"] = rec["claimed_epsilon"] + 1.0
    caveats = audit_section(broken)["caveats"]
    assert any(c.startswith("PRIVACY AUDIT FAILED for the CNN classifier") for c in caveats)
    assert not any("FAILED" in c for c in audit_section(loaded)["caveats"])


def test_audit_stage_on_a_tiny_non_dp_run_round_trips(tmp_path):
    cfg = load_config(None, TRAIN + AUDIT + ["stages.workers=1"])  # in this process: its output is returned
    run = RunDir.create(tmp_path / "runs", config_toml=config_mod.to_toml(cfg), command=["test"], device="cpu")
    outputs = runner.run_stages(cfg, run, ["data", "train", "audit"])
    out, loaded = outputs["audit"], audit.load(run.read)
    assert loaded["models"] == json.loads(json.dumps(out["models"]))
    for name, rec in loaded["models"].items():
        assert not rec["dp"] and rec["claimed_epsilon"] is None
        assert rec["n_members"] == min(cfg.audit.n_eval, len(outputs["data"][rec_dataset(name)].y["test"]))
        np.testing.assert_array_equal(loaded["scores"][name]["target_lira"], out["scores"][name]["target_lira"])
        assert rec["shadows"]["n"] == cfg.audit.n_shadows and rec["control"]["n_members"] == cfg.audit.control_rows
        assert rec["shadows"]["audited_model_training"] == "central"
    # a federated model's audit says its shadows were trained centrally (a mismatch that can weaken LiRA)
    from pipeline.report.html_page import render_section

    said = "shadows are trained centrally"
    assert said not in render_section("audit", {"audit": audit_section(loaded)})
    federated = copy.deepcopy({k: v for k, v in loaded.items() if k != "scores"})
    for rec in federated["models"].values():
        rec["shadows"]["audited_model_training"] = "federated"
    assert said in render_section("audit", {"audit": audit_section(federated)})


def rec_dataset(name):
    from auditml_core.models import MODELS

    return MODELS[name].dataset


def test_the_report_says_when_no_audit_ran():
    section = audit_section(None)
    assert not section["ran"] and "No membership-inference audit" in section["caveats"][0]
    assert audit.run(load_config(None, ["audit.enabled=false"]), {}, seed=0)["enabled"] is False


def _dp_audit(tmp_path, overrides):
    cfg = load_config(None, overrides)
    run = RunDir.create(tmp_path / "runs", config_toml=config_mod.to_toml(cfg), command=["test"], device="cpu")
    runner.run_stages(cfg, run, ["data", "train", "audit"])
    return audit_section(audit.load(run.read))  # as recorded (the stage may have run in workers)


# ε = 1 and a few more DP epochs than tests.tiny: enough steps for 1000 canaries to refute ε = 1 when it is false
DP_AUDIT = (
    TRAIN
    + AUDIT
    + [
        "dp.enabled=true",
        "dp.target_epsilon=1",
        "regressor.dp_fit.epochs=10",
        "cnn.dp_fit.epochs=4",
        "dp.reproducible_noise=true",  # deterministic: with secret noise each 95% bound may miss in 5% of runs
    ]
)


@pytest.mark.slow  # two tiny DP pipelines (train + audit): ~1 min alone
def test_the_audit_catches_its_noise_mutant_and_a_noise_bug_makes_it_say_failed(tmp_path, monkeypatch):
    honest = _dp_audit(tmp_path / "honest", DP_AUDIT)
    for m in honest["models"].values():
        claimed = m["claimed_epsilon"]
        assert m["canaries"]["ran"] and m["certifiable_epsilon"]["canaries"] > claimed  # it could refute ε = 1...
        assert m["canaries"]["epsilon_lower_bound"] <= claimed  # ...and does not refute the honest training
        assert m["control"]["kind"] == "noise mutant" and m["control"]["canaries"]["epsilon_lower_bound"] > claimed
        assert m["verdict"]["verdict"] == "passed", m["verdict"]
    assert not any("FAILED" in c for c in honest["caveats"])

    from auditml_core.privacy import dp_sgd

    real = dp_sgd._add_noise_at_once

    def noise_bug(optimizer):  # DP-SGD adding a tenth of its noise while the accountant records σ
        real(optimizer)
        for p in optimizer.params:
            s = p.summed_grad.view_as(p)
            p.grad = s + 0.1 * (p.grad - s)

    monkeypatch.setattr(dp_sgd, "_add_noise_at_once", noise_bug)
    broken = _dp_audit(tmp_path / "broken", DP_AUDIT)
    for name, m in broken["models"].items():
        assert m["claimed_epsilon"] <= 1.0  # the record still says ε <= 1
        assert m["verdict"]["verdict"] == "FAILED" and "canaries" in m["verdict"]["statement"], m["verdict"]
        assert any(c.startswith(f"PRIVACY AUDIT FAILED for the {m['title']}") for c in broken["caveats"])
