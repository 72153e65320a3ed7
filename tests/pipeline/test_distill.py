import numpy as np
import pytest
import torch

from auditml_core import training
from auditml_core.config import load_config
from auditml_core.teacher import TrainedModel
from pipeline import data, distill, train
from pipeline.report.utility import _majority, _mean_r2
from pipeline.report.verdicts_students import students

TINY = [
    "dp.public_pretrain_epochs=2",
    "regressor.hidden_sizes=[8]",
    "regressor.fit.epochs=20",
    "regressor.dp_fit.epochs=2",
    "cnn.channels=[8, 16]",
    "cnn.hidden=32",
    "cnn.fit.epochs=6",
    "cnn.dp_fit.epochs=2",
    "distill.fit.epochs=20",
    "distill.cnn_channels=[2]",
    "distill.regressor_hidden=[4]",
    "distill.synthetic_per_row=5",
    "distill.augmented_epochs=5",
]


def test_kd_loss_matches_hand_computation():
    s = torch.tensor([[1.0, 0.0, -1.0]])
    t = torch.tensor([[0.5, 0.5, 0.0]])
    T = 2.0
    p_t = torch.softmax(t / T, 1)
    log_p_s = torch.log_softmax(s / T, 1)
    expected = float((p_t * (torch.log(p_t) - log_p_s)).sum() * T * T)
    y = torch.cat([t, torch.tensor([[2.0]])], 1)
    assert float(distill.DistillationLoss(temperature=T)(s, y)) == pytest.approx(expected, rel=1e-6)
    ce = float(torch.nn.functional.cross_entropy(s, torch.tensor([2])))
    mixed = float(distill.DistillationLoss(temperature=T, label_weight=0.25)(s, y))
    assert mixed == pytest.approx(0.75 * expected + 0.25 * ce, rel=1e-6)
    assert float(distill.DistillationLoss(temperature=T)(t, torch.cat([t, y[:, -1:]], 1))) == pytest.approx(0, abs=1e-6)


def test_kd_loss_per_sample_reduction_averages_to_the_batch_loss():
    # ghost clipping calls the loss with reduction="none" and clips each sample's loss gradient
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    y = torch.cat([t, torch.randint(0, 3, (5, 1), generator=g).float()], 1)
    loss = distill.DistillationLoss(temperature=2.0, label_weight=0.3)
    batch = float(loss(s, y))
    loss.reduction = "none"
    per_sample = loss(s, y)
    assert per_sample.shape == (5,)
    assert float(per_sample.mean()) == pytest.approx(batch, rel=1e-6)
    assert float(distill.DistillationLoss(temperature=2.0, reduction="none")(s[:1], y[:1])[0]) == pytest.approx(
        float(distill.DistillationLoss(temperature=2.0)(s[:1], y[:1])), rel=1e-6
    )


@pytest.fixture(scope="module")
def dp_run():
    cfg = load_config(None, TINY + ["dp.enabled=true", "dp.target_epsilon=8"])
    ds = data.run(cfg, {}, seed=0)
    trained = train.run(cfg, {"data": ds}, seed=1)
    return cfg, ds, trained, distill.run(cfg, {"data": ds, "train": trained}, seed=2)


def test_dp_teacher_student_reads_only_public_rows(dp_run):
    cfg, ds, trained, out = dp_run
    for name, key in (("cnn", "images"), ("regressor", "tabular")):
        rec = out[name]["record"]
        public = set(ds[key].index["public"].tolist())
        used = set(out[name]["transfer_index"].tolist())
        assert used and used <= public  # no private row reached the student
        assert not used & set(ds[key].index["train"].tolist())
        assert rec["transfer"]["splits"] == ["public"] and not rec["transfer"]["uses_private_labels"]
        assert rec["privacy"]["guarantee"] == "inherited"
        assert rec["privacy"]["epsilon"] == trained.models[name].training["privacy"]["epsilon"]


def test_students_are_smaller_and_onnx_matches_torch(dp_run):
    _, ds, _, out = dp_run
    for name, key in (("cnn", "images"), ("regressor", "tabular")):
        rec = out[name]["record"]
        assert rec["compression_ratio"] >= (10 if name == "cnn" else 1.5)
        assert rec["onnx_max_abs_diff"] < 1e-4
        student = TrainedModel(spec=out[name]["spec"], state_dict=out[name]["state_dict"], training={}).build()
        session = distill.onnx_session(out[name]["onnx"])
        x = ds[key].x["test"][:7]
        raw = distill.raw_inputs(ds[key], "test")[:7].astype(np.float32)  # the served graph standardises itself
        served = distill.served_reference(student, ds[key], x)  # original units or softmax probabilities
        np.testing.assert_allclose(session.run(None, {distill.ONNX_NAMES[ds[key].task][0]: raw})[0], served, atol=1e-4)


def test_teacher_and_student_are_compared_with_the_runs_explainer(dp_run):
    # #26 item 10: "Model variants" explained the regressor's teacher and student with DeepExplainer although the
    # run explains the regressor with exact enumeration.
    from pipeline.explain_stage import primary_method

    cfg, ds, _, out = dp_run
    regressor = out["regressor"]["record"]["explanation_similarity"]
    assert primary_method(cfg.explain, ds["tabular"]) == "shap-exact"
    assert regressor["methods"] == ["shap-exact", "shap-exact"] and "primary" in regressor["method_source"]
    assert out["cnn"]["record"]["explanation_similarity"]["methods"][0] == primary_method(cfg.explain, ds["images"])


def test_private_transfer_without_student_dp_says_no_guarantee():
    cfg = load_config(None, TINY + ["dp.enabled=true", "dp.target_epsilon=8", 'distill.transfer="private"'])
    ds = data.run(cfg, {}, seed=0)
    trained = train.run(cfg, {"data": ds}, seed=1)
    rec = distill._distill_one(cfg, "regressor", ds["tabular"], trained.models["regressor"], seed=3)["record"]
    assert rec["privacy"]["guarantee"] == "none" and "NO differential-privacy guarantee" in rec["privacy"]["reason"]


def test_composed_student_is_accounted_per_record_with_delta_and_budget_flag():
    from pipeline.report.privacy_students import student_caveats, student_privacy

    cfg = load_config(
        None, TINY + ["dp.enabled=true", "dp.target_epsilon=8", 'distill.transfer="private"', "distill.student_dp=true"]
    )
    ds = data.run(cfg, {}, seed=0)
    trained = train.run(cfg, {"data": ds}, seed=1)
    tab, teacher = ds["tabular"], trained.models["regressor"].training["privacy"]
    out = distill._distill_one(cfg, "regressor", tab, trained.models["regressor"], seed=3)
    rec = out["record"]
    n_train, n_public = len(tab.y["train"]), len(tab.y["public"])
    # Each private row enters the student's DP-SGD once; synthetic rows are jittered from public rows only.
    assert rec["transfer"]["synthetic_from"] == ["public"]
    assert rec["transfer"]["synthetic_rows"] == n_public * cfg.distill.synthetic_per_row
    assert rec["training"]["n_train"] == n_train + n_public + n_public * cfg.distill.synthetic_per_row
    p = rec["privacy"]
    assert p["guarantee"] == "composed"
    assert p["epsilon"] == pytest.approx(p["student_epsilon"] + teacher["epsilon"], rel=1e-12)
    assert p["delta"] == pytest.approx(2 * cfg.dp.delta, rel=1e-12)  # basic composition: δ adds too
    assert p["over_budget"] is (p["epsilon"] > cfg.dp.target_epsilon) is True  # two budgets of 8 exceed 8
    covered, _ = student_privacy({"regressor": out})
    assert any("OVER the budget" in line and "δ = " in line for line in covered)
    assert any("OVER the budget" in c for c in student_caveats({"regressor": out}))
    # The public-transfer default jitters only public rows too, and needs no student DP.
    assert distill.transfer_set(load_config(None, TINY + ["dp.enabled=true"]), tab, seed=0).synthetic_from == (
        "public",
    )


def test_student_agrees_with_teacher_on_embedded_digits():
    cfg = load_config(None, ["cnn.fit.epochs=10", "regressor.fit.epochs=30", "distill.fit.epochs=30"])
    ds = data.run(cfg, {}, seed=0)
    trained = train.run(cfg, {"data": ds}, seed=1)
    out = distill.run(cfg, {"data": ds, "train": trained}, seed=2)
    cnn, reg = out["cnn"]["record"], out["regressor"]["record"]
    assert cnn["compression_ratio"] >= 10 and cnn["top1_agreement"] >= 0.9
    assert reg["student_fidelity_r2"] >= 0.9
    # the report's students verdict holds for these students (the null of its failure rules)
    content = {
        "distill": {name: {"record": o["record"]} for name, o in out.items()},
        "models": {
            "cnn": {"trivial_baseline": {"trivial": _majority(ds["images"])[0]}},
            "regressor": {"trivial_baseline": {"trivial": _mean_r2(ds["tabular"])}},
        },
    }
    v = students(content)
    assert v["status"] == "holds", v


def test_student_records_carry_intervals_chance_agreement_and_a_confusion_matrix(dp_run):
    _, ds, trained, out = dp_run
    cnn, reg = out["cnn"]["record"], out["regressor"]["record"]
    for rec, key in ((cnn, "student_accuracy"), (cnn, "top1_agreement"), (reg, "student_r2")):
        lo, hi = rec[f"{key}_ci95"]
        assert lo <= rec[key] <= hi and lo < hi, (key, rec[key], lo, hi)
    lo, hi = reg["student_fidelity_r2_ci95"]
    assert lo <= reg["student_fidelity_r2"] <= hi
    cm = np.asarray(cnn["student_confusion_matrix"])  # rows: true class, columns: the student's answer
    y = ds["images"].y["test"]
    assert cm.sum() == len(y) and np.trace(cm) / len(y) == pytest.approx(cnn["student_accuracy"])
    assert (cm.sum(axis=1) == np.bincount(y, minlength=cm.shape[0])).all()
    # chance agreement: two independent predictors with the teacher's and the student's answer frequencies
    teacher = trained.models["cnn"].build()
    t_pred = training.predict(teacher, ds["images"].x["test"]).argmax(1)
    p_t = np.bincount(t_pred, minlength=cm.shape[0]) / len(y)
    assert cnn["top1_agreement_chance"] == pytest.approx(float(p_t @ (cm.sum(axis=0) / len(y))))


def test_dp_image_transfer_set_holds_no_private_row_nor_anything_computed_from_one():
    import dataclasses

    aug = ["distill.augment_per_row=3", "distill.mixup_per_row=2"]
    cfg = load_config(None, TINY + ["dp.enabled=true"] + aug)
    ds = data.run(cfg, {}, seed=0)["images"]
    public, n_public = ds.index["public"], len(ds.index["public"])
    t = distill.transfer_set(cfg, ds, seed=4)
    private = np.concatenate([ds.index[s] for s in ("train", "val", "test")])
    assert set(t.source_index.tolist()) == set(public.tolist())  # real rows: the public split, all of it, only it
    parents = t.synthetic_parents
    assert t.synthetic_rows == len(parents) == n_public * 5 and len(t.x) == n_public * 6
    assert np.isin(parents[:, 0], public).all() and np.isin(parents[parents[:, 1] >= 0, 1], public).all()
    assert not np.isin(parents, private).any() and t.synthetic_from == ("public",)
    # Nothing outside the public split enters: poisoning every other split leaves the transfer set bit-identical.
    poisoned = dataclasses.replace(
        ds,
        x={s: (v if s == "public" else np.full_like(v, np.nan)) for s, v in ds.x.items()},
        y={s: (v if s == "public" else np.zeros_like(v)) for s, v in ds.y.items()},
        preprocessing={"channel_mean": [np.nan], "channel_std": [np.nan]},
    )
    t2 = distill.transfer_set(cfg, poisoned, seed=4)
    assert np.array_equal(t.x, t2.x) and np.isfinite(t2.x).all() and np.array_equal(parents, t2.synthetic_parents)
    # The recorded parents are the real ones: an identity "augmentation" returns its parent, a mixup lies between its two.
    ident = load_config(
        None,
        TINY + ["dp.enabled=true"] + aug + [f"distill.augment_{k}=0" for k in ("shift", "rotation", "scale", "noise")],
    )
    t3 = distill.transfer_set(ident, ds, seed=4)
    row = {int(i): r for r, i in enumerate(public)}
    synth, par = t3.x[n_public:], t3.synthetic_parents
    single = par[:, 1] < 0
    assert single.sum() == n_public * 3
    np.testing.assert_allclose(synth[single], ds.x["public"][[row[i] for i in par[single, 0]]], atol=1e-5)
    a = ds.x["public"][[row[i] for i in par[~single, 0]]]
    b = ds.x["public"][[row[i] for i in par[~single, 1]]]
    assert (synth[~single] >= np.minimum(a, b) - 1e-5).all() and (synth[~single] <= np.maximum(a, b) + 1e-5).all()
    # The privacy statement names the provenance.
    status = distill.privacy_status(cfg, t, {"privacy": {"epsilon": 3.0, "delta": 1e-5}})
    assert status["guarantee"] == "inherited"
    assert f"the public split + {n_public * 5} teacher-labelled synthetic rows made from it only" in status["reason"]
    assert "augmentations" in status["reason"] and "mixups" in status["reason"]
    # Without DP the student's transfer set is unchanged by these keys (they are for a DP teacher's student).
    assert distill.transfer_set(load_config(None, TINY + aug), ds, seed=4).synthetic_rows == 0
