"""The report's first screen: each verdict comes from a check the run computed, and turns "failed" when that check
fails (an over-budget composed student, a second accountant that disagrees, a model at chance, an audit that refutes
the claimed ε, subgroup intervals that do not overlap, attributions that fail the randomisation check, a report
without a manifest), and "not applicable" where the area does not apply."""

import copy
import itertools
import math
from types import SimpleNamespace

import numpy as np
import pytest

from auditml_core.privacy.mia import dp_tpr_bound
from pipeline.evaluate import classification_metrics
from pipeline.report.audit import _verdict as audit_verdict
from pipeline.report.audit import control_outcome, refuted_by
from pipeline.report.privacy import independent_check
from pipeline.report.utility import trivial_baseline
from pipeline.report.verdicts import AREAS, MAX_WORDS, STATUSES, verdicts

HISTORY = [[1.1, 0.01, 1000]]  # σ, sample rate, steps of a DP-SGD run: ε ≈ 1.52 at δ = 1e-5 (PLD)
DELTA = 1e-5


def _record(epsilon=None, target=3.0):
    """A DP record whose ε is what dp-accounting itself gives for HISTORY (so the second accountant agrees)."""
    rec = {"accountant_history": HISTORY, "delta": DELTA, "epsilon": 1.0, "target_epsilon": target}
    pld = independent_check(rec)["checks"][0]["pld_epsilon"]
    return {**rec, "epsilon": pld if epsilon is None else epsilon, "noise_source": "os-csprng"}


def _quality(passed_signed=True, passed_abs=True, deletion=0.2, random=0.4, exactness="exact", logit=None):
    """One model's explanation quality; ``logit``: (signed, abs) outcomes of the random-logit check, or None."""
    return {
        "primary": "shap-exact",
        "exactness": exactness,
        "randomisation": {"passed_signed": passed_signed, "passed_abs": passed_abs},
        "class_randomisation": None if logit is None else {"passed_signed": logit[0], "passed_abs": logit[1]},
        "faithfulness": {"shap-exact": {"deletion_auc": deletion, "random_deletion_auc": random}},
    }


def _audit_model(title, claimed, bound, control_bound):
    """An audit record judged by the audit's own verdict function (the report's 'audit flag')."""
    attack = {"attack": "LiRA", "auc": 0.6, "auc_ci95": [0.55, 0.65], "epsilon_lower_bound": bound, "tpr_at_fpr": []}
    control = {
        "kind": "noise mutant",
        "noise_factor": 0.1,
        "attacks": [{**attack, "epsilon_lower_bound": control_bound}],
    }
    m = {
        "title": title,
        "claimed_epsilon": claimed,
        "attacks": [attack],
        "canaries": {"ran": False},
        "control": control,
        "certifiable_epsilon": {"membership_attacks": 8.0, "canaries": None},
    }
    return m | {"verdict": audit_verdict(m)}


def good_dp_content():
    """A DP run in which every check holds."""
    rec = _record()
    groups = [
        {"group": "sex = 1", "n": 40, "mae": 40.0, "mae_ci95": [35.0, 46.0]},
        {"group": "sex = 2", "n": 40, "mae": 43.0, "mae_ci95": [37.0, 49.0]},
    ]
    tb = {"metric": "accuracy", "model": 0.9, "model_ci95": [0.86, 0.93], "trivial": 0.1, "no_better": False}
    return {
        "manifest_sha256": "ab" * 32,
        "privacy": {
            "enabled": True,
            "models": {"regressor": rec, "cnn": rec},
            "independent_checks": {"regressor": independent_check(rec), "cnn": independent_check(rec)},
        },
        "audit": {
            "ran": True,
            "models": {
                "regressor": _audit_model("MLP regressor", rec["epsilon"], 0.2, 9.0),
                "cnn": _audit_model("CNN classifier", rec["epsilon"], 0.3, 9.0),
            },
        },
        "models": {
            "regressor": {
                "title": "MLP regressor",
                "training": {"n_train": 300},
                "metrics": {"test": {"subgroups": {"sex": {"kind": "codes", "groups": groups}}}},
                "trivial_baseline": tb | {"metric": "r2", "model": 0.4, "model_ci95": [0.3, 0.5], "trivial": 0.0},
            },
            "cnn": {"title": "CNN classifier", "training": {"n_train": 1200}, "metrics": {}, "trivial_baseline": tb},
        },
        "explanations": {
            "models": {
                "regressor": {"title": "MLP regressor", "quality": _quality()},
                "cnn": {"title": "CNN classifier", "quality": _quality()},
            }
        },
        "reproducibility": {"git_commit": "0123abc", "artifacts": [{"path": "data/tabular.npz", "sha256": "cd" * 32}]},
        "distill": {"regressor": {"record": _student_record("regressor")}, "cnn": {"record": _student_record("cnn")}},
    }


def _student_record(name, metric=None, fidelity=None, chance=0.2):
    """The distill stage's fidelity record of a student: (value, interval) of its test metric and its fidelity."""
    if name == "cnn":
        metric, fidelity = metric or (0.95, [0.93, 0.97]), fidelity or (0.97, [0.95, 0.98])
        return {
            "student_accuracy": metric[0],
            "student_accuracy_ci95": metric[1],
            "top1_agreement": fidelity[0],
            "top1_agreement_ci95": fidelity[1],
            "top1_agreement_chance": chance,
            "student_confusion_matrix": (np.eye(10, dtype=int) * 30 + 1).tolist(),
        }
    metric, fidelity = metric or (0.4, [0.3, 0.5]), fidelity or (0.95, [0.92, 0.97])
    return {
        "student_r2": metric[0],
        "student_r2_ci95": metric[1],
        "student_fidelity_r2": fidelity[0],
        "student_fidelity_r2_ci95": fidelity[1],
    }


def by_area(content):
    out = verdicts(content)
    assert sorted(v["area"] for v in out) == sorted(a for a, _, _ in AREAS)
    for v in out:
        assert v["status"] in STATUSES and len(v["sentence"].split()) <= MAX_WORDS, v
    ranks = [STATUSES.index(v["status"]) for v in out]
    assert ranks == sorted(ranks)  # worst first
    return {v["area"]: v for v in out}


def test_every_area_holds_on_a_run_whose_checks_all_pass():
    v = by_area(good_dp_content())
    assert {a: x["status"] for a, x in v.items()} == {
        "privacy-guarantee": "holds",
        "privacy-audit": "holds",
        "utility": "holds",
        "subgroups": "holds with caveat",  # overlapping intervals never prove equal performance
        "explanations": "holds",
        "students": "holds",
        "provenance": "holds",
    }
    assert v["privacy-guarantee"]["numbers"][0]["value"] == pytest.approx(_record()["epsilon"])
    assert v["subgroups"]["evidence"] == "#subgroups-regressor"


def test_an_over_budget_composed_student_fails_the_privacy_guarantee():
    content = good_dp_content()
    student = {"guarantee": "composed", "epsilon": 5.2, "delta": 2e-5, "target_epsilon": 3.0, "over_budget": True}
    content["distill"] = {"cnn": {"record": {"privacy": student}}}
    v = by_area(content)["privacy-guarantee"]
    assert v["status"] == "failed" and "student of the CNN classifier" in v["sentence"] and "5.2" in v["sentence"]
    # null: the same student within its target is not a failure (its own DP-SGD check is missing: a caveat)
    content["distill"]["cnn"]["record"]["privacy"] = student | {"epsilon": 2.9, "over_budget": False}
    assert by_area(content)["privacy-guarantee"]["status"] == "holds with caveat"


def test_an_epsilon_the_second_accountant_disagrees_with_fails_and_one_over_target_fails():
    content = good_dp_content()
    low = _record(epsilon=0.5)  # the record understates what its own history spends
    content["privacy"]["models"]["cnn"] = low
    content["privacy"]["independent_checks"]["cnn"] = independent_check(low)
    assert not content["privacy"]["independent_checks"]["cnn"]["agrees"]
    v = by_area(content)["privacy-guarantee"]
    assert v["status"] == "failed" and "second accountant disagrees" in v["sentence"]
    over = good_dp_content()
    over["privacy"]["models"]["regressor"] = _record() | {"target_epsilon": 0.5}
    assert by_area(over)["privacy-guarantee"]["status"] == "failed"


def test_no_dp_is_not_applicable_and_says_nothing_bounds_leakage():
    content = good_dp_content()
    content["privacy"] = {"enabled": False, "models": {}}
    v = by_area(content)["privacy-guarantee"]
    assert v["status"] == "not applicable" and "nothing bounds" in v["sentence"] and v["numbers"] == []


def test_a_model_at_chance_fails_utility():
    content = good_dp_content()
    rng = np.random.default_rng(0)
    ds = SimpleNamespace(task="classification", y={"train": rng.integers(0, 10, 500), "test": rng.integers(0, 10, 300)})
    at_chance = {"cnn": {"test": {"accuracy": 0.11, "accuracy_ci95": [0.08, 0.15]}}}
    content["models"]["cnn"]["trivial_baseline"] = trivial_baseline("cnn", ds, at_chance)
    v = by_area(content)["utility"]
    assert v["status"] == "failed" and v["sentence"].startswith("The CNN classifier is no better than a trivial")
    assert verdicts(content)[0]["area"] == "utility"  # a failure is the first row
    better = {"cnn": {"test": {"accuracy": 0.9, "accuracy_ci95": [0.86, 0.93]}}}
    content["models"]["cnn"]["trivial_baseline"] = trivial_baseline("cnn", ds, better)
    assert by_area(content)["utility"]["status"] == "holds"


def _classifier(rng, collapse):
    """Test metrics (the evaluate stage's own function) of a 10-class classifier: with ``collapse``, it answers class 4
    for 84% of images and is right on classes 4, 7 and 9 only (the tiny CNN of the reader study: 302 of 359
    predictions one class, recall 0 on 7 of 10 classes); otherwise it is right on 90% of images of every class."""
    y = np.repeat(np.arange(10), 36)  # (360,)
    if collapse:
        pred = np.where(rng.random(360) < 0.84, 4, rng.choice([7, 9], 360))
        pred[y == 7] = np.where(rng.random(36) < 0.5, 7, 4)
    else:
        pred = np.where(rng.random(360) < 0.9, y, (y + 1) % 10)
    logits = np.eye(10)[pred]  # (360, 10)
    return y, classification_metrics(y, logits, tuple(str(i) for i in range(10)), seed=0)


def test_a_classifier_with_recall_0_on_most_classes_holds_only_with_a_caveat():
    # Reader study: the tiny CNN answered one class for 302 of 359 images (recall 0 on 7 of 10 classes) and the row
    # said "Every model beats a trivial predictor" (holds): its accuracy interval cleared the majority class.
    rng = np.random.default_rng(0)
    y, collapsed = _classifier(rng, collapse=True)
    ds = SimpleNamespace(task="classification", y={"train": np.repeat(np.arange(10), 50), "test": y})
    content = good_dp_content()
    content["models"]["cnn"]["metrics"] = {"test": collapsed}
    content["models"]["cnn"]["trivial_baseline"] = trivial_baseline("cnn", ds, {"cnn": {"test": collapsed}})
    assert not content["models"]["cnn"]["trivial_baseline"]["no_better"]  # it does beat the majority class
    zero = sum(1 for r in collapsed["per_class_recall"].values() if r == 0)
    assert zero >= 7
    v = by_area(content)["utility"]
    assert v["status"] == "holds with caveat"
    assert f"the CNN classifier has recall 0 on {zero} of 10 classes" in v["sentence"]
    top = int(np.asarray(collapsed["confusion_matrix"]).sum(axis=0).max())  # predictions of the commonest answer
    assert f"(one class takes {top} of {len(y)} predictions)" in v["sentence"]
    assert {"label": "classes with test recall 0, CNN classifier", "value": zero} == {
        k: v["numbers"][0][k] for k in ("label", "value")
    }  # the decisive number first: the first screen shows a row's first number
    # null: a good classifier (recall > 0 on every class) holds
    y, good = _classifier(rng, collapse=False)
    content["models"]["cnn"]["metrics"] = {"test": good}
    content["models"]["cnn"]["trivial_baseline"] = trivial_baseline("cnn", ds, {"cnn": {"test": good}})
    v = by_area(content)["utility"]
    assert v["status"] == "holds" and "recall 0" not in v["sentence"]
    # the recall caveat comes before a milder one (the Ridge baseline beating the MLP)
    content["models"]["cnn"]["metrics"] = {"test": collapsed}
    content["models"]["regressor"]["baseline"] = {"comparison": {"distinguishable": True, "better": "ridge"}}
    assert "recall 0" in by_area(content)["utility"]["sentence"]


def test_an_audit_that_refutes_the_claimed_epsilon_fails_and_one_without_power_is_a_caveat():
    content = good_dp_content()
    claimed = content["privacy"]["models"]["cnn"]["epsilon"]
    content["audit"]["models"]["cnn"] = _audit_model("CNN classifier", claimed, claimed + 1.0, 9.0)
    assert content["audit"]["models"]["cnn"]["verdict"]["verdict"] == "FAILED"
    v = by_area(content)["privacy-audit"]
    assert v["status"] == "failed" and "refutes the claimed ε of the CNN classifier" in v["sentence"]
    content["audit"]["models"]["cnn"] = _audit_model("CNN classifier", claimed, 0.1, 0.0)  # control not caught
    assert by_area(content)["privacy-audit"]["status"] == "holds with caveat"
    content["audit"] = {"ran": False, "models": {}}
    assert by_area(content)["privacy-audit"]["status"] == "not applicable"


def test_a_failed_audit_names_what_refuted_the_claim():
    """The sentence says what contradicted ε: an attack's bound, or the canaries alone (not always 'an attack')."""
    content = good_dp_content()
    claimed = content["privacy"]["models"]["cnn"]["epsilon"]
    content["audit"]["models"]["cnn"] = _audit_model("CNN classifier", claimed, claimed + 1.0, 9.0)
    assert by_area(content)["privacy-audit"]["sentence"].endswith(": LiRA contradicts it.")
    m = _audit_model("CNN classifier", claimed, 0.1, 9.0)  # the attack's bound is below the claim ...
    m["canaries"] = {"ran": True, "epsilon_lower_bound": claimed + 2.0}  # ... the canaries refute it
    m["verdict"] = audit_verdict(m)
    content["audit"]["models"]["cnn"] = m
    v = by_area(content)["privacy-audit"]
    assert v["status"] == "failed" and v["sentence"].endswith(": the canaries contradict it."), v["sentence"]
    assert "ε lower bound exceeds" not in v["sentence"]


def test_a_model_without_dp_beside_a_dp_model_is_judged_on_its_own_attacks():
    """Another model's guarantee does not cover this one: its attacks above chance fail the audit."""
    content = good_dp_content()
    content["audit"]["models"]["regressor"] = non_dp_content()["audit"]["models"]["regressor"]  # AUC [0.55, 0.65]
    assert content["audit"]["models"]["regressor"]["verdict"]["verdict"] == "no DP claim"
    v = by_area(content)["privacy-audit"]
    assert v["status"] == "failed" and "better than chance" in v["sentence"], v["sentence"]


def _overfit_control(m, auc=0.9, ci=(0.7, 1.0), bound=0.5):
    """The non-DP positive control (an overfit copy) with one attack's AUC, interval and ε lower bound."""
    attack = {"attack": "loss", "auc": auc, "auc_ci95": list(ci), "epsilon_lower_bound": bound, "tpr_at_fpr": []}
    m["control"] = {"kind": "overfit", "attacks": [attack, attack | {"attack": "lira"}]}
    m["verdict"] = audit_verdict(m)
    return m


def non_dp_content():
    """good_dp_content without DP: no claimed ε, an overfit positive control the attacks catch."""
    content = good_dp_content()
    content["privacy"] = {"enabled": False, "models": {}}  # a run without DP: nothing bounds the leakage
    for m in content["audit"]["models"].values():
        m["claimed_epsilon"] = None
        _overfit_control(m)
    return content


def test_without_a_dp_claim_an_attack_above_chance_fails_the_audit():
    content = non_dp_content()
    assert by_area(content)["privacy-audit"]["status"] == "failed"  # AUC interval [0.55, 0.65] lies above 0.5
    for m in content["audit"]["models"].values():
        m["attacks"][0].update(auc_ci95=[0.45, 0.65], epsilon_lower_bound=0.0)
    v = by_area(content)["privacy-audit"]
    assert v["status"] == "holds with caveat" and "no DP claim" in v["sentence"]
    # A positive ε lower bound is evidence too, although the AUC interval includes 0.5.
    content["audit"]["models"]["cnn"]["attacks"][0]["epsilon_lower_bound"] = 0.4
    v = by_area(content)["privacy-audit"]
    assert v["status"] == "failed" and "ε lower bound 0.4 > 0" in v["sentence"]
    # the first number is that evidence, for the model the sentence names (a default run led with the other model's)
    assert v["numbers"][0]["label"] == "LiRA attack AUC, CNN classifier" and v["numbers"][0]["unit"].startswith(
        "ε ≥ 0.4"
    )
    assert all(not n["label"].endswith(", CNN classifier") for n in v["numbers"][1:])


def test_a_positive_control_caught_without_evidence_is_not_caught_and_leads_the_audit_verdict():
    # A tiny non-DP run (n_eval 40): the overfit control scored AUC 0.719 [0.374, 0.946] with an ε bound of 0 and
    # was counted as caught (point AUC > 0.6); the row said "No attack told training records from others better
    # than chance" while the audit had no power at all.
    content = non_dp_content()
    for m in content["audit"]["models"].values():
        m["attacks"][0].update(auc_ci95=[0.45, 0.65], epsilon_lower_bound=0.0)
    _overfit_control(content["audit"]["models"]["cnn"], auc=0.719, ci=(0.374, 0.946), bound=0.0)
    cnn = content["audit"]["models"]["cnn"]
    assert not control_outcome(cnn)["caught"]
    v = by_area(content)["privacy-audit"]
    assert v["status"] == "holds with caveat"
    assert (
        v["sentence"].startswith("The audit could not catch its own planted leak") and "CNN classifier" in v["sentence"]
    )
    assert "means nothing" in v["sentence"] and "MLP regressor" not in v["sentence"]
    assert v["numbers"][0]["label"] == "control's attack AUC, CNN classifier"
    assert v["numbers"][0]["interval"] == [0.374, 0.946]
    assert cnn["verdict"]["statement"].startswith("The audit could not catch its own planted leak")
    # positive control: the same control with an interval above 0.5 (or a positive ε bound) is caught
    _overfit_control(cnn, auc=0.719, ci=(0.52, 0.946), bound=0.0)
    assert control_outcome(cnn)["caught"] and control_outcome(cnn)["by"] == ["loss", "lira"]
    v = by_area(content)["privacy-audit"]
    assert v["status"] == "holds with caveat" and v["sentence"].startswith("No attack beat chance on evidence")
    _overfit_control(cnn, auc=0.6, ci=(0.45, 0.8), bound=0.3)
    assert control_outcome(cnn)["caught"]


def test_a_dp_audit_that_missed_its_control_never_holds_whatever_the_control():
    content = good_dp_content()
    claimed = content["privacy"]["models"]["cnn"]["epsilon"]
    content["audit"]["models"]["cnn"] = _audit_model("CNN classifier", claimed, 0.1, 0.0)  # noise mutant not caught
    v = by_area(content)["privacy-audit"]
    assert v["status"] == "holds with caveat" and v["sentence"].startswith("The audit could not catch its own")
    assert content["audit"]["models"]["cnn"]["verdict"]["statement"].startswith("The audit could not catch its own")
    assert v["numbers"][0]["label"] == "control's ε bound, CNN classifier"
    # A federated DP model's control is the overfit copy: not caught, the audit used to say "passed" (holds).
    m = _overfit_control(_audit_model("CNN classifier", claimed, 0.1, 0.0), auc=0.7, ci=(0.4, 0.9), bound=0.0)
    content["audit"]["models"]["cnn"] = m
    assert m["verdict"]["verdict"] == "no verdict"
    assert by_area(content)["privacy-audit"]["status"] == "holds with caveat"
    content["audit"]["models"]["cnn"] = _overfit_control(m)  # caught: the audit passes
    assert m["verdict"]["verdict"] == "passed" and by_area(content)["privacy-audit"]["status"] == "holds"


def test_a_student_no_better_than_trivial_or_its_teacher_fails_and_a_loose_one_is_a_caveat():
    # Reader study: the regressor's student had test R² -0.30 and fidelity R² -3.4, the DP CNN's student accuracy
    # 0.067 below the trivial 0.1, and no verdict said so.
    content = good_dp_content()
    content["distill"]["regressor"]["record"] = _student_record(
        "regressor", metric=(-0.30, [-0.5, -0.1]), fidelity=(-3.4, [-4.6, -2.5])
    )
    v = by_area(content)["students"]
    assert v["status"] == "failed" and v["evidence"] == "#distill"
    assert v["sentence"] == (
        "The student of the MLP regressor is no better than a trivial predictor: test R² -0.3 [-0.5, -0.1] vs 0; "
        "1 more check fails."  # its fidelity R² -3.4
    )
    assert verdicts(content)[0]["area"] == "students"  # a failure is the first row
    content["distill"]["regressor"]["record"] = _student_record("regressor", fidelity=(-3.4, [-4.6, -2.5]))
    assert by_area(content)["students"]["sentence"].startswith("The student of the MLP regressor does not track its")
    content = good_dp_content()
    content["distill"]["cnn"]["record"] = _student_record("cnn", metric=(0.067, [0.045, 0.092]))
    v = by_area(content)["students"]
    assert v["status"] == "failed" and "student of the CNN classifier is no better than a trivial" in v["sentence"]
    # agreement no better than two independent predictors with the same answer frequencies: failed
    content["distill"]["cnn"]["record"] = _student_record("cnn", fidelity=(0.7, [0.62, 0.78]), chance=0.7)
    assert by_area(content)["students"]["status"] == "failed"
    # a student that beats both but follows its teacher loosely (below 0.9): a caveat that names the rule
    content["distill"]["cnn"]["record"] = _student_record("cnn", fidelity=(0.8, [0.75, 0.85]), chance=0.1)
    v = by_area(content)["students"]
    assert v["status"] == "holds with caveat" and "loosely (top-1 agreement 0.8 < 0.9)" in v["sentence"]
    # null: good students hold; without the distill stage the area does not apply
    assert by_area(good_dp_content())["students"]["status"] == "holds"
    del content["distill"]
    assert by_area(content)["students"]["status"] == "not applicable"


def test_every_student_failure_is_counted_within_the_word_budget():
    bad_metric = {"cnn": (0.067, [0.045, 0.1003]), "regressor": (-0.535, [-1.08, -0.224])}
    bad_fidelity = {"cnn": (0.231, [0.189, 0.276]), "regressor": (-17.5, [-27.9, -12.0])}
    for a in itertools.product([False, True], repeat=4):
        content = good_dp_content()
        for i, name in enumerate(("regressor", "cnn")):
            content["distill"][name]["record"] = _student_record(
                name,
                metric=bad_metric[name] if a[2 * i] else None,
                fidelity=bad_fidelity[name] if a[2 * i + 1] else None,
                chance=0.238,
            )
        v = by_area(content)["students"]  # checks the word budget
        n = sum(a)
        assert v["status"] == ("failed" if n else "holds"), a
        assert (f"; {n - 1} more check" in v["sentence"]) == (n > 1), (a, v["sentence"])


def test_subgroup_intervals_that_do_not_overlap_fail_and_no_group_column_is_not_applicable():
    content = good_dp_content()
    groups = content["models"]["regressor"]["metrics"]["test"]["subgroups"]["sex"]["groups"]
    groups[1].update(mae=70.0, mae_ci95=[60.0, 80.0])
    v = by_area(content)["subgroups"]
    assert v["status"] == "failed" and "by sex" in v["sentence"] and v["numbers"][0]["value"] == pytest.approx(30.0)
    assert v["sentence"].startswith("The MLP regressor's test MAE differs by sex") and v["numbers"][0]["label"] == (
        "MAE gap by sex, MLP regressor"
    )
    # a classifier's group metric reads as people write it ("accuracy", not "ACCURACY")
    cnn_groups = {
        "groups": [{"accuracy": 0.95, "accuracy_ci95": [0.9, 0.99]}, {"accuracy": 0.5, "accuracy_ci95": [0.4, 0.6]}]
    }
    content["models"]["regressor"]["metrics"] = {"test": {}}
    content["models"]["cnn"]["metrics"] = {"test": {"subgroups": {"site": cnn_groups}}}
    v = by_area(content)["subgroups"]
    assert v["status"] == "failed" and "test accuracy differs by site" in v["sentence"], v["sentence"]
    content["models"]["cnn"]["metrics"] = {"test": {}}
    assert by_area(content)["subgroups"]["status"] == "not applicable"


def test_explanations_fail_the_randomisation_or_deletion_check_and_approximate_values_are_a_caveat():
    for quality, status in (
        (_quality(passed_signed=False), "failed"),
        (_quality(deletion=0.5, random=0.4), "failed"),
        (_quality(passed_abs=False), "holds with caveat"),
        (_quality(exactness="approximate"), "holds with caveat"),
    ):
        content = good_dp_content()
        content["explanations"]["models"]["cnn"]["quality"] = quality
        assert by_area(content)["explanations"]["status"] == status, quality


def test_the_explanation_row_names_every_failed_check_and_counts_the_rest():
    # Reader study: the CNN failed |value| model randomisation AND the random-logit check (Sixt et al.); the row
    # named only the first, and the random-logit failure was left to a table and the caveats.
    content = good_dp_content()
    content["explanations"]["models"]["cnn"]["quality"] = _quality(passed_abs=False, logit=(True, False))
    v = by_area(content)["explanations"]
    assert v["status"] == "holds with caveat"
    assert v["sentence"] == (
        "The CNN classifier fails |value| model randomisation and |value| random-logit; 6 of 8 checks pass."
    )
    assert [(n["label"], n["value"], n["unit"]) for n in v["numbers"]] == [
        ("checks passed, CNN classifier", 3, "of 5"),  # the failing model's first
        ("checks passed, MLP regressor", 3, "of 3"),
    ]
    # null: every check passes, SHAP exact: holds, and the sentence names each kind of check
    content["explanations"]["models"]["cnn"]["quality"] = _quality(logit=(True, True))
    v = by_area(content)["explanations"]
    assert v["status"] == "holds" and "all 8 checks (model randomisation, random-logit and deletion)" in v["sentence"]
    # a random-logit failure alone is a caveat named in the sentence; a signed model-randomisation failure fails
    content["explanations"]["models"]["cnn"]["quality"] = _quality(logit=(False, False))
    v = by_area(content)["explanations"]
    assert v["status"] == "holds with caveat" and "fails random-logit;" in v["sentence"]
    content["explanations"]["models"]["regressor"]["quality"] = _quality(passed_signed=False, deletion=0.5)
    v = by_area(content)["explanations"]
    assert v["status"] == "failed" and v["sentence"].startswith(
        "The MLP regressor fails signed model randomisation and deletion; the CNN classifier fails random-logit;"
    )


def test_every_combination_of_check_outcomes_is_said_within_the_word_budget():
    for a in itertools.product([True, False], repeat=9):  # 8 checks' outcomes and the regressor's exactness
        content = good_dp_content()
        content["explanations"]["models"]["regressor"]["quality"] = _quality(
            a[0], a[1], deletion=0.2 if a[2] else 0.5, exactness="exact" if a[8] else "approximate"
        )
        content["explanations"]["models"]["cnn"]["quality"] = _quality(
            a[3], a[4], deletion=0.2 if a[5] else 0.5, logit=(a[6], a[7]), exactness="approximate"
        )
        v = by_area(content)["explanations"]  # checks the word budget
        failed = {i for i in range(8) if not a[i]}
        severe = failed & {0, 2, 3, 5}  # signed model randomisation or the deletion test
        assert v["status"] == ("failed" if severe else "holds with caveat"), a
        assert not failed or v["sentence"].endswith(f"; {8 - len(failed)} of 8 checks pass."), a


def test_provenance_fails_without_a_manifest_and_a_dirty_commit_is_a_caveat():
    content = good_dp_content()
    dirty = copy.deepcopy(content)
    dirty["reproducibility"]["git_commit"] = "0123abc-dirty"
    assert by_area(dirty)["provenance"]["status"] == "holds with caveat"
    content["manifest_sha256"] = None
    content["reproducibility"]["artifacts"] = []
    v = by_area(content)["provenance"]
    assert v["status"] == "failed" and "without a run manifest" in v["sentence"]


def test_user_level_dp_is_judged_on_its_own_epsilon_and_the_record_level_audit_never_passes_or_fails_it():
    content = good_dp_content()
    content["privacy"] = {"enabled": True, "models": {}, "independent_checks": {}}
    check = {"agrees": True, "pld_epsilon": 2.9, "rdp_epsilon": 3.1}
    for m in content["models"].values():
        m["training"]["user_level_privacy"] = {"epsilon": 2.95, "delta": 1e-3, "target_epsilon": 3.0} | {
            "independent_check": check
        }
    for m in content["audit"]["models"].values():  # the audit attacks single records: it records no claimed ε
        m["claimed_epsilon"] = None
        _overfit_control(m)  # a federated model's control is the overfit copy
        m["verdict"] = audit_verdict(m, 2.95)
        assert m["verdict"]["verdict"] == "no record-level claim" and "no DP claim" not in m["verdict"]["statement"]
        assert "user level (ε = 2.95 per client)" in m["verdict"]["statement"]
    v = by_area(content)
    assert v["privacy-guarantee"]["status"] == "holds" and "per client" in v["privacy-guarantee"]["sentence"]
    audit = v["privacy-audit"]
    assert audit["status"] == "holds with caveat" and "tests no stated ε" in audit["sentence"]
    assert "no DP" not in audit["sentence"]  # there is DP in this run: never say nothing bounds the leakage
    for m in content["models"].values():
        m["training"]["user_level_privacy"]["independent_check"] = check | {"agrees": False}
    assert by_area(content)["privacy-guarantee"]["status"] == "failed"


# --------------------------------------------------------------------------- branches the review found undriven


def test_seeded_noise_holds_only_with_the_caveat_that_the_seed_must_stay_secret():
    # dp.reproducible_noise = true: the run directory records the seed the noise came from, so the guarantee holds
    # only while that seed stays secret (the privacy section's wording); the row must never say "holds".
    content = good_dp_content()
    rec = content["privacy"]["models"]["regressor"] | {"noise_source": "seeded"}
    content["privacy"]["models"]["regressor"] = rec
    v = by_area(content)["privacy-guarantee"]
    assert v["status"] == "holds with caveat"
    assert v["sentence"] == (
        "Every stated ε is within its target, but the MLP regressor's noise is seeded: DP holds only while the seed "
        "stays secret."
    )
    assert rec["epsilon"] <= rec["target_epsilon"]  # "within its target" is true of this input
    assert v["numbers"][0] == {
        "label": "ε, MLP regressor",
        "value": pytest.approx(rec["epsilon"]),
        "interval": None,
        "unit": "target 3, δ = 1e-05",
    }
    # a record from before noise_source was kept came from seeded generators: read as seeded, as the privacy section
    content["privacy"]["models"]["regressor"] = {k: x for k, x in rec.items() if k != "noise_source"}
    assert "noise is seeded" in by_area(content)["privacy-guarantee"]["sentence"]
    # control: the same record with OS-CSPRNG noise holds
    content["privacy"]["models"]["regressor"] = rec | {"noise_source": "os-csprng"}
    assert by_area(content)["privacy-guarantee"]["status"] == "holds"


def test_delta_not_below_one_over_n_never_holds():
    # δ = 1e-5 and n = 100,000 training records: δ = 1/n exactly, which permits leaking whole records.
    n = 100_000
    assert DELTA >= 1.0 / n  # the fact the row states, checked on the input
    content = good_dp_content()
    content["models"]["regressor"]["training"]["n_train"] = n
    v = by_area(content)["privacy-guarantee"]
    assert v["status"] == "holds with caveat"
    assert v["sentence"] == "Every stated ε is within its target, but δ of the MLP regressor is not below 1/n."
    assert v["numbers"][0]["label"] == "ε, MLP regressor" and v["numbers"][0]["unit"].endswith("δ = 1e-05")
    # control: one record fewer puts δ below 1/n
    assert DELTA < 1.0 / (n - 1)
    content["models"]["regressor"]["training"]["n_train"] = n - 1
    assert by_area(content)["privacy-guarantee"]["status"] == "holds"
    # n from the data section when the training record has none (a record from before n_train was kept)
    del content["models"]["regressor"]["training"]["n_train"]
    content["data"] = {"tabular": {"sizes": {"train": n}}}
    assert by_area(content)["privacy-guarantee"]["sentence"].endswith("δ of the MLP regressor is not below 1/n.")
    content["data"]["tabular"]["sizes"]["train"] = n - 1
    assert by_area(content)["privacy-guarantee"]["status"] == "holds"


def test_a_student_without_a_dp_guarantee_beside_a_dp_teacher_is_a_caveat():
    content = good_dp_content()
    content["distill"]["cnn"]["record"]["privacy"] = {"guarantee": "none", "reason": "read private rows without DP"}
    v = by_area(content)["privacy-guarantee"]
    assert v["status"] == "holds with caveat"
    assert v["sentence"] == (
        "Every stated ε is within its target, but the student of the CNN classifier has no DP guarantee."
    )
    # control: a student that inherits its teacher's guarantee (post-processing) holds
    content["distill"]["cnn"]["record"]["privacy"] = {"guarantee": "inherited", "epsilon": 1.0, "delta": DELTA}
    assert by_area(content)["privacy-guarantee"]["status"] == "holds"


def _tpr_row(claimed, tpr_ci95, *, fpr_ci95=(0.002, 0.03), target_fpr=0.01):
    """A TPR-at-low-FPR row as the audit records it, with its DP bound and whether the TPR's lower end exceeds it."""
    bound = dp_tpr_bound(fpr_ci95[1], epsilon=claimed, delta=DELTA)
    # the bound by hand (Kairouz et al.'s region): what the verdict's "contradicts" rests on
    by_hand = min(1.0, math.exp(claimed) * fpr_ci95[1] + DELTA, 1 - math.exp(-claimed) * (1 - DELTA - fpr_ci95[1]))
    assert bound == pytest.approx(by_hand, rel=1e-12)
    return {
        "target_fpr": target_fpr,
        "fpr": target_fpr,
        "fpr_ci95": list(fpr_ci95),
        "tpr": sum(tpr_ci95) / 2,
        "tpr_ci95": list(tpr_ci95),
        "resolution_limited": False,
        "dp_bound": dp_tpr_bound(target_fpr, epsilon=claimed, delta=DELTA),
        "dp_bound_at_fpr_upper": bound,
        "exceeds_dp_bound": tpr_ci95[0] > bound,
    }


def test_a_failed_audit_through_a_tpr_above_the_dp_bound_names_the_tpr():
    content = good_dp_content()
    claimed = content["privacy"]["models"]["cnn"]["epsilon"]  # ≈ 1.52: TPR ≤ e^ε·0.03 + δ ≈ 0.137 at FPR ≤ 0.03
    m = _audit_model("CNN classifier", claimed, 0.3, 9.0)  # the attack's ε bound 0.3 is below the claim
    m["attacks"][0]["tpr_at_fpr"] = [_tpr_row(claimed, (0.4, 0.6))]  # TPR ≥ 0.4 at FPR ≤ 0.03
    assert m["attacks"][0]["tpr_at_fpr"][0]["exceeds_dp_bound"]
    m["verdict"] = audit_verdict(m)
    assert m["verdict"]["verdict"] == "FAILED" and refuted_by(m) == ["LiRA (TPR above the DP bound)"]
    content["audit"]["models"]["cnn"] = m
    v = by_area(content)["privacy-audit"]
    assert v["status"] == "failed"
    assert v["sentence"] == (
        "The audit refutes the claimed ε of the CNN classifier: LiRA (TPR above the DP bound) contradicts it."
    )
    # the first number is what refuted the claim: the TPR beside its DP bound (the attack's ε bound, 0.3, is below
    # the claim and refutes nothing)
    row = m["attacks"][0]["tpr_at_fpr"][0]
    assert v["numbers"][0] == {
        "label": "TPR at FPR ≤ 0.03, CNN classifier",
        "value": row["tpr"],
        "interval": [0.4, 0.6],
        "unit": f"DP bound {row['dp_bound_at_fpr_upper']:.3g}",
    }
    assert row["tpr_ci95"][0] > row["dp_bound_at_fpr_upper"]  # the figure shows the refutation
    # the same refutation through the TPR at the lowest FPR n non-members resolve (1/n)
    m["attacks"][0]["tpr_at_fpr"] = [_tpr_row(claimed, (0.01, 0.05)) | {"resolution_limited": True}]
    m["attacks"][0]["tpr_at_lowest_resolvable_fpr"] = _tpr_row(claimed, (0.4, 0.6), target_fpr=0.025)
    m["verdict"] = audit_verdict(m)
    assert by_area(content)["privacy-audit"]["sentence"].endswith(": LiRA (TPR above the DP bound) contradicts it.")
    # control: a TPR whose lower end stays under the DP bound refutes nothing; the audit passes
    m["attacks"][0]["tpr_at_fpr"] = [_tpr_row(claimed, (0.1, 0.2))]
    m["attacks"][0]["tpr_at_lowest_resolvable_fpr"] = None
    assert not m["attacks"][0]["tpr_at_fpr"][0]["exceeds_dp_bound"]
    m["verdict"] = audit_verdict(m)
    assert m["verdict"]["verdict"] == "passed" and by_area(content)["privacy-audit"]["status"] == "holds"


def test_a_claim_refuted_by_several_checks_names_the_first_and_counts_the_rest():
    content = good_dp_content()
    claimed = content["privacy"]["models"]["cnn"]["epsilon"]
    m = _audit_model("CNN classifier", claimed, claimed + 1.0, 9.0)  # the attack's ε bound refutes ...
    m["attacks"][0]["tpr_at_fpr"] = [_tpr_row(claimed, (0.4, 0.6))]  # ... and its TPR ...
    m["canaries"] = {"ran": True, "epsilon_lower_bound": claimed + 2.0}  # ... and the canaries
    m["verdict"] = audit_verdict(m)
    assert len(refuted_by(m)) == 3
    content["audit"]["models"]["cnn"] = m
    v = by_area(content)["privacy-audit"]
    assert v["status"] == "failed" and v["sentence"].endswith(": LiRA and 2 more checks contradict it."), v["sentence"]
    m["canaries"] = {"ran": True, "epsilon_lower_bound": claimed - 0.5}  # the canaries no longer refute it
    m["verdict"] = audit_verdict(m)
    assert len(refuted_by(m)) == 2
    v = by_area(content)["privacy-audit"]
    assert v["sentence"].endswith(": LiRA and 1 more check contradict it."), v["sentence"]


def test_an_audit_that_cannot_certify_the_claimed_epsilon_is_a_caveat_and_one_without_models_does_not_apply():
    content = good_dp_content()
    claimed = content["privacy"]["models"]["cnn"]["epsilon"]
    m = _audit_model("CNN classifier", claimed, 0.1, 9.0)  # the control is caught ...
    m["certifiable_epsilon"] = {"membership_attacks": 1.0, "canaries": None}  # ... but no bound can exceed 1.0
    assert m["certifiable_epsilon"]["membership_attacks"] <= claimed  # so the audit could not refute the claim
    m["verdict"] = audit_verdict(m)
    assert m["verdict"]["verdict"] == "no verdict" and control_outcome(m)["caught"]
    content["audit"]["models"]["cnn"] = m
    v = by_area(content)["privacy-audit"]
    assert v["status"] == "holds with caveat"
    assert v["sentence"] == "No verdict for the CNN classifier: the audit lacked the power to refute its claimed ε."
    assert (v["numbers"][0]["label"], v["numbers"][0]["value"]) == ("ε lower bound, CNN classifier", 0.1)
    # control: an audit that can certify above the claim passes
    m["certifiable_epsilon"]["membership_attacks"] = claimed + 1.0
    m["verdict"] = audit_verdict(m)
    assert by_area(content)["privacy-audit"]["status"] == "holds"
    content["audit"] = {"ran": True, "models": {}}
    v = by_area(content)["privacy-audit"]
    assert v["status"] == "not applicable" and v["sentence"] == "The audit ran but recorded no model to judge."


def test_provenance_with_an_artifact_without_a_hash_never_holds():
    content = good_dp_content()
    hashed = {"path": "config.toml", "sha256": "ef" * 32, "stage": "config"}
    content["reproducibility"]["artifacts"] = [
        hashed,
        {"path": "models/cnn.safetensors", "sha256": None, "stage": "train"},  # listed, hash empty
        {"path": "models/cnn.json", "stage": "train"},  # an entry without its hash field
    ]
    v = by_area(content)["provenance"]
    assert v["status"] == "holds with caveat"
    assert v["sentence"] == "2 of 3 artifacts the report lists have no recorded SHA-256."
    assert v["numbers"] == [{"label": "artifacts with SHA-256", "value": 1, "interval": None, "unit": "of 3"}]
    content["reproducibility"]["artifacts"][1]["sha256"] = ""  # an empty string is no hash either
    assert by_area(content)["provenance"]["status"] == "holds with caveat"
    # control: every entry hashed holds
    for a in content["reproducibility"]["artifacts"]:
        a["sha256"] = "12" * 32
    v = by_area(content)["provenance"]
    assert v["status"] == "holds" and v["sentence"].startswith("All 3 artifacts are listed with SHA-256 and the code's")
    assert v["numbers"][0]["value"] == 3
    # an unknown commit leaves the code unpinned
    content["reproducibility"]["git_commit"] = None
    v = by_area(content)["provenance"]
    assert v["status"] == "holds with caveat" and v["sentence"] == (
        "All 3 artifacts are listed with SHA-256, but the code's git commit is unknown, so the code is not pinned."
    )


def test_a_model_without_a_test_metric_or_no_better_than_its_public_only_twin_is_a_utility_caveat():
    content = good_dp_content()
    content["models"]["cnn"]["trivial_baseline"] = None  # the evaluate stage recorded no test metric for it
    v = by_area(content)["utility"]
    assert v["status"] == "holds with caveat"
    assert v["sentence"] == "The CNN classifier has no recorded test metric to judge."
    assert [n["label"] for n in v["numbers"]] == ["test R², MLP regressor"]
    content = good_dp_content()
    content["models"]["cnn"]["public_only_baseline"] = {"available": True, "private_data_contributed": False}
    v = by_area(content)["utility"]
    assert v["status"] == "holds with caveat"
    assert v["sentence"] == (
        "Every model beats a trivial predictor, but the CNN classifier does not measurably beat the same model "
        "trained on the public split alone."
    )
    # control: a measurable gain from the private data holds
    content["models"]["cnn"]["public_only_baseline"]["private_data_contributed"] = True
    assert by_area(content)["utility"]["status"] == "holds"


def test_no_recorded_explanation_does_not_apply():
    content = good_dp_content()
    content["explanations"] = {"models": {}}
    v = by_area(content)["explanations"]
    assert v["status"] == "not applicable" and v["sentence"] == "No explanation was recorded in this run."
    assert v["numbers"] == []


def test_a_student_without_intervals_or_with_a_dead_class_is_a_caveat_and_none_recorded_does_not_apply():
    content = good_dp_content()
    rec = content["distill"]["regressor"]["record"]
    rec["student_r2_ci95"] = None
    v = by_area(content)["students"]
    assert v["status"] == "holds with caveat"
    assert v["sentence"] == (
        "Network students beat a trivial predictor and chance fidelity, but the student of the MLP regressor's "
        "metrics have no recorded interval."
    )
    assert rec["student_r2"] > 0.0 and rec["student_fidelity_r2_ci95"][0] > 0.0  # true of this input
    content = good_dp_content()
    cm = (np.eye(10, dtype=int) * 30 + 1).tolist()
    cm[3][3] = 0  # class 3: no test image right
    content["distill"]["cnn"]["record"]["student_confusion_matrix"] = cm
    v = by_area(content)["students"]
    assert v["status"] == "holds with caveat" and v["sentence"].endswith(
        "but the student of the CNN classifier has recall 0 on 1 of 10 classes."
    )
    content["distill"] = {"cnn": {"record": {}}, "regressor": {"record": None}}
    v = by_area(content)["students"]
    assert v["status"] == "not applicable" and v["sentence"] == "The distill stage recorded no student."


def test_a_student_that_was_not_judged_is_never_said_to_beat_anything():
    # A record without metrics (written before the distill stage kept them), a teacher without a test metric (no
    # trivial predictor to judge the student against) and a record without the chance agreement: the row said
    # "Network students beat a trivial predictor and chance fidelity, but ..." or "holds", of checks never made.
    content = good_dp_content()
    content["distill"] = {"cnn": {"record": {"privacy": {"guarantee": "inherited", "epsilon": 1.0, "delta": DELTA}}}}
    v = by_area(content)["students"]
    assert v["status"] == "holds with caveat"
    assert v["sentence"] == "The student of the CNN classifier has no recorded test metric or fidelity to judge."
    content = good_dp_content()
    content["models"]["cnn"]["trivial_baseline"] = None
    v = by_area(content)["students"]
    assert v["status"] == "holds with caveat"
    assert v["sentence"] == (
        "The student of the CNN classifier is not judged against a trivial predictor: its teacher has no recorded "
        "test metric."
    )
    assert v["numbers"][0]["label"] == "test accuracy, CNN classifier's student" and v["numbers"][0]["unit"] == ""
    content = good_dp_content()
    content["distill"]["cnn"]["record"] = _student_record("cnn", chance=None)
    v = by_area(content)["students"]
    assert v["status"] == "holds with caveat"
    assert v["sentence"] == (
        "The student of the CNN classifier's top-1 agreement is not judged against chance: its record holds no "
        "chance agreement."
    )
    # control: the same students, judged on every check, hold
    assert by_area(good_dp_content())["students"]["status"] == "holds"
