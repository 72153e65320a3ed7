"""``python -m pipeline serve`` as a client sees it: real server processes on free ports, real HTTP.

Every server is started in its own session and stopped by its PID (and everything below it) in a
``finally``, whatever the test did. Predictions are compared with ``predict``'s for the same rows;
the run directory is hashed before and after serving.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_diabetes, load_digits

from auditml_core import config as config_mod
from federated.launch.processes import free_port, stop_trees
from federated.launch.watchdog import alive, all_pids
from pipeline import predict, predict_model, runner
from pipeline.__main__ import main
from pipeline.rundir import RunDir
from tests.tiny import ALL

ROOT = Path(__file__).resolve().parents[2]
FEATURES = list(load_diabetes().feature_names)
JSON_TYPE = {"content-type": "application/json"}


def _make_run(parent: Path, stages: list[str]) -> Path:
    cfg = config_mod.load_config(None, list(ALL))
    run = RunDir.create(parent, config_toml=config_mod.to_toml(cfg), command=["test"], device="cpu")
    runner.run_stages(cfg, run, stages)
    return run.path


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory) -> Path:
    """The cheapest servable run: data and train (the teachers), a few seconds."""
    return _make_run(tmp_path_factory.mktemp("teacher_runs"), ["data", "train"])


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    """A run with students, ONNX graphs and a recorded explanation method."""
    return _make_run(tmp_path_factory.mktemp("full_runs"), ["data", "train", "evaluate", "explain", "distill"])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """Raw rows and images as a user sends them: a CSV and an .npz for predict, the same values for the server."""
    folder = tmp_path_factory.mktemp("serve_inputs")
    d = load_diabetes()
    csv = folder / "rows.csv"
    pd.DataFrame(d.data[:40], columns=FEATURES).iloc[:, ::-1].to_csv(csv, index=False)  # another column order
    npz = folder / "images.npz"
    np.savez(npz, x=load_digits().images[:12])  # (N, 8, 8)
    parsed = pd.read_csv(csv)  # the numbers predict reads from the CSV, sent as JSON
    rows = [{c: float(parsed[c].iloc[i]) for c in FEATURES} for i in range(len(parsed))]
    return {"csv": csv, "npz": npz, "rows": rows, "images": load_digits().images[:12].tolist()}


def tree_digest(path: Path) -> str:
    """Every entry under ``path`` (hidden ones too): names, sizes, modification times and bytes."""
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        st = p.lstat()
        h.update(f"{p.relative_to(path)}|{st.st_mode}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        if p.is_file():
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log: Path
    ca: Path | None = None  # the CA a TLS server's certificate is checked against

    @property
    def verify(self) -> ssl.SSLContext | bool:
        return ssl.create_default_context(cafile=str(self.ca)) if self.ca else True

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, verify=self.verify, **kw)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def serving(run_dir: Path, *args: str, log_dir: Path, ca: Path | None = None):
    """A ``python -m pipeline serve`` process on a free port, ready; stopped by PID (and its tree) on exit."""
    port = free_port()
    log = log_dir / f"serve-{port}.log"
    argv = [sys.executable, "-m", "pipeline", "serve", str(run_dir), "--port", str(port), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with log.open("wb") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
    server = Server(proc, f"{'https' if ca else 'http'}://127.0.0.1:{port}", log, ca)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"server exited with {proc.returncode}: {server.log_text()[-3000:]}"
            assert time.monotonic() < deadline, f"server not ready in 180 s: {server.log_text()[-3000:]}"
            try:
                if httpx.get(f"{server.url}/readyz", timeout=2, verify=server.verify).status_code == 200:
                    break
            except (httpx.HTTPError, OSError):  # not listening yet (or, with TLS, its CA not written yet)
                pass
            time.sleep(0.2)
        yield server
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server (a uvicorn supervisor stops its own workers), then its whole tree, forcibly if need be.

    The supervisor first: stopping the workers first would make it start new ones.
    """
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
    stop_trees([proc.pid], timeout_s=20, reap=proc.poll)
    proc.wait(timeout=10)


def _session_alive(sid: int) -> list[int]:
    out = []
    for pid in all_pids():
        with contextlib.suppress(OSError):
            if os.getsid(pid) == sid and alive(pid):
                out.append(pid)
    return out


def _session_gone(sid: int, timeout_s: float = 20) -> list[int]:
    """The session's live processes once they are gone or ``timeout_s`` passed (a loaded machine reaps slowly)."""
    deadline = time.monotonic() + timeout_s
    while (left := _session_alive(sid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def _predict_csv(run_dir, path, tmp_path, **kw) -> pd.DataFrame:
    out = tmp_path / f"pred-{time.monotonic_ns()}.csv"
    predict.predict_file(run_dir, path, out=out, **kw)
    return pd.read_csv(out)


# --------------------------------------------------------------------------- default tier


def test_a_worker_whose_parent_already_died_exits_before_loading(monkeypatch):
    """The parent-death signal is asked for inside the worker; a parent SIGKILLed before that sends none, so the
    worker checks it still has the parent that started it (otherwise it would serve on, orphaned)."""
    import pipeline.serve as serve

    settings = json.dumps({"run_dir": "/nonexistent", "which": "student", "engine": "onnx"})
    monkeypatch.setattr(serve, "create_app", lambda *a, **k: pytest.fail("an orphaned worker loaded the models"))
    monkeypatch.setattr(serve.processes, "_die_with_parent", lambda: None)  # not on the test process itself
    monkeypatch.setenv(serve.SETTINGS_ENV, settings)
    monkeypatch.setenv(serve.PARENT_ENV, str(os.getppid() + 1_000_000))  # not our parent
    if serve.processes._PRCTL is None:
        pytest.skip("no parent-death signal on this platform")
    with pytest.raises(SystemExit):
        serve.app_from_env()
    monkeypatch.setenv(serve.PARENT_ENV, str(os.getppid()))  # the control: with its parent alive it loads
    monkeypatch.setattr(serve, "create_app", lambda *a, **k: "app")
    assert serve.app_from_env() == "app"


def test_the_workers_scratch_folder_sweeps_only_what_dead_servers_left(tmp_path, monkeypatch):
    """A server killed with -9 cannot remove its workers' metrics folder; the next one removes it, and nothing else."""
    import pipeline.serve as serve

    monkeypatch.setattr(serve.tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs (reaped)
    left = tmp_path / f"{serve.METRICS_PREFIX}{dead.pid}-abc"
    live = tmp_path / f"{serve.METRICS_PREFIX}{os.getpid()}-def"  # a running server's: the control, kept
    other = tmp_path / f"{serve.METRICS_PREFIX}notapid"
    for folder in (left, live, other):
        folder.mkdir()
        (folder / "counter_1.db").write_bytes(b"x")
    new = Path(serve.metrics_scratch())
    assert not left.exists() and live.exists() and other.exists()
    assert new.parent == tmp_path and new.name.startswith(f"{serve.METRICS_PREFIX}{os.getpid()}-")


def test_tree_digest_sees_what_a_server_could_leave(tmp_path):
    """The read-only check's controls: a hidden temp file, a folder touched, equal bytes rewritten; and its null."""
    folder, f = tmp_path / "a", tmp_path / "a" / "f.json"
    folder.mkdir()
    f.write_text("{}")
    times = {p: (p.stat().st_atime_ns, p.stat().st_mtime_ns) for p in (folder, f)}
    before = tree_digest(tmp_path)
    (folder / ".f.json.tmp").write_text("")
    assert tree_digest(tmp_path) != before
    (folder / ".f.json.tmp").unlink()
    os.utime(folder, ns=(times[folder][0], times[folder][1] + 1))  # a create-and-delete leaves the folder's mtime
    assert tree_digest(tmp_path) != before
    os.utime(folder, ns=times[folder])
    assert tree_digest(tmp_path) == before  # null: the same tree again
    f.write_text("{}")
    os.utime(f, ns=(times[f][0], times[f][1] + 1_000_000_000))  # the same bytes written again, a second later
    assert tree_digest(tmp_path) != before


def test_serve_refuses_an_incomplete_or_damaged_run_with_exit_2(teacher_run, tmp_path, capsys):
    """Start-up verifies as predict does: nothing listens when the run is incomplete or edited."""
    port = str(free_port())
    assert main(["serve", str(teacher_run), "--port", port]) == 2  # students: the run has no distill stage
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "incomplete" in err and "distill" in err, err
    damaged = tmp_path / "run"
    shutil.copytree(teacher_run, damaged)
    weights = damaged / "models" / "regressor.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert main(["serve", str(damaged), "--model", "teacher", "--engine", "torch", "--port", port]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "models/regressor.safetensors" in err, err
    short = tmp_path / "key"
    short.write_text("abc\n")
    assert main(["serve", str(teacher_run), "--api-key-file", str(short), "--port", port]) == 2
    assert "at least 16 characters" in capsys.readouterr().err


def test_http_predictions_equal_predict_and_bad_input_is_a_4xx(teacher_run, inputs, tmp_path):
    """One real server process: JSON and CSV bodies give predict's exact numbers; the server never writes the run."""
    before = tree_digest(teacher_run)
    args = ("--model", "teacher", "--engine", "torch")
    with serving(teacher_run, *args, log_dir=tmp_path) as server, server.client() as c:
        got = c.post("/predict/regressor", json={"rows": inputs["rows"]})
        assert got.status_code == 200, got.text
        expected = _predict_csv(teacher_run, inputs["csv"], tmp_path, which="teacher")["prediction"].to_numpy()
        np.testing.assert_array_equal(np.asarray(got.json()["predictions"]), expected)  # bit for bit
        as_csv = c.post("/predict/regressor", content=inputs["csv"].read_bytes(), headers={"content-type": "text/csv"})
        np.testing.assert_array_equal(np.asarray(as_csv.json()["predictions"]), expected)
        cnn = c.post("/predict/cnn", json={"images": inputs["images"]}).json()
        frame = _predict_csv(teacher_run, inputs["npz"], tmp_path, which="teacher")
        probs = frame[[f"p_{k}" for k in range(10)]].to_numpy().astype(np.float32)  # float32 as written
        np.testing.assert_array_equal(np.asarray(cnn["probabilities"], dtype=np.float32), probs)
        assert cnn["predictions"] == frame["label"].tolist()
        bad = c.post("/predict/regressor", json={"rows": [{**inputs["rows"][0], "bmi": "high"}]})
        assert bad.status_code == 422 and "'bmi'" in bad.json()["error"] and "rows[0]" in bad.json()["error"]
        assert c.post("/predict/regressor", json={"rows": inputs["rows"][:1]}).status_code == 200
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=30) == 0
    assert tree_digest(teacher_run) == before  # serving wrote nothing in the run directory
    lines = [json.loads(line) for line in server.log_text().splitlines() if line.startswith('{"event":"request"')]
    assert {(x["endpoint"], x["status"]) for x in lines} >= {("/predict/{model}", 200), ("/predict/{model}", 422)}
    assert "high" not in server.log_text()  # the access log never carries input values


def test_a_bug_is_a_500_that_logs_no_input_and_request_ids_are_kept_or_replaced(
    teacher_run, inputs, monkeypatch, caplog
):
    """In process (the one path no client can trigger): an exception in a handler answers 500 with the request id
    only, and the log names where it happened but never the exception's message, which could quote inputs."""
    from pipeline.serve_app import ServeSettings, create_app

    app = create_app(ServeSettings(run_dir=str(teacher_run), which="teacher", engine="torch"))

    value = inputs["rows"][0]["age"]  # what the bug's message quotes

    def broken(*args, **kwargs):
        raise RuntimeError(f"row holds {value!r}")

    async def calls() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://serve") as c:
            ok = await c.get("/healthz", headers={"X-Request-ID": "abc-123"})
            odd = await c.get("/healthz", headers={"X-Request-ID": "x" * 65})
            monkeypatch.setattr(predict_model, "predict_raw", broken)
            bug = await c.post("/predict/regressor", json={"rows": inputs["rows"][:1]})
            return [ok, odd, bug]

    import asyncio

    with caplog.at_level("INFO"):
        ok, odd, bug = asyncio.run(calls())
    assert ok.headers["x-request-id"] == "abc-123"
    assert re.fullmatch(r"[0-9a-f]{32}", odd.headers["x-request-id"])  # not an id: replaced
    assert bug.status_code == 500 and bug.json()["request_id"] in bug.json()["error"]
    assert repr(value) not in bug.text and repr(value) not in caplog.text
    assert "RuntimeError" in caplog.text and "serve_app.py" in caplog.text  # where, not what


# --------------------------------------------------------------------------- slow tier: the whole contract


@pytest.mark.slow
@pytest.mark.parametrize("which", ["student", "teacher"])
def test_both_engines_give_predicts_numbers(full_run, inputs, tmp_path, which):
    """torch: bit-identical to predict; onnx: identical to predict --engine onnx and within 1e-4 of torch."""
    before = tree_digest(full_run)
    served = {}
    for engine in ("torch", "onnx"):
        with serving(full_run, "--model", which, "--engine", engine, log_dir=tmp_path) as server, server.client() as c:
            reg = c.post("/predict/regressor", json={"rows": inputs["rows"]}).json()
            cnn = c.post("/predict/cnn", json={"images": inputs["images"]}).json()
            assert reg["engine"] == engine and reg["which"] == which
            served[engine] = (np.asarray(reg["predictions"]), np.asarray(cnn["probabilities"]))
            reg_file = _predict_csv(full_run, inputs["csv"], tmp_path, which=which, engine=engine)["prediction"]
            cnn_file = _predict_csv(full_run, inputs["npz"], tmp_path, which=which, engine=engine)
            if engine == "torch":  # float64, bit for bit
                np.testing.assert_array_equal(served[engine][0], reg_file.to_numpy())
            else:  # the graph answers float32, written by predict as the shortest float32 repr
                np.testing.assert_array_equal(
                    served[engine][0].astype(np.float32), reg_file.to_numpy().astype(np.float32)
                )
            probs = cnn_file[[f"p_{k}" for k in range(10)]].to_numpy().astype(np.float32)  # float32 as written
            np.testing.assert_array_equal(served[engine][1].astype(np.float32), probs)
            manifest = json.loads((full_run / "manifest.json").read_text())
            folder = "students" if which == "student" else "models"
            assert reg["model_sha256"] == manifest["artifacts"][f"{folder}/regressor.safetensors"]["sha256"]
    for k in range(2):
        assert float(np.max(np.abs(served["onnx"][k] - served["torch"][k]))) <= 1e-4
    assert tree_digest(full_run) == before


def _row(inputs, **change) -> dict:
    return {**inputs["rows"][0], **change}


def hostile_cases(inputs) -> list[tuple[str, str, dict, bytes, int, str]]:
    """(name, path, headers, body, expected status, a fragment the one-line error must contain)."""
    img = np.asarray(inputs["images"][0])

    def literal(column: str, text: str) -> str:  # a JSON body whose value is a bare literal (NaN, 1e999)
        return json.dumps({"rows": [_row(inputs, **{column: "@@"})]}).replace('"@@"', text)

    cases = [
        (
            "missing column",
            "/predict/regressor",
            JSON_TYPE,
            json.dumps({"rows": [{k: v for k, v in _row(inputs).items() if k != "bmi"}]}),
            422,
            "'bmi'",
        ),
        (
            "extra column",
            "/predict/regressor",
            JSON_TYPE,
            json.dumps({"rows": [_row(inputs, target=1.0)]}),
            422,
            "'target'",
        ),
        (
            "string value",
            "/predict/regressor",
            JSON_TYPE,
            json.dumps({"rows": [_row(inputs), _row(inputs, s3="high")]}),
            422,
            "rows[1]['s3']",
        ),
        (
            "boolean value",
            "/predict/regressor",
            JSON_TYPE,
            json.dumps({"rows": [_row(inputs, age=True)]}),
            422,
            "rows[0]['age']",
        ),
        (
            "nested value",
            "/predict/regressor",
            JSON_TYPE,
            json.dumps({"rows": [_row(inputs, age=[1.0])]}),
            422,
            "rows[0]['age']",
        ),
        (
            "null value",
            "/predict/regressor",
            JSON_TYPE,
            json.dumps({"rows": [_row(inputs, bp=None)]}),
            422,
            "rows[0]['bp']",
        ),
        ("NaN literal", "/predict/regressor", JSON_TYPE, literal("s5", "NaN"), 422, "rows[0]['s5'] is NaN"),
        ("Infinity literal", "/predict/regressor", JSON_TYPE, literal("s5", "-Infinity"), 422, "rows[0]['s5']"),
        ("1e999", "/predict/regressor", JSON_TYPE, literal("s1", "1e999"), 422, "rows[0]['s1'] is inf"),
        ("huge integer", "/predict/regressor", JSON_TYPE, literal("s1", "9" * 5000), 422, "rows[0]['s1']"),
        ("1e308", "/predict/regressor", JSON_TYPE, json.dumps({"rows": [_row(inputs, s2=1e308)]}), 422, "'s2'"),
        ("row not an object", "/predict/regressor", JSON_TYPE, json.dumps({"rows": [[1, 2, 3]]}), 422, "rows[0]"),
        ("rows not a list", "/predict/regressor", JSON_TYPE, json.dumps({"rows": {"age": 1}}), 422, "'rows'"),
        ("empty rows", "/predict/regressor", JSON_TYPE, json.dumps({"rows": []}), 422, "'rows' is empty"),
        ("unknown field", "/predict/regressor", JSON_TYPE, json.dumps({"rows": [_row(inputs)], "x": 1}), 422, "'x'"),
        ("body not an object", "/predict/regressor", JSON_TYPE, "[1, 2]", 422, "JSON object"),
        (
            "images to the regressor",
            "/predict/regressor",
            JSON_TYPE,
            json.dumps({"images": inputs["images"][:1]}),
            422,
            "'images'",
        ),
        (
            "too many rows",
            "/predict/regressor",
            JSON_TYPE,
            json.dumps({"rows": [_row(inputs)] * 51}),
            413,
            "--max-rows",
        ),
        (
            "huge column name",
            "/predict/regressor",
            JSON_TYPE,
            json.dumps({"rows": [{"a" * 100_000: 1.0}]}),
            422,
            "100000-character",
        ),
        ("empty body", "/predict/regressor", JSON_TYPE, b"", 400, "empty"),
        ("invalid JSON", "/predict/regressor", JSON_TYPE, b'{"rows": [', 400, "not valid JSON"),
        (
            "deeply nested JSON",
            "/predict/regressor",
            JSON_TYPE,
            b"[" * 100_000 + b"]" * 100_000,
            400,
            "nested too deeply",
        ),
        ("huge JSON", "/predict/regressor", JSON_TYPE, b"[" + b"0," * 300_000 + b"0]", 413, "limit of"),
        ("invalid UTF-8", "/predict/regressor", JSON_TYPE, b'{"rows": [{"age": "\xff\xfe"}]}', 400, "UTF-8"),
        (
            "wrong content type",
            "/predict/regressor",
            {"content-type": "text/plain"},
            json.dumps({"rows": [_row(inputs)]}),
            415,
            "text/plain",
        ),
        ("no content type", "/predict/regressor", {}, json.dumps({"rows": [_row(inputs)]}), 415, "Content-Type"),
        (
            "latin-1 charset",
            "/predict/regressor",
            {"content-type": "application/json; charset=latin-1"},
            b"{}",
            415,
            "charset",
        ),
        ("unknown model", "/predict/forest", JSON_TYPE, b"{}", 404, "'forest'"),
        (
            "csv ragged row",
            "/predict/regressor",
            {"content-type": "text/csv"},
            (",".join(FEATURES) + "\n" + ",".join(["1"] * 10) + "\n" + ",".join(["1"] * 11) + "\n").encode(),
            422,
            "line 3",
        ),
        (
            "csv short row",
            "/predict/regressor",
            {"content-type": "text/csv"},
            (",".join(FEATURES) + "\n" + ",".join(["1"] * 9) + "\n").encode(),
            422,
            "line 2",
        ),
        (
            "csv string",
            "/predict/regressor",
            {"content-type": "text/csv"},
            (
                ",".join(FEATURES)
                + "\n"
                + ",".join(["1"] * 10)
                + "\n"
                + ",".join(["1"] * 6 + ["high"] + ["1"] * 3)
                + "\n"
            ).encode(),
            422,
            "'s3'",
        ),
        (
            "csv empty cell",
            "/predict/regressor",
            {"content-type": "text/csv"},
            (",".join(FEATURES) + "\n" + ",".join(["1"] * 9 + [""]) + "\n").encode(),
            422,
            "'s6'",
        ),
        (
            "csv missing column",
            "/predict/regressor",
            {"content-type": "text/csv"},
            (",".join(FEATURES[1:]) + "\n" + ",".join(["1"] * 9) + "\n").encode(),
            422,
            "'age'",
        ),
        (
            "csv duplicate column",
            "/predict/regressor",
            {"content-type": "text/csv"},
            (",".join(FEATURES + ["age"]) + "\n" + ",".join(["1"] * 11) + "\n").encode(),
            422,
            "twice",
        ),
        (
            "csv header only",
            "/predict/regressor",
            {"content-type": "text/csv"},
            (",".join(FEATURES) + "\n").encode(),
            422,
            "no rows",
        ),
        ("csv to the cnn", "/predict/cnn", {"content-type": "text/csv"}, b"a\n1\n", 415, "application/json"),
        (
            "image too big",
            "/predict/cnn",
            JSON_TYPE,
            json.dumps({"images": np.zeros((2, 16, 16)).tolist()}),
            422,
            "(N, 1, 8, 8)",
        ),
        (
            "three channels",
            "/predict/cnn",
            JSON_TYPE,
            json.dumps({"images": np.zeros((2, 3, 8, 8)).tolist()}),
            422,
            "1 channel(s)",
        ),
        ("flat image", "/predict/cnn", JSON_TYPE, json.dumps({"images": [list(range(64))]}), 422, "shape"),
        (
            "ragged image",
            "/predict/cnn",
            JSON_TYPE,
            json.dumps({"images": [img.tolist(), img[:7].tolist()]}),
            422,
            "images[1]",
        ),
        ("string pixel", "/predict/cnn", JSON_TYPE, json.dumps({"images": [[["a"] * 8] * 8]}), 422, "strings"),
        (
            "null pixel",
            "/predict/cnn",
            JSON_TYPE,
            json.dumps({"images": [img.tolist(), [[None] + [0.0] * 7] + img[1:].tolist()]}),
            422,
            "image 1",
        ),
        (
            "object pixel",
            "/predict/cnn",
            JSON_TYPE,
            json.dumps({"images": [[[{"a": 1}] + [0.0] * 7] + img[1:].tolist()]}),
            422,
            "images[0][0][0]",
        ),
        (
            "NaN pixel",
            "/predict/cnn",
            JSON_TYPE,
            json.dumps({"images": [img.tolist(), np.where(img == img.max(), np.nan, img).tolist()]}),
            422,
            "images[1]",
        ),
        (
            "1e308 pixel",
            "/predict/cnn",
            JSON_TYPE,
            json.dumps({"images": [np.full((8, 8), 1e308).tolist()]}),
            422,
            "image 0",
        ),
        ("rows to the cnn", "/predict/cnn", JSON_TYPE, json.dumps({"rows": [_row(inputs)]}), 422, "'rows'"),
        (
            "explain: too many rows",
            "/explain/regressor",
            JSON_TYPE,
            json.dumps({"rows": [_row(inputs)] * 5}),
            413,
            "--explain-max-rows",
        ),
    ]
    return [(n, p, h, b.encode() if isinstance(b, str) else b, s, f) for n, p, h, b, s, f in cases]


@pytest.mark.slow
def test_every_hostile_request_gets_its_4xx_and_the_server_stays_up(full_run, inputs, tmp_path):
    before = tree_digest(full_run)
    limits = ("--max-rows", "50", "--max-body-bytes", "500000", "--explain-max-rows", "4")
    with serving(full_run, *limits, log_dir=tmp_path) as server, server.client() as c:
        cases = hostile_cases(inputs)
        for name, path, headers, body, status, fragment in cases:
            r = c.post(path, content=body, headers=headers)
            error = r.json().get("error", "")
            assert r.status_code == status, (name, r.status_code, r.text[:300])
            assert fragment in error and "\n" not in error and r.headers["x-request-id"], (name, error)
        assert c.get("/predict/regressor").status_code == 405 and c.get("/nowhere").status_code == 404
        for i in range(300):  # a few hundred more, on a kept-alive connection and on fresh ones
            name, path, headers, body, status, _ = cases[i % len(cases)]
            if i % 3:
                assert c.post(path, content=body, headers=headers).status_code == status, name
            else:
                with server.client() as fresh:
                    assert fresh.post(path, content=body, headers=headers).status_code == status, name
        ok = c.post("/predict/regressor", json={"rows": inputs["rows"][:3]})
        assert ok.status_code == 200 and len(ok.json()["predictions"]) == 3
        from prometheus_client.parser import text_string_to_metric_families

        families = {f.name: f for f in text_string_to_metric_families(c.get("/metrics").text)}
        by_status = {s.labels["status"]: s.value for s in families["serve_errors"].samples if s.name.endswith("_total")}
        assert by_status["422"] >= 200 and by_status["413"] >= 1 and "500" not in by_status
        rows = sum(s.value for s in families["serve_rows"].samples if s.labels.get("model") == "regressor")
        assert rows >= 3
        assert any(s.name == "serve_request_seconds_bucket" for s in families["serve_request_seconds"].samples)
    log = server.log_text()
    assert '"status":5' not in log and "Traceback" not in log
    assert "high" not in log and "1e+308" not in log  # input values never reach the log
    assert tree_digest(full_run) == before


@pytest.mark.slow
def test_metadata_explain_and_openapi(full_run, inputs, tmp_path):
    """/explain uses the run's recorded method and public background, matches predict --explain, is capped."""
    recorded = json.loads((full_run / "explain" / "metrics.json").read_text())["models"]
    with serving(full_run, "--engine", "torch", log_dir=tmp_path) as server, server.client() as c:
        meta = c.get("/metadata").json()
        assert meta["models"]["regressor"]["explanation"]["method"] == recorded["regressor"]["methods"]["shap"]
        assert meta["models"]["regressor"]["input_schema"]["columns"] == FEATURES
        assert meta["models"]["cnn"]["input_schema"]["image_shape"] == [1, 8, 8]
        assert meta["models"]["regressor"]["privacy"]["guarantee"] == "none"
        manifest = json.loads((full_run / "manifest.json").read_text())
        for rel, digest in meta["models"]["cnn"]["artifacts_loaded"].items():
            assert digest == (
                manifest["config"]["sha256"] if rel == "config.toml" else manifest["artifacts"][rel]["sha256"]
            )
        e = c.post("/explain/regressor", json={"rows": inputs["rows"][:5]}).json()
        assert e["method"] == recorded["regressor"]["methods"]["shap"] and e["additivity_max_abs_error"] < 1e-3
        values = np.asarray(e["shap_values"])
        np.testing.assert_allclose(np.asarray(e["base_values"]) + values.sum(1), e["predictions"], atol=1e-3)
        five = pd.read_csv(inputs["csv"]).iloc[:5]
        five.to_csv(tmp_path / "five.csv", index=False)
        predict.predict_file(full_run, tmp_path / "five.csv", out=tmp_path / "five_p.csv", explain=True, engine="torch")
        file_values = pd.read_csv(tmp_path / "five_p.shap.csv")[[f"shap_{f}" for f in FEATURES]].to_numpy()
        np.testing.assert_allclose(values, file_values, rtol=0, atol=1e-9)
        maps = c.post("/explain/cnn", json={"images": inputs["images"][:2]}).json()
        assert (
            np.asarray(maps["shap_values"]).shape == (2, 1, 8, 8)
            and maps["method"] == recorded["cnn"]["methods"]["shap"]
        )
        too_many = c.post("/explain/cnn", json={"images": inputs["images"][:12] + inputs["images"][:5]})
        assert too_many.status_code == 413 and "16" in too_many.json()["error"]
        schema = c.get("/openapi.json").json()
        assert {"/healthz", "/readyz", "/metadata", "/metrics", "/predict/{model}", "/explain/{model}"} <= set(
            schema["paths"]
        )
        assert set(schema["paths"]["/predict/{model}"]["post"]["requestBody"]["content"]) == {
            "application/json",
            "text/csv",
        }


@pytest.mark.slow
def test_api_key(full_run, inputs, tmp_path):
    key = "k" * 8 + "0123456789abcdef"
    (tmp_path / "key").write_text(key + "\n")
    with serving(full_run, "--api-key-file", str(tmp_path / "key"), log_dir=tmp_path) as server, server.client() as c:
        body = {"rows": inputs["rows"][:2]}
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"X-API-Key": key[:-1]},
            {"X-API-Key": key + "x"},
            {"Authorization": key},
        ):
            r = c.post("/predict/regressor", json=body, headers=headers)
            assert r.status_code == 401 and "API key" in r.json()["error"] and r.headers["www-authenticate"] == "Bearer"
        for path in ("/metadata", "/metrics"):
            assert c.get(path).status_code == 401 and c.get(path, headers={"X-API-Key": key}).status_code == 200
        assert c.post("/predict/regressor", json=body, headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert c.post("/predict/regressor", json=body, headers={"X-API-Key": key}).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200  # probes stay open
    assert key not in server.log_text()


@pytest.mark.slow
def test_sigterm_lets_an_in_flight_request_finish(full_run, inputs, tmp_path):
    """A request still uploading its body when SIGTERM arrives gets its answer; new connections are refused; exit 0."""
    body = json.dumps({"rows": inputs["rows"][:20]}).encode()
    half = len(body) // 2
    sent_first, go_on = threading.Event(), threading.Event()
    result: dict = {}

    def chunks():
        yield body[:half]
        sent_first.set()
        go_on.wait(30)
        yield body[half:]

    with serving(full_run, log_dir=tmp_path) as server:

        def slow_client() -> None:
            with server.client() as c:
                result["response"] = c.post("/predict/regressor", content=chunks(), headers=JSON_TYPE)

        thread = threading.Thread(target=slow_client)
        thread.start()
        assert sent_first.wait(30)
        time.sleep(0.5)  # the server has the request's head and half its body
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.url}/healthz", timeout=5)  # no longer listening
        assert server.proc.poll() is None  # but still alive: one request is in flight
        go_on.set()
        thread.join(30)
        assert server.proc.wait(timeout=30) == 0
    r = result["response"]
    assert r.status_code == 200 and len(r.json()["predictions"]) == 20
    assert "server stopped (SIGTERM)" in server.log_text()


@pytest.mark.slow
def test_two_workers_and_tls(full_run, inputs, tmp_path):
    """--workers 2 behind a demo certificate from federated.launch.tls: both workers answer, metrics add up, all stop."""
    certs = tmp_path / "certs"
    args = ("--workers", "2", "--demo-tls", str(certs))
    with serving(full_run, *args, log_dir=tmp_path, ca=certs / "ca.pem") as server:
        pids = set()
        deadline = time.monotonic() + 120
        while len(pids) < 2 and time.monotonic() < deadline:  # a new connection each time: either worker answers
            pids.add(httpx.get(f"{server.url}/readyz", verify=server.verify, timeout=5).json()["pid"])
        assert len(pids) == 2 and server.proc.pid not in pids
        with server.client() as c:
            for _ in range(10):
                assert c.post("/predict/regressor", json={"rows": inputs["rows"][:4]}).status_code == 200
            text = c.get("/metrics").text
        total = sum(
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith('serve_rows_total{endpoint="/predict/{model}",model="regressor"')
        )
        assert total == 40  # both workers' counts, from prometheus-client's multiprocess mode
        with pytest.raises(httpx.HTTPError):
            httpx.get(server.url.replace("https", "http") + "/healthz", timeout=5)  # plain HTTP is not served
        server.proc.kill()  # SIGKILL the supervisor: its workers must not outlive it (parent-death signal)
        server.proc.wait(timeout=10)
        deadline = time.monotonic() + 20
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(alive(pid) for pid in pids)
    assert (
        _session_gone(server.proc.pid) == []
    )  # nothing of the server's session is left (the resource tracker follows)


@pytest.mark.slow
def test_a_worker_that_finds_the_run_changed_stops_the_server(full_run, tmp_path):
    """The parent verified the run; if it changes before a worker loads it, the server stops with exit 2 (no restart loop)."""
    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    argv = [sys.executable, "-m", "pipeline", "serve", str(run), "--workers", "2", "--port", str(free_port())]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env, start_new_session=True
    )
    try:
        line = proc.stdout.readline()  # printed once the parent verified the run, before the workers start
        assert line.startswith("serving run"), line
        manifest = run / "manifest.json"
        manifest.write_text(json.dumps(json.loads(manifest.read_text()), indent=1))  # same content, another SHA-256
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 2, out[-3000:]
        assert "changed after the server verified it" in out and "error: a worker could not load run" in out
    finally:
        _stop(proc)
    assert _session_gone(proc.pid) == []


# --------------------------------------------------------------------------- README


def _readme_serve_commands() -> tuple[str, list[str]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Serve", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", section, flags=re.S)
    lines = [
        line
        for b in blocks
        for line in b.replace("\\\n", " ").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    serve = [line for line in lines if line.startswith("python -m pipeline serve")]
    curls = [line for line in lines if line.startswith("curl ")]
    assert len(serve) == 1 and len(curls) >= 2, lines
    return serve[0], curls


@pytest.mark.slow
def test_readme_serve_section_runs_as_written(full_run, tmp_path):
    """Every command of the README's Serve section: the server command, then each curl, answered as documented."""
    serve, curls = _readme_serve_commands()
    argv = shlex.split(serve)
    assert argv[:4] == ["python", "-m", "pipeline", "serve"]
    args = [a for a in argv[5:]]  # after RUN: the README's own options
    with serving(full_run, *args, log_dir=tmp_path) as server:
        port = server.url.rsplit(":", 1)[1]
        for curl in curls:
            cmd = curl.replace("localhost:8000", f"localhost:{port}").replace("127.0.0.1:8000", f"127.0.0.1:{port}")
            out = subprocess.run(
                shlex.split(cmd) + ["--fail-with-body", "-sS"], capture_output=True, text=True, cwd=ROOT, timeout=60
            )
            assert out.returncode == 0, (curl, out.stdout, out.stderr)
            answer = json.loads(out.stdout)
            assert "predictions" in answer and answer["rows"] == len(answer["predictions"]), answer
