"""``python -m pipeline predict`` on one tiny end-to-end run: exact reproduction, refusals, ONNX parity, memory."""

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_diabetes, load_digits

from auditml_core import config as config_mod
from auditml_core.artifacts import read_json
from auditml_core.errors import DataError
from pipeline import predict, predict_inputs, predict_model, runner
from pipeline.__main__ import main
from pipeline.rundir import RunDir
from tests.tiny import ALL

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One tiny run (data, train, evaluate, explain, distill) shared by every test here."""
    cfg = config_mod.load_config(None, list(ALL))
    run = RunDir.create(
        tmp_path_factory.mktemp("runs"), config_toml=config_mod.to_toml(cfg), command=["test"], device="cpu"
    )
    runner.run_stages(cfg, run, ["data", "train", "evaluate", "explain", "distill"])
    return run.path


@pytest.fixture(scope="module")
def raw_test(run_dir, tmp_path_factory):
    """The run's own test split in raw units, from the embedded sources, as files a user would pass."""
    folder = tmp_path_factory.mktemp("inputs")
    tab, img = np.load(run_dir / "data" / "tabular.npz"), np.load(run_dir / "data" / "images.npz")
    d = load_diabetes()
    csv = folder / "test.csv"
    frame = pd.DataFrame(d.data[tab["index_test"]], columns=d.feature_names)
    frame.iloc[:, ::-1].to_csv(csv, index=False)  # columns in another order than in training
    npz = folder / "test.npz"
    np.savez(npz, x=load_digits().images[img["index_test"]])  # (N, 8, 8): the channel axis is added
    return {"csv": csv, "npz": npz, "tabular": tab, "images": img}


def _served_model(run_dir, name, which):
    return predict_model.load_served(run_dir, name=name, which=which).model


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_predict_reproduces_the_runs_test_predictions(run_dir, raw_test, tmp_path, which):
    from auditml_core import training

    meta = read_json((run_dir / "data" / "tabular.json").read_bytes())["preprocessing"]
    out = tmp_path / "reg.csv"
    assert main(["predict", str(run_dir), "--input", str(raw_test["csv"]), "--model", which, "--out", str(out)]) == 0
    got = pd.read_csv(out)["prediction"].to_numpy()
    model = _served_model(run_dir, "regressor", which)
    expected = (
        training.predict(model, raw_test["tabular"]["x_test"]).astype(np.float64) * meta["y_std"] + meta["y_mean"]
    )
    np.testing.assert_array_equal(got, expected)  # bit for bit: same standardisation, same weights
    if which == "teacher":  # and the run's own evaluation agrees with these predictions exactly
        y = raw_test["tabular"]["y_test"].astype(np.float64) * meta["y_std"] + meta["y_mean"]
        recorded = json.loads((run_dir / "metrics" / "evaluation.json").read_text())["regressor"]["test"]["rmse"]
        assert float(np.sqrt(np.mean((y - got) ** 2))) == recorded

    out = tmp_path / "cnn.csv"
    assert main(["predict", str(run_dir), "--input", str(raw_test["npz"]), "--model", which, "--out", str(out)]) == 0
    frame = pd.read_csv(out)
    logits = training.predict(_served_model(run_dir, "cnn", which), raw_test["images"]["x_test"])
    np.testing.assert_array_equal(frame["label"].to_numpy(), logits.argmax(1))
    probs = frame[[f"p_{k}" for k in range(10)]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    if which == "teacher":
        recorded = json.loads((run_dir / "metrics" / "evaluation.json").read_text())["cnn"]["test"]["accuracy"]
        assert float(np.mean(frame["label"].to_numpy() == raw_test["images"]["y_test"])) == recorded
    prov = json.loads((tmp_path / "cnn.csv.provenance.json").read_text())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    weights = f"{'students' if which == 'student' else 'models'}/cnn.safetensors"
    assert prov["model"]["weights_sha256"] == manifest["artifacts"][weights]["sha256"]
    assert prov["input"]["rows"] == len(frame) and prov["run_id"] == manifest["run_id"]
    assert prov["privacy"]["guarantee"] == "none"  # this run has no DP: nothing is claimed


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_onnx_graph_alone_reproduces_predict_on_raw_inputs(run_dir, raw_test, which):
    import onnxruntime as ort

    folder = "students" if which == "student" else "models"
    for name, x, key in (
        ("regressor", pd.read_csv(raw_test["csv"])[list(load_diabetes().feature_names)].to_numpy(), "features"),
        ("cnn", np.load(raw_test["npz"])["x"][:, None], "images"),
    ):
        session = ort.InferenceSession(str(run_dir / folder / f"{name}.onnx"), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == [key]
        assert session.get_inputs()[0].shape[0] == "batch"  # dynamic batch axis
        onnx_out = session.run(None, {key: x.astype(np.float32)})[0]
        served = predict_model.load_served(run_dir, name=name, which=which)
        torch_out = predict_model.predict_torch(served, x)
        assert onnx_out.shape == torch_out.shape
        assert float(np.max(np.abs(onnx_out - torch_out))) <= 1e-4
    record = json.loads((run_dir / "students" / "cnn.json").read_text())["record"]
    assert record["onnx_max_abs_diff"] <= 1e-4 and record["onnx"]["teacher_max_abs_diff"] <= 1e-4


def _one_line_error(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_schema_mismatches_are_one_line_errors(run_dir, raw_test, tmp_path, capsys):
    frame = pd.read_csv(raw_test["csv"])
    base = ["predict", str(run_dir), "--out", str(tmp_path / "p.csv"), "--input"]
    frame.drop(columns=["bmi"]).to_csv(tmp_path / "missing.csv", index=False)
    assert "'bmi'" in _one_line_error(capsys, base + [str(tmp_path / "missing.csv")])
    frame.assign(target=1.0).to_csv(tmp_path / "extra.csv", index=False)
    assert "--ignore-columns target" in _one_line_error(capsys, base + [str(tmp_path / "extra.csv")])
    assert main(base + [str(tmp_path / "extra.csv"), "--ignore-columns", "target"]) == 0  # named: ignored
    bad = frame.astype({"s3": object})
    bad.loc[5, "s3"] = "high"
    bad.to_csv(tmp_path / "typed.csv", index=False)
    err = _one_line_error(capsys, base + [str(tmp_path / "typed.csv"), "--chunk-rows", "4"])
    assert "'s3'" in err and "row 6" in err and "'high'" in err
    assert not (tmp_path / "p.csv.provenance.json").read_text().count("typed.csv")  # the failed run wrote nothing


def test_wrong_image_shapes_are_one_line_errors(run_dir, tmp_path, capsys):
    base = ["predict", str(run_dir), "--out", str(tmp_path / "p.csv"), "--input"]
    np.savez(tmp_path / "big.npz", x=np.zeros((3, 1, 16, 16)))
    assert "(N, 1, 8, 8)" in _one_line_error(capsys, base + [str(tmp_path / "big.npz")])
    np.savez(tmp_path / "rgb.npz", x=np.zeros((3, 3, 8, 8)))
    assert "1 channel(s)" in _one_line_error(capsys, base + [str(tmp_path / "rgb.npz")])
    np.savez(tmp_path / "nox.npz", images=np.zeros((3, 8, 8)))
    assert "no array 'x'" in _one_line_error(capsys, base + [str(tmp_path / "nox.npz")])
    assert not (tmp_path / "p.csv").exists()


def test_damaged_or_incomplete_run_is_refused(run_dir, raw_test, tmp_path, capsys):
    damaged = tmp_path / "run"
    shutil.copytree(run_dir, damaged)
    args = ["predict", str(damaged), "--input", str(raw_test["csv"]), "--out", str(tmp_path / "p.csv")]
    weights = damaged / "students" / "regressor.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert "students/regressor.safetensors" in _one_line_error(capsys, args)
    manifest = json.loads((damaged / "manifest.json").read_text())
    manifest["stages"]["distill"]["status"] = "running"
    (damaged / "manifest.json").write_text(json.dumps(manifest))
    assert "incomplete" in _one_line_error(capsys, args)
    assert "not a run directory" in _one_line_error(capsys, ["predict", str(tmp_path), "--input", str(raw_test["csv"])])
    assert not (tmp_path / "p.csv").exists()


def test_explain_writes_additive_shap_in_original_units(run_dir, raw_test, tmp_path):
    out = tmp_path / "p.csv"
    assert main(["predict", str(run_dir), "--input", str(raw_test["csv"]), "--out", str(out), "--explain"]) == 0
    shap_frame = pd.read_csv(tmp_path / "p.shap.csv")
    pred = pd.read_csv(out)["prediction"].to_numpy()
    total = shap_frame["base_value"] + shap_frame.filter(like="shap_").sum(axis=1)
    np.testing.assert_allclose(total, pred, atol=1e-3)  # shap-deep: additive up to float32 error
    record = json.loads((tmp_path / "p.csv.provenance.json").read_text())["explanations"]
    assert (
        record["method"]
        == json.loads((run_dir / "explain" / "metrics.json").read_text())["models"]["regressor"]["methods"]["shap"]
    )
    assert record["background"]["split"] == "public" and record["additivity_max_abs_error"] < 1e-3
    out = tmp_path / "c.csv"
    argv = ["predict", str(run_dir), "--input", str(raw_test["npz"]), "--out", str(out), "--explain"]
    assert main(argv + ["--explain-max", "5"]) == 2  # refused beyond the cap, nothing written
    assert not out.exists()
    np.savez(tmp_path / "few.npz", x=np.load(raw_test["npz"])["x"][:3])
    argv[3] = str(tmp_path / "few.npz")
    assert main(argv) == 0
    maps = np.load(tmp_path / "c.shap.npz")
    assert maps["values"].shape == (3, 1, 8, 8)


def test_dp_run_predictions_state_the_guarantee(tmp_path):
    """Under DP the provenance carries the student's inherited (ε, δ) and says predictions are post-processing."""
    cfg = config_mod.load_config(None, list(ALL) + ["dp.enabled=true", "dp.target_epsilon=8"])
    run = RunDir.create(tmp_path / "runs", config_toml=config_mod.to_toml(cfg), command=["test"], device="cpu")
    runner.run_stages(cfg, run, ["data", "train", "distill"])
    x = load_diabetes().data[:5]
    pd.DataFrame(x, columns=load_diabetes().feature_names).to_csv(tmp_path / "x.csv", index=False)
    rec = predict.predict_file(run.path, tmp_path / "x.csv", out=tmp_path / "p.csv", which="student")
    student = json.loads((run.path / "students" / "regressor.json").read_text())["record"]["privacy"]
    assert student["guarantee"] == "inherited"
    assert rec["privacy"]["epsilon"] == student["epsilon"] and "post-processing" in rec["privacy"]["statement"]


@pytest.mark.slow
def test_streaming_a_million_rows_has_bounded_memory(run_dir, tmp_path):
    """Peak memory for 1e6 rows stays within 150 MB of the peak for 1e4 rows (chunked reading and writing)."""
    names = list(load_diabetes().feature_names)
    rng = np.random.default_rng(0)
    peaks = {}
    for n in (10_000, 1_000_000):
        csv = tmp_path / f"x{n}.csv"
        with csv.open("w") as fh:
            fh.write(",".join(names) + "\n")
            for start in range(0, n, 100_000):
                block = rng.normal(scale=0.05, size=(min(100_000, n - start), len(names)))
                np.savetxt(fh, block, delimiter=",", fmt="%.5f")
        code = (
            "import resource, sys; from pipeline.__main__ import main; "
            f"rc = main(['predict', {str(run_dir)!r}, '--input', {str(csv)!r}, '--out', {str(tmp_path / 'o.csv')!r}, "
            "'--device', 'cpu', '--quiet']); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)"
        )
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr
        peaks[n] = int(proc.stdout.split()[-1]) / 1024  # MB
        assert sum(1 for _ in (tmp_path / "o.csv").open()) == n + 1
    assert peaks[1_000_000] - peaks[10_000] < 150, peaks


# --------------------------------------------------------------------------- issue 24: hostile inputs, round two


def _write_table(path, frame):
    frame.to_csv(path, index=False)
    return path


@pytest.mark.parametrize(
    "kind, fragments",
    [
        ("nan_pixel", ["image 2", "NaN or inf"]),
        ("inf_pixel", ["image 0", "NaN or inf"]),
        ("huge_pixel", ["image 1", "1e+308", "too large"]),
        ("complex_images", ["complex128", "real numbers"]),
        ("huge_cell", ["'bmi'", "data row 4", "1e+308"]),
    ],
)
def test_inputs_training_would_refuse_are_refused_by_name_and_index(
    run_dir, raw_test, tmp_path, capsys, kind, fragments
):
    """Item 3: predict validates values as training does; nothing is written."""
    x = np.load(raw_test["npz"])["x"][:5].astype(np.float64)
    if kind == "nan_pixel":
        x[2, 3, 3] = np.nan
    elif kind == "inf_pixel":
        x[0, 0, 0] = np.inf
    elif kind == "huge_pixel":
        x[1, 4, 4] = 1e308
    elif kind == "complex_images":
        x = x.astype(np.complex128)
    path = tmp_path / "in.npz"
    np.savez(path, x=x)
    if kind == "huge_cell":
        frame = pd.read_csv(raw_test["csv"]).head(6)
        frame.loc[3, "bmi"] = 1e308
        path = _write_table(tmp_path / "in.csv", frame)
    out = tmp_path / "p.csv"
    err = _one_line_error(capsys, ["predict", str(run_dir), "--input", str(path), "--out", str(out)])
    assert all(f in err for f in fragments), err
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))


def test_images_with_nan_pixels_take_the_channel_mean_when_the_run_imputed(run_dir, raw_test):
    """Item 3: like tables, images follow the run's nan_policy (impute: the train-split channel mean)."""
    served = predict_model.load_served(run_dir, name="cnn", which="teacher")
    imputing = dataclasses.replace(served, preprocessing={**served.preprocessing, "nan_policy": "impute"})
    x = np.load(raw_test["npz"])["x"][:3].astype(np.float64)[:, None]
    x[1, 0, 2, 2] = np.nan
    got = predict_inputs.check_images(x, imputing, what="x")
    assert got[1, 0, 2, 2] == imputing.preprocessing["channel_mean"][0] and np.isfinite(got).all()


def test_ragged_csv_rows_are_refused_with_their_line_number(run_dir, raw_test, tmp_path, capsys):
    """Item 4: a row with a field too many would otherwise be read shifted by one column (usecols)."""
    lines = raw_test["csv"].read_text().splitlines()
    base = ["predict", str(run_dir), "--out", str(tmp_path / "p.csv"), "--input"]
    longer = list(lines)
    longer[4] += ",0.5"
    (tmp_path / "long.csv").write_text("\n".join(longer) + "\n")
    err = _one_line_error(capsys, base + [str(tmp_path / "long.csv"), "--chunk-rows", "2"])
    assert "line 5" in err and "11 fields" in err and "10" in err
    shorter = list(lines)
    shorter[7] = shorter[7].rsplit(",", 1)[0]
    (tmp_path / "short.csv").write_text("\n".join(shorter) + "\n")
    err = _one_line_error(capsys, base + [str(tmp_path / "short.csv")])
    assert "line 8" in err and "9 fields" in err
    assert not (tmp_path / "p.csv").exists()


@pytest.mark.parametrize(
    "text, line",
    [
        ("a,b\n1,2\n\n3,4\n5,6,7\n", 5),  # blank lines skipped, as pandas does; counted
        ("a,b\r\n1,2\r\n3\r\n", 3),  # too few fields; CRLF line ends
        ('"a,x",b\n1,2\n"3\n4",5\n6,7,8\n', 5),  # quoted header and a quoted line break: the csv module reads
        ('a,b\n1,2\n"3,4",5\n6\n', 4),  # quotes from line 3 on: counting hands over to the csv module
        ("a,b\n1,2\n3,4\n", None),
    ],
)
def test_field_counts_follow_csv_quoting(text, line):
    import io

    if line is None:
        predict_inputs.check_field_counts(io.StringIO(text, newline=""), where="t")
        return
    with pytest.raises(DataError, match=rf"^line {line} of t has \d+ fields but the header has 2;"):
        predict_inputs.check_field_counts(io.StringIO(text, newline=""), where="t")


def test_out_may_be_neither_the_input_nor_inside_a_run_directory(run_dir, raw_test, tmp_path, capsys):
    """Item 6: predictions never replace the user's input or touch a run directory."""
    csv = tmp_path / "v.csv"
    csv.write_bytes(raw_test["csv"].read_bytes())
    original = csv.read_bytes()
    err = _one_line_error(capsys, ["predict", str(run_dir), "--input", str(csv), "--out", str(csv)])
    assert "is the input" in err and csv.read_bytes() == original
    (tmp_path / "alias.csv").symlink_to(csv)
    err = _one_line_error(capsys, ["predict", str(run_dir), "--input", str(csv), "--out", str(tmp_path / "alias.csv")])
    assert "is the input" in err and csv.read_bytes() == original
    manifest = (run_dir / "manifest.json").read_bytes()
    for out in (run_dir / "metrics" / "evaluation.json", run_dir / "new.csv", run_dir / "models" / "p.csv"):
        before = out.read_bytes() if out.exists() else None
        err = _one_line_error(capsys, ["predict", str(run_dir), "--input", str(csv), "--out", str(out)])
        assert "inside the run directory" in err and (out.read_bytes() if out.exists() else None) == before
    assert (run_dir / "manifest.json").read_bytes() == manifest and RunDir.open(run_dir).verify() == []


class _Killed(BaseException):
    """Stands for SIGKILL at one exact point (nothing after it runs)."""


def test_predictions_and_provenance_are_replaced_as_one_unit(run_dir, raw_test, tmp_path, monkeypatch):
    """Item 2: killed between the renames, no provenance ever describes predictions it did not produce."""
    out, provenance = tmp_path / "p.csv", tmp_path / "p.csv.provenance.json"
    predict.predict_file(run_dir, raw_test["csv"], out=out, which="teacher")
    first = np.load(raw_test["npz"])["x"][:4]
    np.savez(tmp_path / "few.npz", x=first)
    real, calls = os.replace, []

    def replace(src, dst, *args, **kwargs):
        calls.append(Path(dst).name)
        if len(calls) == 2:  # the second rename of this predict: killed just after --out was replaced
            raise _Killed()
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(_Killed):
        predict.predict_file(run_dir, tmp_path / "few.npz", out=out, which="teacher")
    monkeypatch.undo()
    assert calls[0] == "p.csv"  # the predictions were replaced...
    assert len(pd.read_csv(out)) == 4
    if provenance.exists():  # ...and any provenance beside them must describe them
        record = json.loads(provenance.read_text())
        assert record["output"]["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    record = predict.predict_file(run_dir, tmp_path / "few.npz", out=out, which="teacher")  # a clean re-run
    assert json.loads(provenance.read_text())["output"]["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert record["input"]["rows"] == 4


def test_a_full_disk_while_predicting_is_one_line_and_leaves_the_previous_output(
    run_dir, raw_test, tmp_path, capsys, monkeypatch
):
    """Item 13: ENOSPC while writing predictions: one line, exit 1, the previous output and provenance intact."""
    from tests.pipeline.test_hostile import full_disk

    out = tmp_path / "p.csv"
    assert main(["predict", str(run_dir), "--input", str(raw_test["csv"]), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    full_disk(monkeypatch, ".p.csv.")
    code = main(["predict", str(run_dir), "--input", str(raw_test["npz"]), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.startswith("error: no space left on the file system at ") and "\n" not in err, err
    assert str(out) in err and "nothing was written" in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporary file left either
