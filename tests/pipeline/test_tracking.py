"""MLflow tracking (pipeline/tracking.py): one tiny DP run logged to an embedded sqlite store and read back with
MlflowClient; failures that warn once and are recorded; tracking off imports nothing; a real `mlflow server`."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from auditml_core import config as config_mod
from auditml_core.config_effect import inert_settings
from auditml_core.errors import ConfigError
from federated.launch.processes import free_port
from pipeline import predict_model, tracking
from pipeline.__main__ import main
from pipeline.rundir import RunDir
from tests.tiny import DISTILL, EXPLAIN, TRAIN

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # before this process imports mlflow (the pipeline does too)
pytest.importorskip("mlflow")

ROOT = Path(__file__).resolve().parents[2]
FAST = [*TRAIN, *EXPLAIN, *DISTILL, "audit.enabled=false"]  # every stage completes; the audit records that it was off
MODELS = [(name, which) for name in ("regressor", "cnn") for which in ("teacher", "student")]


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _only_run(out: Path) -> Path:
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    return run


def _tracking_record(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())["invocations"][-1]["tracking"]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """One tiny DP run, every stage, logged and registered in an embedded sqlite store, as `python -m pipeline`."""
    folder = tmp_path_factory.mktemp("tracked")
    uri = f"sqlite:///{folder / 'mlruns.db'}"
    argv = ["--out", str(folder / "runs"), "--quiet", *FAST, "dp.enabled=true"]
    argv += [f"tracking.mlflow_uri={uri}", "tracking.register=true", "tracking.experiment=tracked"]
    globals_before = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")}
    cwd_mlruns = (Path.cwd() / "mlruns").exists()
    assert main(argv) == 0
    assert (Path.cwd() / "mlruns").exists() == cwd_mlruns  # the artifacts went beside the database, not here
    assert (folder / "mlruns" / "tracked").is_dir()
    assert {key: os.environ.get(key) for key in globals_before} == globals_before  # MLflow's globals restored
    run = _only_run(folder / "runs")
    record = _tracking_record(run)
    assert record["status"] == "logged", record
    mlflow_run = _client(uri).get_run(record["mlflow_run_id"])
    return {"uri": uri, "run": run, "record": record, "mlflow_run": mlflow_run, "folder": folder}


# --------------------------------------------------------------------------- what a logged run holds


def test_the_run_is_logged_once_with_its_config_as_params_and_its_provenance_as_tags(tracked):
    run, mrun = tracked["run"], tracked["mlflow_run"]
    cfg = config_mod.load_config(run / "config.toml")
    flat = config_mod.flatten(cfg)
    params = mrun.data.params
    assert set(params) == set(flat)  # every key of the resolved config, dotted
    assert params["dp.enabled"] == "true" and params["regressor.hidden_sizes"] == "[8]"
    assert params["tracking.mlflow_uri"] == tracked["uri"]
    assert mrun.info.status == "FINISHED" and mrun.info.run_name == run.name
    tags = mrun.data.tags
    assert tags["run_id"] == run.name
    # The hash MLflow holds is that of the final manifest on disk (it records this very logging).
    assert tags["manifest_sha256"] == _sha256(run / "manifest.json") == RunDir.open(run).manifest_sha256()
    assert RunDir.open(run).verify() == []  # tracking wrote nothing the manifest does not list
    experiment = _client(tracked["uri"]).get_experiment_by_name("tracked")
    runs = _client(tracked["uri"]).search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [mrun.info.run_id]
    assert tracked["record"]["experiment_id"] == experiment.experiment_id


def test_every_test_metric_is_logged_with_its_confidence_bounds(tracked):
    run, metrics = tracked["run"], tracked["mlflow_run"].data.metrics
    evaluation = json.loads((run / "metrics" / "evaluation.json").read_text())
    checked = 0
    for name, entry in evaluation.items():
        for key, value in entry["test"].items():
            if isinstance(value, float):
                assert metrics[f"test.{name}.{key}"] == value, key
                checked += 1
            if key.endswith("_ci95"):
                assert metrics[f"test.{name}.{key}_low"] == value[0] and metrics[f"test.{name}.{key}_high"] == value[1]
                checked += 1
    assert checked >= 14  # r2, mae, rmse (+ CIs) of the regressor and Ridge, accuracy, macro F1 (+ CIs) of the CNN
    assert metrics["test.regressor.vs_ridge.ci95_low"] == evaluation["regressor"]["vs_ridge"]["ci95"][0]
    assert not any(k.startswith(("val.", "test.regressor.val")) for k in metrics)  # validation metrics are not test
    manifest = json.loads((run / "manifest.json").read_text())
    for stage, entry in manifest["stages"].items():
        assert metrics[f"stage_seconds.{stage}"] == entry["seconds"]


def test_epsilon_and_delta_of_every_model_are_metrics_and_tags_from_the_report(tracked):
    run, data = tracked["run"], tracked["mlflow_run"].data
    report = json.loads((run / "report.json").read_text())
    assert data.tags["privacy_statement"] == report["privacy"]["statement"]
    for name, which in MODELS:
        served = predict_model.load_served(run, name=name, which=which)
        eps = served.privacy["epsilon"]
        if which == "teacher":
            assert eps == report["privacy"]["models"][name]["epsilon"]
        else:
            assert eps == report["distill"][name]["record"]["privacy"]["epsilon"]
        assert 0 < eps <= 3.0 + 1e-9  # the tiny run's target
        assert data.metrics[f"privacy.{name}.{which}.epsilon"] == eps
        assert data.metrics[f"privacy.{name}.{which}.delta"] == served.privacy["delta"]
        assert data.tags[f"privacy.{name}.{which}.epsilon"] == str(eps)
        assert data.tags[f"privacy.{name}.{which}.statement"] == served.privacy["statement"]


def test_the_report_model_cards_config_and_manifest_are_artifacts(tracked, tmp_path):
    from mlflow.artifacts import download_artifacts

    client, run, run_id = _client(tracked["uri"]), tracked["run"], tracked["mlflow_run"].info.run_id
    top = {f.path for f in client.list_artifacts(run_id)}
    report = {f.path for f in client.list_artifacts(run_id, "report")}
    assert {"config.toml", "manifest.json", "report"} <= top
    for rel in ("report.html", "report.json", "model_card_regressor.md", "model_card_cnn.md"):
        assert f"report/{rel}" in report
    local = Path(
        download_artifacts(run_id=run_id, artifact_path="report", dst_path=str(tmp_path), tracking_uri=tracked["uri"])
    )
    for rel in ("report.html", "report.json", "model_card_cnn.md"):
        assert (local / rel).read_bytes() == (run / rel).read_bytes()
    manifest = Path(
        download_artifacts(
            run_id=run_id, artifact_path="manifest.json", dst_path=str(tmp_path), tracking_uri=tracked["uri"]
        )
    )
    assert manifest.read_bytes() == (run / "manifest.json").read_bytes()


def _raw_rows(run: Path, dataset: str, n: int = 7) -> np.ndarray:
    """A few test rows in raw units (what the served ONNX graphs take), rebuilt from the run's recorded split."""
    meta = json.loads((run / "data" / f"{dataset}.json").read_text())["preprocessing"]
    x = np.load(run / "data" / f"{dataset}.npz")["x_test"][:n].astype(np.float64)
    if dataset == "tabular":
        return (x * np.asarray(meta["x_std"]) + np.asarray(meta["x_mean"])).astype(np.float32)
    std, mean = np.asarray(meta["channel_std"]), np.asarray(meta["channel_mean"])
    return (x * std[None, :, None, None] + mean[None, :, None, None]).astype(np.float32)


def test_teachers_and_students_load_from_mlflow_and_predict_what_the_run_predicts(tracked):
    import mlflow

    run, models = tracked["run"], tracked["record"]["models"]
    assert set(models) == {f"{n}-{w}" for n, w in MODELS}
    mlflow.set_tracking_uri(tracked["uri"])
    try:
        for name, which in MODELS:
            served = predict_model.load_served(run, name=name, which=which)
            raw = _raw_rows(run, served.dataset)
            loaded = mlflow.pyfunc.load_model(models[f"{name}-{which}"])
            inputs = loaded.metadata.get_input_schema().inputs[0]
            assert inputs.name == ("features" if name == "regressor" else "images")
            assert tuple(inputs.shape) == (-1, *served.input_shape)
            out = loaded.predict(raw)
            got = np.asarray(out[next(iter(out))] if isinstance(out, dict) else out)
            session = predict_model.open_onnx(RunDir.open(run), served)
            np.testing.assert_array_equal(
                got, predict_model.predict_raw(served, raw, session=session)
            )  # the same graph
            torch_out = predict_model.predict_raw(served, raw)  # the run's own torch model
            np.testing.assert_allclose(got, torch_out.reshape(got.shape), rtol=1e-4, atol=1e-4)
            assert loaded.metadata.metadata["privacy"]["statement"] == served.privacy["statement"]
    finally:
        mlflow.set_tracking_uri(None)


def test_registered_versions_carry_the_runs_provenance_and_privacy_statement(tracked):
    client, run = _client(tracked["uri"]), tracked["run"]
    digest = _sha256(run / "manifest.json")
    assert tracked["record"]["registered"] == {f"tracked-{n}-{w}": "1" for n, w in MODELS}
    for name, which in MODELS:
        version = client.get_model_version(f"tracked-{name}-{which}", "1")
        served = predict_model.load_served(run, name=name, which=which)
        assert version.run_id == tracked["mlflow_run"].info.run_id
        assert version.source == tracked["record"]["models"][f"{name}-{which}"]
        assert version.tags["run_id"] == run.name and version.tags["manifest_sha256"] == digest
        assert version.tags["privacy.statement"] == served.privacy["statement"]
        assert digest in version.description and run.name in version.description


def test_read_only_commands_log_nothing(tracked, tmp_path):
    client, run = _client(tracked["uri"]), tracked["run"]
    experiment = client.get_experiment_by_name("tracked")
    before = (len(client.search_runs([experiment.experiment_id])), _sha256(run / "manifest.json"))
    columns = predict_model.load_served(run, name="regressor", which="student").feature_names
    pd.DataFrame(_raw_rows(run, "tabular").astype(np.float64), columns=columns).to_csv(tmp_path / "in.csv", index=False)
    assert main(["verify", str(run)]) == 0
    assert main(["predict", str(run), "--input", str(tmp_path / "in.csv"), "--out", str(tmp_path / "p.csv")]) == 0
    assert main(["config", "--config", str(run / "config.toml")]) == 0
    after = (len(client.search_runs([experiment.experiment_id])), _sha256(run / "manifest.json"))
    assert after == before


# --------------------------------------------------------------------------- failures: warn once, record, carry on


def _copy_with(tracked, tmp_path, **tracking_keys) -> tuple[config_mod.Config, RunDir]:
    copy = shutil.copytree(tracked["run"], tmp_path / tracked["run"].name)
    run = RunDir.open(copy)
    cfg = config_mod.load_config(run.read_config())
    return dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, **tracking_keys)), run


@pytest.mark.parametrize("store", ["unreachable server", "corrupt database"])
def test_a_failing_store_warns_once_records_why_and_leaves_the_run_intact(
    tracked, tmp_path, store, caplog, capfd, monkeypatch
):
    if store == "unreachable server":
        uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # the user's own setting wins over the pipeline's 2
    else:
        (tmp_path / "bad.db").write_bytes(b"this is not an SQLite database" * 100)
        uri = f"sqlite:///{tmp_path / 'bad.db'}"
    cfg, run = _copy_with(tracked, tmp_path, mlflow_uri=uri, register=True)
    environment = {key: os.environ.get(key) for key in (*tracking.DEFAULTS, "MLFLOW_ALLOW_FILE_STORE")}
    artifacts = json.dumps(run.manifest["artifacts"], sort_keys=True)
    capfd.readouterr()
    with caplog.at_level(logging.INFO):
        outcome = tracking.record(cfg, run)  # never raises
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and warnings[0].name == "pipeline.tracking", [r.getMessage() for r in warnings]
    assert "MLflow tracking failed" in warnings[0].getMessage() and "\n" not in warnings[0].getMessage()
    err = capfd.readouterr().err
    assert "Retrying" not in err and "Traceback" not in err, err[-2000:]
    assert outcome["status"] == "failed" and outcome["uri"] == uri and "\n" not in outcome["reason"]
    assert (
        ("Connection refused" in outcome["reason"] or "connect" in outcome["reason"].lower())
        if store == "unreachable server"
        else ("database" in outcome["reason"].lower())
    )
    reopened = RunDir.open(run.path)
    assert reopened.manifest["invocations"][-1]["tracking"] == outcome  # recorded where the run records things
    assert json.dumps(reopened.manifest["artifacts"], sort_keys=True) == artifacts and reopened.verify() == []
    assert {key: os.environ.get(key) for key in environment} == environment  # the pipeline's settings are gone again


@pytest.mark.parametrize("when", ["while logging a model", "while tagging the manifest hash"])
def test_a_failure_after_the_mlflow_run_exists_marks_it_failed_and_tags_no_hash(tracked, tmp_path, monkeypatch, when):
    from mlflow import MlflowClient

    cfg, run = _copy_with(tracked, tmp_path, mlflow_uri=tracked["uri"], experiment=f"broken {when}", register=False)

    def broken(*args, **kwargs):
        raise RuntimeError("quota exceeded\non the store")

    if when == "while logging a model":
        monkeypatch.setattr(tracking, "_log_model", broken)
    else:
        monkeypatch.setattr(MlflowClient, "set_tag", broken)
    outcome = tracking.record(cfg, run)
    assert outcome["status"] == "failed" and outcome["mlflow_run_id"], outcome
    reason = "RuntimeError: quota exceeded on the store"
    assert outcome["reason"] == (
        reason if when == "while logging a model" else f"after logging, while tagging the manifest hash: {reason}"
    )
    mrun = _client(tracked["uri"]).get_run(outcome["mlflow_run_id"])
    assert mrun.info.status == "FAILED" and "manifest_sha256" not in mrun.data.tags
    assert (
        RunDir.open(run.path).manifest["invocations"][-1]["tracking"] == outcome
        and RunDir.open(run.path).verify() == []
    )


def test_an_incomplete_run_is_not_logged_and_tracking_off_imports_no_mlflow(tmp_path):
    """`--stages data` with tracking on records `skipped`; with tracking off `off`; neither imports mlflow."""
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    script = (
        "import sys; from pipeline.__main__ import main; "
        "rc = [main(['--out', 'off', '--stages', 'data', '--quiet']), "
        f"main(['--out', 'skipped', '--stages', 'data', '--quiet', 'tracking.mlflow_uri={uri}'])]; "
        "print('rc', rc, 'mlflow imported', 'mlflow' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert "rc [0, 0] mlflow imported False" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert _tracking_record(_only_run(tmp_path / "off")) == {"status": "off"}
    skipped = _tracking_record(_only_run(tmp_path / "skipped"))
    assert skipped["status"] == "skipped" and "stage train is pending" in skipped["reason"], skipped
    assert not (tmp_path / "store.db").exists() and not (tmp_path / "mlruns").exists()


# What switches MLflow 3's telemetry off without us (mlflow/telemetry/utils.py: the user's settings and its CI list).
TELEMETRY_OFF_SIGNALS = {
    "MLFLOW_DISABLE_TELEMETRY",
    "DO_NOT_TRACK",
    "PYTEST_CURRENT_TEST",
    "GITHUB_ACTIONS",
    "CI",
    "CIRCLECI",
    "GITLAB_CI",
    "JENKINS_URL",
    "TRAVIS",
    "TF_BUILD",
    "BITBUCKET_BUILD_NUMBER",
    "CODEBUILD_BUILD_ARN",
    "BUILDKITE",
    "TEAMCITY_VERSION",
    "CLOUD_RUN_EXECUTION",
}


@pytest.mark.slow  # three fresh interpreters importing torch and mlflow: ~20 CPU-s
def test_the_pipeline_switches_mlflow_telemetry_off_unless_the_user_set_it():
    probe = (
        "from mlflow.telemetry.client import get_telemetry_client as c; "
        "from mlflow.telemetry.utils import is_telemetry_disabled as off; print(c() is None, off())"
    )
    # Without the variables MLflow reads as "a CI or a test is running" (it then switches telemetry off by itself,
    # and this test could not fail): the control, plain mlflow, must then have telemetry on.
    env = {k: v for k, v in os.environ.items() if k not in TELEMETRY_OFF_SIGNALS and not k.startswith("RUNBOT_")}
    env |= {"PYTHONPATH": str(ROOT)}
    run = [sys.executable, "-c", f"from pipeline import tracking; tracking._import_mlflow(); {probe}"]
    assert subprocess.run(run, env=env, capture_output=True, text=True, timeout=300).stdout.split() == ["True", "True"]
    control = subprocess.run([sys.executable, "-c", f"import mlflow; {probe}"], env=env, capture_output=True, text=True)
    assert control.stdout.split() == ["False", "False"], control.stderr[-2000:]
    mine = subprocess.run(run, env=env | {"MLFLOW_DISABLE_TELEMETRY": "false"}, capture_output=True, text=True)
    assert mine.stdout.split() == control.stdout.split()  # the user's own setting wins


def test_tracking_on_without_mlflow_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    out = tmp_path / "runs"
    assert main(["--out", str(out), f"tracking.mlflow_uri=sqlite:///{tmp_path / 'x.db'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and 'pip install ".[mlflow]"' in err, err
    assert not out.exists()  # nothing was started
    monkeypatch.setattr(importlib.util, "find_spec", real)
    assert main(["--out", str(out), f"tracking.mlflow_uri=sqlite:///{tmp_path / 'no' / 'x.db'}"]) == 2
    assert "does not exist" in capsys.readouterr().err and not out.exists()


def test_tracking_keys_are_validated_and_warned_about_when_inert():
    assert config_mod.load_config(None, []).tracking.mlflow_uri == ""  # off by default
    for uri in ("sqlite:///m.db", "file:/tmp/mlruns", "http://127.0.0.1:5000", "https://mlflow.example.org"):
        assert config_mod.load_config(None, [f"tracking.mlflow_uri={uri}"]).tracking.mlflow_uri == uri
    for bad, match in (
        ("tracking.mlflow_uri=mlruns.db", "sqlite:///FILE.db"),
        ("tracking.mlflow_uri=postgresql://h/db", "sqlite:///FILE.db"),
        ("tracking.mlflow_uri=http://me:secret@host:5000", "MLFLOW_TRACKING_PASSWORD"),
        ('tracking.experiment=""', "tracking.experiment"),
    ):
        with pytest.raises(ConfigError, match=re.escape(match)):
            config_mod.load_config(None, [bad])
    off = config_mod.load_config(None, ["tracking.register=true"])
    assert "tracking.register" in inert_settings(off, ["tracking.register", "tracking.mlflow_uri"])
    assert "tracking.mlflow_uri" not in inert_settings(off, ["tracking.mlflow_uri"])


def test_the_manifest_schema_types_the_tracking_record(tracked):
    from pipeline.manifest_schema import manifest_problem

    manifest = json.loads((tracked["run"] / "manifest.json").read_text())
    assert manifest_problem(manifest) is None
    for bad, where in (
        ({"status": "maybe"}, "status"),
        ({"reason": "x"}, "status"),
        ({"status": "failed", "reason": 3}, "reason"),
    ):
        damaged = json.loads(json.dumps(manifest))
        damaged["invocations"][-1]["tracking"] = bad
        assert where in manifest_problem(damaged)


def test_mlflow_is_an_optional_extra_that_make_install_includes():
    from importlib import metadata

    from packaging.requirements import Requirement

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (spec,) = [Requirement(r) for r in pyproject["project"]["optional-dependencies"]["mlflow"]]
    assert spec.name == "mlflow" and spec.specifier.contains(metadata.version("mlflow"))
    assert len(spec.specifier) == 2  # a range: a lower and an upper bound
    assert "mlflow" not in " ".join(pyproject["project"]["dependencies"])
    install = next(ln for ln in (ROOT / "Makefile").read_text().splitlines() if "pip install" in ln and "-e" in ln)
    assert "mlflow" in install
    for module in ("tracking.py", "tracking_content.py"):  # mlflow is imported lazily only
        assert "import mlflow" not in (ROOT / "pipeline" / module).read_text().split("def ", 1)[0]


# --------------------------------------------------------------------------- slow: the command line, a real server


def _cli(*args: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_cli_with_an_unreachable_server_exits_0_with_one_warning_line(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    proc = _cli("--out", "runs", *FAST, f"tracking.mlflow_uri={uri}", "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    tracking_lines = [ln for ln in lines if "MLflow" in ln or "mlflow" in ln or "urllib3" in ln]
    assert len(tracking_lines) == 1 and tracking_lines[0].startswith("WARNING pipeline.tracking"), lines
    run = Path(re.search(r"^run directory: (.+)$", proc.stdout, re.M).group(1))
    run = run if run.is_absolute() else tmp_path / run
    assert _tracking_record(run)["status"] == "failed"
    assert _cli("verify", str(run), cwd=tmp_path).returncode == 0


def _readme_mlflow_ui() -> str:
    text = (ROOT / "README.md").read_text()
    return next(ln.split("  #")[0].strip() for ln in text.splitlines() if ln.startswith("mlflow ui "))


@contextlib.contextmanager
def mlflow_server(cwd: Path, command: str):
    """The README's `mlflow ui` command on a free port, in its own process group; stopped by PID at the end."""
    port = free_port()
    argv = [
        str(Path(sys.executable).parent / "mlflow"),
        *shlex.split(command)[1:],
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    log = (cwd / "server.log").open("w")
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, (cwd / "server.log").read_text()[-3000:]
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(f"{url}/health", timeout=5).status == 200:
                    break
            assert time.monotonic() < deadline, "mlflow server did not answer /health"
            time.sleep(1)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _group(proc.pid) and time.monotonic() < deadline:  # workers it forked go with their group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            time.sleep(0.5)
        log.close()
        assert not _group(proc.pid), f"processes of the mlflow server left: {_group(proc.pid)}"


def _group(pgid: int) -> list[str]:
    ps = subprocess.run(["ps", "-o", "pid=,args=", "-g", str(pgid)], capture_output=True, text=True)
    return [ln.strip() for ln in ps.stdout.splitlines() if ln.strip()]


@pytest.mark.slow
def test_readme_mlflow_ui_serves_an_embedded_run_and_a_run_logged_over_http(tmp_path):
    """The README's two commands (a run into sqlite:///mlruns.db, then `mlflow ui` on it), then a second run logged
    and registered over HTTP into the same server; both read back through the server with MlflowClient."""
    embedded = _cli("--out", "runs", *FAST, "tracking.mlflow_uri=sqlite:///mlruns.db", "--quiet", cwd=tmp_path)
    assert embedded.returncode == 0, embedded.stderr[-3000:]
    command = _readme_mlflow_ui()
    assert command.startswith("mlflow ui --backend-store-uri sqlite:///mlruns.db")
    with mlflow_server(tmp_path, command) as url:
        assert urllib.request.urlopen(url, timeout=30).status == 200  # the UI page
        served = _cli(
            "--out",
            "served",
            *FAST,
            f"tracking.mlflow_uri={url}",
            "tracking.experiment=served",
            "tracking.register=true",
            cwd=tmp_path,
        )
        assert served.returncode == 0, served.stderr[-3000:]
        run = _only_run(tmp_path / "served")
        record = _tracking_record(run)
        assert record["status"] == "logged", record
        client = _client(url)
        first = client.search_runs([client.get_experiment_by_name("auditable-pipeline").experiment_id])
        assert [r.data.tags["run_id"] for r in first] == [_only_run(tmp_path / "runs").name]
        mrun = client.get_run(record["mlflow_run_id"])
        assert mrun.data.tags["manifest_sha256"] == _sha256(run / "manifest.json")
        assert "test.cnn.accuracy_ci95_low" in mrun.data.metrics
        assert {f.path for f in client.list_artifacts(mrun.info.run_id, "report")} >= {
            "report/report.html",
            "report/report.json",
        }
        version = client.get_model_version("served-regressor-student", "1")
        assert version.tags["manifest_sha256"] == mrun.data.tags["manifest_sha256"]
        import mlflow

        mlflow.set_tracking_uri(url)
        try:
            model = mlflow.pyfunc.load_model("models:/served-regressor-student/1")
            raw = _raw_rows(run, "tabular")
            out = model.predict(raw)
            served_model = predict_model.load_served(run, name="regressor", which="student")
            session = predict_model.open_onnx(RunDir.open(run), served_model)
            np.testing.assert_array_equal(
                np.asarray(out["prediction"]), predict_model.predict_raw(served_model, raw, session=session)
            )
        finally:
            mlflow.set_tracking_uri(None)


@pytest.mark.slow
def test_a_two_process_run_is_logged_once_by_rank_0(tmp_path):
    """`train.processes=2`: the launcher checks before starting the ranks, rank 0 logs, the other rank does not."""
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    proc = _cli("--out", "runs", *FAST, "train.processes=2", f"tracking.mlflow_uri={uri}", "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = _only_run(tmp_path / "runs")
    manifest = json.loads((run / "manifest.json").read_text())
    assert [i.get("world_size") for i in manifest["invocations"]] == [2]
    record = _tracking_record(run)
    assert record["status"] == "logged", record
    client = _client(uri)
    runs = client.search_runs([client.get_experiment_by_name("auditable-pipeline").experiment_id])
    assert [r.info.run_id for r in runs] == [record["mlflow_run_id"]]
    assert runs[0].data.tags["manifest_sha256"] == _sha256(run / "manifest.json")
