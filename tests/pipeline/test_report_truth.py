"""Statements of the report checked against something the report did not compute itself.

Every test here failed before the fix it guards: a subgroup interval that excluded its own
estimate, an ε nobody recomputed, audit artifacts missing from "not covered", a caveat count
that named the wrong sections.
"""

import json
import re
from types import SimpleNamespace

import numpy as np
import pytest

from auditml_core import config as config_mod
from auditml_core.config import load_config
from auditml_core.models import MODELS
from auditml_core.privacy.second_accountant import check_epsilon
from pipeline import report, runner
from pipeline.evaluate import N_BOOTSTRAP, subgroup_metrics
from pipeline.report.privacy import independent_check, privacy_section
from pipeline.rundir import RunDir
from tests.tiny import AUDIT, DISTILL, EXPLAIN, TRAIN

HISTORY = [[1.1, 0.1, 300]]  # (σ, q, steps): PLD ε ≈ 10.4, RDP ε ≈ 11.5 at δ = 1e-5; a few seconds to recompute


def _trained(record):
    models = {
        name: SimpleNamespace(training={"privacy": record, "n_train": 300} if record else {"n_train": 300})
        for name in MODELS
    }
    return SimpleNamespace(models=models)


def _record(epsilon, history=HISTORY):
    return {
        "epsilon": epsilon,
        "delta": 1e-5,
        "target_epsilon": 3.0,
        "noise_multiplier": history[0][0],
        "max_grad_norm": 1.0,
        "sample_rate": history[0][1],
        "total_steps": sum(h[2] for h in history),
        "accountant_history": history,
        "accountant": "prv",
        "opacus_version": "1.6.0",
        "noise_source": "os-csprng",
    }


# --------------------------------------------------------------------------- subgroup intervals


def test_subgroup_mae_interval_is_the_bootstrap_of_that_group():
    """Each group's MAE interval is the percentile bootstrap of that group's rows (a per-resample loop agrees)."""
    from auditml_core.data import Dataset

    rng = np.random.default_rng(0)
    n = 90
    sex = rng.choice([-0.04, 0.05], size=n)
    x = np.column_stack([sex, rng.normal(size=n)]).astype(np.float32)
    ds = Dataset(
        name="tabular",
        task="regression",
        x={"test": x},
        y={"test": np.zeros(n, dtype=np.float32)},
        index={"test": np.arange(n)},
        feature_names=("sex", "age"),
        preprocessing={"x_mean": [0.0, 0.0], "x_std": [1.0, 1.0], "y_mean": 0.0, "y_std": 1.0},
    )
    y = rng.normal(size=n) * 50 + 150
    pred = y + rng.normal(size=n) * 30  # errors vary within every group
    out = subgroup_metrics(ds, "test", y, pred, seed=7)
    for feat, g in out.items():
        for group in g["groups"]:
            lo, hi = group["mae_ci95"]
            assert hi - lo > 1.0, f"{feat} {group['group']}: a degenerate interval [{lo}, {hi}] for varying errors"
            assert lo <= group["mae"] <= hi
    # an independent loop over the same resamples
    mask = np.isclose(sex, -0.04)
    err = np.abs(y[mask] - pred[mask])
    idx = np.random.default_rng(7).integers(0, len(err), size=(N_BOOTSTRAP, len(err)))
    expect = np.percentile(err[idx].mean(axis=1), [2.5, 97.5])
    got = next(gr for gr in out["sex"]["groups"] if gr["group"] == "sex = -0.04")["mae_ci95"]
    np.testing.assert_allclose(got, expect, rtol=1e-12)


# --------------------------------------------------------------------------- independent ε


def test_privacy_section_recomputes_every_epsilon_with_dp_accounting():
    # n = 300 (the records' n_train), batch 30, 30 epochs: the check derives q = 0.1 and 300 steps, as HISTORY
    schedule = [f"{m}.dp_fit.{k}=30" for m in MODELS for k in ("batch_size", "epochs")]
    cfg = load_config(None, ["dp.enabled=true", *schedule])
    ref = check_epsilon(HISTORY, delta=1e-5, recorded_epsilon=0.0)
    honest = (ref.pld_epsilon + ref.rdp_epsilon) / 2  # between the tight PLD value and the RDP upper bound
    p = privacy_section(cfg, _trained(_record(honest)), {}, None)
    for name in MODELS:
        chk = p["independent_checks"][name]
        assert chk["available"] and chk["agrees"]
        (c,) = chk["checks"]
        assert c["pld_epsilon"] == pytest.approx(ref.pld_epsilon, rel=1e-9)
        assert c["rdp_epsilon"] == pytest.approx(ref.rdp_epsilon, rel=1e-9)
        assert c["pld_epsilon"] < c["recorded_epsilon"] < c["rdp_epsilon"]
    assert "independently recomputed by dp-accounting" in p["statement"] and "agrees" in p["statement"]
    assert sum("independent check of ε" in c and "(agrees)" in c for c in p["caveats"]) == len(MODELS)

    understated = privacy_section(cfg, _trained(_record(ref.pld_epsilon * 0.5)), {}, None)
    assert not understated["independent_checks"]["cnn"]["agrees"]
    assert "DISAGREES" in understated["statement"]
    assert any("DISAGREES" in c for c in understated["caveats"])

    # the replayed schedule is derived from n, batch and epochs: the record's own history is not needed ...
    no_history = privacy_section(cfg, _trained({**_record(honest), "accountant_history": None}), {}, None)
    assert no_history["independent_checks"]["cnn"]["agrees"]
    # ... but its σ is
    no_sigma = privacy_section(cfg, _trained({**_record(honest), "noise_multiplier": None}), {}, None)
    assert not no_sigma["independent_checks"]["cnn"]["available"]
    assert any("NOT independently checked" in c for c in no_sigma["caveats"])


def test_federated_records_are_checked_client_by_client():
    ref = check_epsilon(HISTORY, delta=1e-5, recorded_epsilon=0.0)
    good = (ref.pld_epsilon + ref.rdp_epsilon) / 2
    clients = {"0": _record(good), "1": _record(ref.pld_epsilon * 0.5)}  # client 1 understates its ε
    rec = {**_record(good), "accountant_history": None, "per_client": clients, "epsilon_per_client": {}}
    chk = independent_check(rec)
    assert chk["available"] and [c["who"] for c in chk["checks"]] == ["client 0", "client 1"]
    assert [c["agrees"] for c in chk["checks"]] == [True, False] and not chk["agrees"]


# --------------------------------------------------------------------------- an end-to-end DP run


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("truth")
    overrides = [
        *TRAIN,
        *EXPLAIN,
        *DISTILL,
        *AUDIT,
        "dp.enabled=true",
        "distill.transfer=private",
        "distill.student_dp=true",
    ]
    cfg = load_config(None, overrides)
    run = RunDir.create(folder / "runs", config_toml=config_mod.to_toml(cfg), command=["test"], device="cpu")
    runner.run_stages(cfg, run, ["data", "train", "evaluate", "explain", "distill", "audit", "report"])
    return run


@pytest.mark.slow  # a DP run through distill, audit and report: ~1 min alone, minutes on a loaded machine
def test_dp_report_states_independent_epsilon_checks_audit_coverage_and_caveat_sections(dp_run):
    content = json.loads(dp_run.read("report.json"))
    report.validate(content)
    html = dp_run.read("report.html").decode()
    p = content["privacy"]
    for name in MODELS:
        rec = json.loads(dp_run.read(f"models/{name}.json"))["training"]["privacy"]
        ours = check_epsilon(rec["accountant_history"], delta=rec["delta"], recorded_epsilon=rec["epsilon"])
        (c,) = p["independent_checks"][name]["checks"]
        assert c["recorded_epsilon"] == rec["epsilon"] and c["pld_epsilon"] == pytest.approx(ours.pld_epsilon)
        assert c["agrees"] == ours.agrees
    for name in MODELS:  # the students ran their own DP-SGD (student_dp): their ε is checked as well
        rec = json.loads(dp_run.read(f"students/{name}.json"))["record"]["training"]["privacy"]
        (c,) = p["independent_checks"][f"student {name}"]["checks"]
        assert c["recorded_epsilon"] == rec["epsilon"] and c["pld_epsilon"] <= c["rdp_epsilon"]
    assert html.count("Independent check of ε") == 2 * len(MODELS)
    for name in MODELS:  # the students' composed (ε, δ) is in the statement the summary shows, not only in caveats
        status = json.loads(dp_run.read(f"students/{name}.json"))["record"]["privacy"]
        assert status["guarantee"] == "composed"
        assert f"students/{name}.* composed (ε = " in content["summary"]["privacy"]
        assert ("OVER the budget" in content["summary"]["privacy"]) or not status["over_budget"]
    over = [n for n in MODELS if json.loads(dp_run.read(f"students/{n}.json"))["record"]["privacy"]["over_budget"]]
    verdict = next(v for v in content["summary"]["verdicts"] if v["area"] == "privacy-guarantee")
    assert verdict["status"] != "not applicable" and (verdict["status"] == "failed" or not over)  # #29: never hidden
    assert any(line.startswith("audit/*") for line in p["not_covered"])
    card = dp_run.read("model_card_cnn.md").decode()
    assert "students/regressor.* (student of the MLP regressor) own DP-SGD" not in card  # the other model's caveat
    assert "students/cnn.* (student of the CNN classifier) own DP-SGD" in card
    assert "audit/*" in card and "independently recomputed by dp-accounting" in card
    assert "caveat(s) are gathered under" in html and "<section id=not-covered>" in html
    tree = json.loads(dp_run.read("students/regressor.json"))["record"]["tree_student"]
    assert tree["privacy"]["guarantee"] == "inherited"  # transfer=private: the tree was fitted on public rows only
    assert any(line.startswith("students/regressor.json tree_student") for line in p["covered"])
    # student_dp: the students' own DP-SGD writes no training loss (#23 item 5), so nothing to list
    assert not any("students/regressor.json training history" in line for line in p["not_covered"])
    student = json.loads(dp_run.read("students/regressor.json"))["record"]["training"]
    assert student["privacy"] and all("train_loss" not in row for row in student["history"])
    assert any("students/cnn.json transfer_index" in line for line in p["not_covered"])
    n = len(p["caveats"]) + len(content["audit"]["caveats"]) + len(content["explanations"]["caveats"])
    assert content["summary"]["n_caveats"] == n == len(content["caveats"])


# --------------------------------------------------------------------------- the decision-tree student


@pytest.mark.parametrize("student_dp", [True, False])
def test_the_tree_student_of_a_dp_run_never_sees_a_private_row(student_dp):
    """Under DP the tree (fitted without DP) gets public rows and their jitter only; private rows sit far away here."""
    from auditml_core.data import Dataset
    from pipeline.distill import transfer_set, tree_rows

    rng = np.random.default_rng(1)
    x = {"train": rng.normal(size=(30, 3)) + 1000.0, "public": rng.normal(size=(10, 3))}  # private rows near 1000
    ds = Dataset(
        name="tabular",
        task="regression",
        x={k: v.astype(np.float32) for k, v in x.items()},
        y={k: np.zeros(len(v), dtype=np.float32) for k, v in x.items()},
        index={"train": np.arange(30), "public": np.arange(30, 40)},
        feature_names=("a", "b", "c"),
        preprocessing={},
    )
    cfg = load_config(
        None, ["dp.enabled=true", "distill.transfer=private", f"distill.student_dp={str(student_dp).lower()}"]
    )
    transfer = transfer_set(cfg, ds, seed=0)
    assert "train" in transfer.splits
    rows, status = tree_rows(cfg, ds, transfer, {"epsilon": 2.0, "delta": 1e-5})
    private = np.abs(transfer.x).max(axis=1) > 500
    np.testing.assert_array_equal(rows, ~private)
    assert rows.sum() == 10 * (1 + cfg.distill.synthetic_per_row) and status["guarantee"] == "inherited"
    every, none = tree_rows(load_config(None, []), ds, transfer_set(load_config(None, []), ds, seed=0), None)
    assert every.all() and none["guarantee"] == "none"


# --------------------------------------------------------------------------- audit and public-only wording


def _attack(n_non):
    return {
        "auc": 0.5,
        "auc_ci95": [0.4, 0.6],
        "n_members": n_non,
        "n_non_members": n_non,
        "tpr_at_fpr": [{"target_fpr": 0.01, "tpr": 0.0}, {"target_fpr": 0.001, "tpr": 0.0}],
        "empirical_epsilon": {"epsilon_lower_bound": 0.0, "optimistic_max_over_thresholds": 0.0, "method": "cp"},
    }


@pytest.mark.parametrize(("n_non", "below"), [(40, ["1%", "0.1%"]), (359, ["0.1%"]), (1000, [])])
def test_audit_resolution_caveat_names_every_fpr_below_one_over_n(n_non, below):
    from pipeline.report.audit import audit_section

    r = {
        "attacks": {"loss": _attack(n_non)},
        "control": {
            "attacks": {"loss": {**_attack(8), "auc": 0.9}},
            "description": "c",
            "train_loss": 0,
            "test_loss": 1,
        },
        "claimed_epsilon": None,
        "dp": False,
        "delta": None,
        "n_members": n_non,
        "n_non_members": n_non,
        "shadows": {},
    }
    caveats = [c for c in audit_section({"enabled": True, "models": {"cnn": r}})["caveats"] if "resolution" in c]
    if not below:
        assert caveats == []
        return
    (line,) = caveats
    for rate in below:  # every FPR under 1/n is named: at n = 40, FPR = 1% is no-false-positive too
        assert f"FPR = {rate}" in line or f" and {rate}" in line or f"{rate} and" in line


@pytest.mark.parametrize("n_non", [40, 2000])
def test_no_tpr_is_printed_at_an_fpr_the_non_members_cannot_resolve(n_non):
    # Reader study: "TPR 0.175 ... (DP bound 0.02) at FPR 0.001" with 40 non-members read as a DP breach.
    from html import unescape

    from auditml_core.privacy import mia
    from pipeline.report.audit import audit_section, tpr_rows
    from pipeline.report.html_page import render_section

    rng = np.random.default_rng(0)
    scores = np.r_[np.full(7, 5.0), rng.random(33) * 0.5, rng.random(n_non)]
    members = np.r_[np.ones(40, bool), np.zeros(n_non, bool)]
    attack = mia.attack_summary(scores, members, delta=1e-5, seed=0, epsilon=3.0, n_resamples=50)
    control = {"attacks": {"loss": attack, "lira": attack}, "kind": "overfit", "description": "c"}
    r = {
        "attacks": {"loss": attack, "lira": attack},
        "control": control | {"train_loss": 0.0, "test_loss": 1.0},
        "claimed_epsilon": 3.0,
        "dp": True,
        "delta": 1e-5,
        "n_members": 40,
        "n_non_members": n_non,
        "shadows": {"variant": "offline", "n": 2, "trained_by": "a", "epochs": 2, "training_data": "p", "dp": False},
        "certifiable_epsilon": {"membership_attacks": 1.6, "canaries": None},
    }
    section = audit_section({"enabled": True, "models": {"cnn": r}})
    row = section["models"]["cnn"]["attacks"][0]
    kinds = [t["kind"] for t in tpr_rows(row)]
    html = unescape(
        re.sub(r"<[^>]+>", "", str(render_section("audit", {"audit": section, "summary": {"verdicts": []}})))
    )
    bound_001 = f"{mia.dp_tpr_bound(0.001, epsilon=3.0, delta=1e-5):.3g}"
    if n_non == 40:
        assert kinds == ["unresolvable", "lowest"]
        assert "0.01, 0.001: not resolvable with 40 non-members" in html
        assert f"(DP bound at this FPR {bound_001})" not in html  # never a bound at an FPR 40 records cannot measure
        assert "≤ 1/40 = 0.025: 0.175" in html
        assert f"(DP bound at this FPR {mia.dp_tpr_bound(1 / 40, epsilon=3.0, delta=1e-5):.3g})" in html
    else:  # positive control of the wording: a resolvable FPR keeps its TPR and its bound
        assert kinds == ["at", "at"] and "0.001: 0.175" in html and f"(DP bound at this FPR {bound_001})" in html


def test_a_gain_that_is_not_measurable_is_not_stated_as_proof_of_no_contribution():
    from pipeline.report.audit import public_only_baseline

    metrics = {
        "cnn": {
            "test": {"accuracy": 0.978},
            "public_only": {
                "metric": "accuracy",
                "test": {"accuracy": 0.975},
                "private_gain": {"value": 0.003, "ci95": [-0.008, 0.014], "measurable": False},
            },
        }
    }
    po = public_only_baseline("cnn", metrics, {"epsilon": 3.0})
    assert not po["private_data_contributed"]
    assert "comes from the public data, not from the private records" not in po["statement"]
    assert "cannot be told apart" in po["statement"] and "as far as this test can show" in po["statement"]


def test_the_model_card_says_yes_for_user_level_dp_alone():
    from pipeline.report.model_card import dp_levels as _dp_levels

    assert _dp_levels({"privacy": None, "training": {"user_level_privacy": {"epsilon": 4.0}}}) == (
        "yes (user-level DP-FedAvg)"
    )
    assert _dp_levels({"privacy": {"epsilon": 1.0}, "training": {}}) == "yes (sample-level DP-SGD)"
    assert _dp_levels({"privacy": None, "training": {}}) == "no"


@pytest.mark.parametrize("secagg", [False, True])
def test_user_level_only_run_drops_dp_is_off_and_says_what_the_server_sees(secagg):
    """dp.enabled = false with client_dp on: 'DP is off, no guarantee for any artifact' contradicted the statement."""
    from auditml_core.config import ClientDPConfig
    from auditml_core.privacy.user_level import plan_user_dp, user_privacy_record
    from pipeline.report.privacy_federated import federated_privacy

    rec = user_privacy_record(
        plan_user_dp(ClientDPConfig(enabled=True, delta=1e-3), rounds=5, n_clients=10), completed_rounds=5
    )
    training = {"user_level_privacy": rec, "n_train": 300}
    if secagg:
        training["secure_aggregation"] = {"reconstruction_threshold": 3, "num_shares": 5, "clipping_range": 8.0}
    trained = SimpleNamespace(models={name: SimpleNamespace(training=dict(training)) for name in MODELS})
    cfg = load_config(None, ["train.mode=federated", "client_dp.enabled=true"])
    out = federated_privacy(privacy_section(cfg, trained, {}, None), cfg, trained)
    assert out["enabled"] and not any(c.startswith("DP is off") for c in out["caveats"])
    assert any(c.startswith("Sample-level DP is off") for c in out["caveats"])
    in_clear = "every client's update in the clear"
    assert (in_clear in out["statement"]) != secagg
    if secagg:
        assert "un-noised aggregate" in out["statement"] and "receives the un-noised individual" not in out["statement"]
    assert rec["independent_check"]["agrees"] and "DISAGREES" not in " ".join(out["caveats"])


def test_failed_and_refused_client_updates_reach_the_caveats():
    """The server logs failed nodes and budget refusals as warnings; the report used to drop them."""
    from pipeline.report.privacy_federated import federated_privacy

    rounds = [
        {"round": 1, "trained": [{}, {}], "refused": [], "failed": []},
        {"round": 2, "trained": [{}], "refused": [{"node_id": 3, "reason": "budget"}], "failed": [{"node_id": 4}]},
    ]
    training = {
        "n_train": 300,
        "completed_rounds": 2,
        "client_rounds": rounds,
        "failures": [{"round": 2, "node_id": 4}],
    }
    trained = SimpleNamespace(models={name: SimpleNamespace(training=dict(training)) for name in MODELS})
    cfg = load_config(None, ["train.mode=federated"])
    out = federated_privacy(privacy_section(cfg, trained, {}, None), cfg, trained)
    lines = [c for c in out["caveats"] if "failed and" in c]
    assert len(lines) == len(MODELS) and all("1 client update(s) failed and 1 were refused" in c for c in lines)


def test_a_failed_class_randomisation_of_abs_values_is_a_caveat():
    """The summary said 'FAILED for |values|' for the class check, and no caveat followed."""
    from pipeline.report.content import _quality_caveats

    check = {
        "method": "shap-deep",
        "spearman_signed": -0.2,
        "spearman_abs": 0.8,
        "input_only_spearman_abs": 0.85,
        "passed_signed": True,
        "passed_abs": False,
        "rule": "pass when |mean Spearman| < 0.5",
    }
    summary = {
        "exactness": "exact",
        "reference": None,
        "randomisation": {**check, "passed_abs": True},
        "class_randomisation": check,
        "agreement": {},
        "lime_fidelity": {},
        "stability": {},
        "faithfulness": {},
    }
    caveats = _quality_caveats("CNN classifier", summary, {"n_explained": 4})
    # the class swap is Sixt et al.'s random-logit test (#26 item 4), not Adebayo et al.'s data randomisation
    assert any("FAIL the random-logit check (Sixt et al. 2020" in c and "|attribution|" in c for c in caveats)


def test_the_train_split_role_claims_dp_only_when_dp_is_on():
    from pipeline.report.html_page import _split_role

    assert "DP protects" in _split_role("train", dp=True)
    assert "DP protects" not in _split_role("train", dp=False) and "no DP" in _split_role("train", dp=False)


def test_a_slice_that_would_make_the_reports_inputs_stale_is_refused_before_any_work():
    """`--stages evaluate,report` on a complete run marked explain stale, then crashed in the report (KeyError)."""
    from auditml_core.errors import RunDirError

    run = SimpleNamespace(stage_status=lambda name: "complete", path="RUN")
    with pytest.raises(RunDirError, match="'explain', which re-running 'evaluate' makes stale"):
        runner.check_inputs(run, ["evaluate", "report"])
    runner.check_inputs(run, ["report"])  # a re-render alone stays allowed
    runner.check_inputs(run, ["evaluate", "explain", "distill", "audit", "report"])


def test_composed_delta_not_below_one_over_n_is_a_caveat_and_teacher_onnx_is_listed():
    from pipeline.report.privacy_students import student_caveats, student_privacy

    record = {
        "privacy": {"guarantee": "composed", "epsilon": 5.0, "delta": 2e-2, "target_epsilon": 8.0},
        "onnx": {"teacher_file": "models/regressor.onnx", "student_file": "students/regressor.onnx"},
        "transfer": {"splits": ["public"]},
    }
    distill_out = {"regressor": {"record": record}}
    caveats = student_caveats(distill_out, {"regressor": 100})
    assert any("not below 1/n" in c and "n = 100" in c for c in caveats)
    assert not any("not below 1/n" in c for c in student_caveats(distill_out, {"regressor": 10}))  # 0.02 < 1/10
    covered, _ = student_privacy(distill_out)
    assert any(c.startswith("models/regressor.onnx:") and "not covered" in c for c in covered)
