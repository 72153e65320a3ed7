"""Independent stages in forked workers (pipeline.stage_workers): the same outputs as one process, failures
recorded as in one process, and no worker outliving the runner."""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from auditml_core import config as config_mod
from auditml_core.config import StagesConfig, load_config
from auditml_core.errors import ConfigError
from auditml_core.models import MODELS
from auditml_core.runtime import Runtime
from pipeline import runner, stage_workers
from pipeline.rundir import RunDir
from tests.tiny import ALL, AUDIT, DISTILL, EXPLAIN, TRAIN

ROOT = Path(__file__).resolve().parents[2]
_TIMING = re.compile(r"seconds|_ms$|_s$|latency")


@pytest.fixture(autouse=True)
def single_threaded(monkeypatch):
    """Workers are forked only from a single-threaded runner; a thread an earlier test left in this pytest
    process (a server, a progress monitor) must not turn these tests into one-process runs."""
    monkeypatch.setattr(stage_workers.threading, "active_count", lambda: 1)


def _with_workers(cfg, n: int):
    return dataclasses.replace(cfg, stages=StagesConfig(workers=n))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run with its data and models recorded (the inputs every independent stage reads)."""
    cfg = load_config(None, TRAIN + EXPLAIN + DISTILL + AUDIT)
    run = RunDir.create(
        tmp_path_factory.mktemp("workers") / "runs", config_toml=config_mod.to_toml(cfg), command=["t"], device="cpu"
    )
    runner.run_stages(_with_workers(cfg, 1), run, ["data", "train"])
    return cfg, run.path


def _copy(trained, dest: Path) -> RunDir:
    shutil.copytree(trained[1], dest)
    return RunDir.open(dest)


def _untimed(node):
    if isinstance(node, dict):
        return {k: _untimed(v) for k, v in node.items() if not _TIMING.search(k)}
    if isinstance(node, list):
        return [_untimed(v) for v in node]
    return node


def _same_outputs(a: RunDir, b: RunDir, stages: list[str]) -> int:
    """Every file the stages wrote is equal in both runs (JSON: apart from wall-clock timings); how many.

    Training checkpoints are left out: intermediates, written every ``train.checkpoint_every_s`` seconds, whose
    training history holds each epoch's seconds (the trained models and their records are compared)."""

    def files(run: RunDir) -> list[str]:
        recorded = run.manifest["artifacts"].items()
        return sorted(rel for rel, rec in recorded if rec.get("stage") in stages and not rel.startswith("checkpoints/"))

    assert files(a) == files(b)
    for rel in files(a):
        left, right = a.read(rel), b.read(rel)
        if rel.endswith(".json"):
            assert _untimed(json.loads(left)) == _untimed(json.loads(right)), rel
        else:
            assert left == right, rel
    return len(files(a))


# --------------------------------------------------------------------------- the decision


def test_independent_stages_stop_at_the_first_stage_that_reads_one_of_them():
    order = list(runner.STAGES)
    assert runner.independent_stages(order) == ["data"]  # train reads data
    assert runner.independent_stages(order[2:]) == ["evaluate", "explain", "distill", "audit"]  # report reads them
    assert runner.independent_stages(["explain", "report"]) == ["explain"]
    assert runner.independent_stages(["report"]) == ["report"]


def test_workers_follow_the_setting_the_cpus_and_cuda(monkeypatch):
    cfg = load_config(None, [])
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    assert stage_workers.workers(cfg, 4) == 3  # one per CPU
    assert stage_workers.workers(cfg, 2) == 2  # never more than the jobs
    assert stage_workers.workers(cfg, 1) == 1
    assert stage_workers.workers(_with_workers(cfg, 1), 4) == 1
    assert stage_workers.workers(_with_workers(cfg, 8), 4) == 4
    multi = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, processes=2))
    assert stage_workers.workers(multi, 4) == 1
    monkeypatch.setattr(stage_workers.threading, "active_count", lambda: 2)
    assert stage_workers.workers(cfg, 4) == 1  # fork copies one thread: another one's locks would stay held
    monkeypatch.setattr(stage_workers.threading, "active_count", lambda: 1)
    import torch

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert stage_workers.workers(cfg, 4) == 1  # a forked child cannot use the runner's CUDA context


def test_every_stage_in_parts_has_the_whole_contract():
    cfg = load_config(None, [])
    split = {name for name in runner.STAGES if hasattr(runner.stage_module(name), "parts")}
    assert split == {"train", "explain", "distill", "audit"}
    for name in split:
        module = runner.stage_module(name)
        assert callable(module.run_part) and callable(module.combine), name
        assert module.parts(cfg) == tuple(MODELS), name  # one per model, in the registry's order
    assert runner.stage_parts(load_config(None, ["audit.enabled=false"]), "audit") == (None,)  # one job: the record
    # One federation trains every model, and ranks train together: the train stage is then whole.
    assert runner.stage_parts(load_config(None, ["train.mode=federated"]), "train") == (None,)
    assert runner.stage_parts(load_config(None, ["train.processes=2"]), "train") == (None,)
    assert runner.IN_PARTS_HERE == ("train",)  # its parts checkpoint: never in a worker
    assert set(runner.LONGEST_FIRST) <= set(runner._jobs(cfg, ["evaluate", *sorted(split - {"train"})]))


def test_stages_workers_is_range_checked():
    with pytest.raises(ConfigError, match="stages.workers"):
        load_config(None, ["stages.workers=-1"])
    with pytest.raises(ConfigError, match="stages.workers"):
        load_config(None, ["stages.workers=65"])


# --------------------------------------------------------------------------- same outputs


def test_workers_write_what_one_process_writes(trained, tmp_path):
    """Evaluate and audit (the two cheap ones; the slow test below adds explain and distill) in two workers and
    in one process: the same files."""
    cfg, _ = trained
    one, two = _copy(trained, tmp_path / "one"), _copy(trained, tmp_path / "two")
    stages = ["evaluate", "audit"]
    outputs = runner.run_stages(_with_workers(cfg, 2), two, stages)  # first: see the test below
    runner.run_stages(_with_workers(cfg, 1), one, stages)
    assert _same_outputs(one, two, stages) >= 2
    assert not set(stages) & set(outputs)  # not read back for nothing: a later stage loads them when it needs them
    assert all(two.stage_status(s) == "complete" for s in stages)
    # the comparison can fail: the same stages under another root seed (other bootstrap and shadow draws) differ
    other = _copy(trained, tmp_path / "other")
    runner.run_stages(dataclasses.replace(_with_workers(cfg, 1), seed=cfg.seed + 1), other, stages)
    with pytest.raises(AssertionError):
        _same_outputs(one, other, stages)


@pytest.mark.slow  # explain and distill twice: ~40 CPU-s
def test_every_independent_stage_in_workers_writes_what_one_process_writes(trained, tmp_path):
    cfg, _ = trained
    one, four = _copy(trained, tmp_path / "one"), _copy(trained, tmp_path / "four")
    stages = ["evaluate", "explain", "distill", "audit"]
    # Workers first: a library's import-time warning, recorded by explain, shows once per process; the workers
    # start from this process as it is now, and so does the run after them (what they import stays theirs).
    runner.run_stages(_with_workers(cfg, 4), four, stages)
    runner.run_stages(_with_workers(cfg, 1), one, stages)
    assert _same_outputs(one, four, stages) >= 20  # figures, arrays, students, ONNX graphs, records


# --------------------------------------------------------------------------- failures


def test_a_failing_worker_fails_its_stage_and_starts_no_other(trained, tmp_path, monkeypatch):
    """Two workers for five jobs (audit and distill one per model, evaluate): the regressor's distillation fails
    (a user error) while the CNN's audit runs beside it. That audit finishes, but the audit's other part and the
    queued jobs never start: distill is failed with the error, audit as not finished, evaluate never begun; the
    error is raised as in one process."""
    cfg, _ = trained
    run = _copy(trained, tmp_path / "run")
    from pipeline import distill

    assert list(runner._jobs(cfg, ["evaluate", "distill", "audit"]))[:2] == ["audit:cnn", "distill:regressor"]

    def refuse(cfg, inputs, name, **kwargs):
        raise ConfigError(f"distill.fit.epochs: deliberately refused for the {name}")

    monkeypatch.setattr(distill, "run_part", refuse)
    with pytest.raises(ConfigError, match="deliberately refused for the regressor"):
        runner.run_stages(_with_workers(cfg, 2), run, ["evaluate", "distill", "audit"])
    run = RunDir.open(run.path)
    assert run.stage_status("distill") == "failed"
    assert "deliberately refused" in run.manifest["stages"]["distill"]["error"]
    assert run.stage_status("audit") == "failed"
    assert "not finished" in run.manifest["stages"]["audit"]["error"]
    assert not any(rel.startswith(("audit/", "students/")) for rel in run.manifest["artifacts"])  # nothing half-written
    assert "evaluate" not in run.manifest["stages"]  # queued behind the failure: never begun


def test_a_stage_in_parts_is_recorded_once_all_are_back_and_as_one_process_records_it(trained, tmp_path, caplog):
    """Audit alone, its two parts in two workers: one stage record, the seconds of both parts, the same files."""
    cfg, _ = trained
    one, two = _copy(trained, tmp_path / "one"), _copy(trained, tmp_path / "two")
    assert runner.stage_parts(cfg, "audit") == ("regressor", "cnn") and runner.stage_parts(cfg, "evaluate") == (None,)
    with caplog.at_level("INFO", logger="pipeline.runner"):
        runner.run_stages(_with_workers(cfg, 2), two, ["audit"])
    assert "stages audit: 2 jobs, 2 at once in worker processes" in caplog.text  # a stage alone, split
    runner.run_stages(_with_workers(cfg, 1), one, ["audit"])
    assert _same_outputs(one, two, ["audit"]) >= 3
    record = json.loads((two.path / "audit" / "membership_inference.json").read_text())
    assert set(record["models"]) == {"regressor", "cnn"}
    assert two.manifest["stages"]["audit"]["attempt"] == 1  # begun once, for its first part
    assert two.manifest["stages"]["audit"]["seconds"] >= sum(m["seconds"] for m in record["models"].values())


def test_a_bug_in_a_worker_keeps_its_traceback_and_a_dead_worker_is_named(trained, tmp_path, monkeypatch):
    cfg, _ = trained
    from pipeline import audit, evaluate

    def bug(*args, **kwargs):
        return {}["missing key"]

    original = evaluate.run
    monkeypatch.setattr(evaluate, "run", bug)
    run = _copy(trained, tmp_path / "bug")
    with pytest.raises(KeyError) as raised:
        runner.run_stages(_with_workers(cfg, 2), run, ["evaluate", "audit"])
    notes = "\n".join(getattr(raised.value, "__notes__", []))
    assert "in the worker process of stage 'evaluate'" in notes and ", in bug" in notes  # the worker's traceback
    assert RunDir.open(run.path).stage_status("evaluate") == "failed"

    monkeypatch.setattr(evaluate, "run", original)  # (not monkeypatch.undo(): it would drop single_threaded too)
    pytest_pid = os.getpid()

    def die(*args, **kwargs):
        assert os.getpid() != pytest_pid, "audit ran in this process, not in a worker"
        os._exit(3)  # dies without a word

    monkeypatch.setattr(audit, "run_part", die)
    run = _copy(trained, tmp_path / "dead")
    with pytest.raises(RuntimeError, match=r"the worker of stage 'audit' \((cnn|regressor)\) died \(exit code 3\)"):
        runner.run_stages(_with_workers(cfg, 2), run, ["evaluate", "audit"])
    assert RunDir.open(run.path).stage_status("audit") == "failed"


def test_stages_place_themselves_from_the_planned_architectures_as_from_the_trained_models(trained):
    """explain, distill and audit decide their device before every model is trained (the jobs started beside the
    training): from the planned architectures, which must give the decision the trained models give."""
    from auditml_core.teacher import planned_builders
    from pipeline import audit, distill, explain_stage, train

    cfg, path = trained
    run = RunDir.open(path)
    data, models = runner.load_recorded("data", run), runner.load_recorded("train", run).models
    from_trained = {name: models[name].build for name in MODELS}
    for module in (train, explain_stage, distill, audit):
        decided = module.device_placement(cfg, data, planned_builders(cfg, data))
        assert decided == module.device_placement(cfg, data, from_trained), module.__name__
        assert decided.stage_macs > 0
    # the comparison can fail: a wider CNN is other work
    wider = load_config(None, TRAIN + EXPLAIN + DISTILL + AUDIT + ["cnn.channels=[16]"])
    assert audit.device_placement(wider, data, planned_builders(wider, data)) != audit.device_placement(
        cfg, data, from_trained
    )


# --------------------------------------------------------------------------- training beside the workers

_EARLY = ["data", "train", "evaluate", "explain", "audit"]


def _fresh_run(tmp_path: Path, name: str) -> tuple[object, RunDir]:
    cfg = load_config(None, TRAIN + EXPLAIN + AUDIT)
    run = RunDir.create(tmp_path / name, config_toml=config_mod.to_toml(cfg), command=["t"], device="cpu")
    return cfg, run


def test_a_model_s_jobs_run_while_the_next_model_trains_and_write_what_one_process_writes(
    tmp_path, monkeypatch, caplog
):
    """The regressor's explain and audit start once it is trained, while the CNN trains in the runner: the CNN's
    training waits here until the regressor's explanation has begun in a worker (it never would have, before).
    Every file of every stage equals one process's."""
    from pipeline import explain_stage, train

    began = tmp_path / "regressor explained"
    explain_part, train_part = explain_stage.run_part, train.run_part

    def explain_and_say_so(cfg, inputs, name, **kwargs):
        if name == "regressor":
            began.write_text(",".join(sorted(inputs["train"].models)))  # the models trained when it began
        return explain_part(cfg, inputs, name, **kwargs)

    def train_cnn_after_it(cfg, inputs, name, **kwargs):
        if name == "cnn" and kwargs["runtime"] is not None and stage_workers._share is None:  # the runner's
            deadline = time.monotonic() + 60
            while not began.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert began.exists(), "the regressor's explain did not start while the CNN trained"
        return train_part(cfg, inputs, name, **kwargs)

    monkeypatch.setattr(explain_stage, "run_part", explain_and_say_so)
    monkeypatch.setattr(train, "run_part", train_cnn_after_it)
    cfg, two = _fresh_run(tmp_path, "two")
    with caplog.at_level("INFO", logger="pipeline.runner"):
        runner.run_stages(_with_workers(cfg, 2), two, _EARLY)
    assert "regressor jobs during train" in caplog.text
    assert began.read_text() == "regressor"  # it saw the train stage of the models trained so far
    began.unlink()
    _, one = _fresh_run(tmp_path, "one")
    monkeypatch.setattr(train, "run_part", train_part)  # one process: nothing can start beside it
    runner.run_stages(_with_workers(cfg, 1), one, _EARLY)
    assert _same_outputs(one, two, _EARLY[1:]) >= 10
    assert two.manifest["stages"]["train"]["status"] == "complete" and two.manifest["stages"]["train"]["attempt"] == 1


def test_a_failed_training_stops_the_jobs_started_beside_it(tmp_path, monkeypatch):
    """The CNN's training fails while the regressor's jobs run: train is failed with the error, the stages begun
    early are 'not finished' with nothing written, the rest never begun, and no worker is left."""
    from pipeline import train

    train_part = train.run_part

    def refuse_the_cnn(cfg, inputs, name, **kwargs):
        if name == "cnn":
            raise ConfigError("cnn.fit.lr: deliberately refused")
        return train_part(cfg, inputs, name, **kwargs)

    monkeypatch.setattr(train, "run_part", refuse_the_cnn)
    cfg, run = _fresh_run(tmp_path, "run")
    before = set(_children(os.getpid()))  # another test's (none expected)
    with pytest.raises(ConfigError, match="deliberately refused"):
        runner.run_stages(_with_workers(cfg, 2), run, _EARLY)
    stages = RunDir.open(run.path).manifest["stages"]
    assert stages["train"]["status"] == "failed" and "deliberately refused" in stages["train"]["error"]
    for name in ("explain", "audit"):  # the regressor's parts began beside the CNN's training
        assert stages[name]["status"] == "failed", name
        assert "not finished: the run stopped at the failed stage 'train'" in stages[name]["error"]
    assert "evaluate" not in stages  # needs every model: never begun
    assert not any(rel.startswith(("explain/", "audit/", "models/")) for rel in run.manifest["artifacts"])
    assert _gone(sorted(set(_children(os.getpid())) - before), within=5.0)


def test_a_failing_early_job_fails_its_stage_once_training_is_recorded(tmp_path, monkeypatch):
    """The regressor's explanation fails in its worker while the CNN trains: training completes and is recorded,
    explain is failed with the error, the audit's regressor part (queued behind it in the same worker) and every
    CNN job never run, and the error is raised as in one process."""
    from pipeline import explain_stage

    def refuse(cfg, inputs, name, **kwargs):
        raise ConfigError(f"explain.n_rows: deliberately refused for the {name}")

    monkeypatch.setattr(explain_stage, "run_part", refuse)
    cfg, run = _fresh_run(tmp_path, "run")
    with pytest.raises(ConfigError, match="deliberately refused for the regressor"):
        runner.run_stages(_with_workers(cfg, 2), run, _EARLY)
    stages = RunDir.open(run.path).manifest["stages"]
    assert stages["train"]["status"] == "complete"
    assert stages["explain"]["status"] == "failed" and "deliberately refused" in stages["explain"]["error"]
    assert stages["audit"]["status"] == "failed" and "not finished" in stages["audit"]["error"]
    assert "evaluate" not in stages
    assert not any(rel.startswith(("explain/", "audit/")) for rel in run.manifest["artifacts"])


def test_the_next_stage_prepares_on_the_cpu_the_last_jobs_leave_idle(trained, tmp_path, monkeypatch):
    """The report's imports (WeasyPrint: ~0.7 s) run in the runner once every job of the group before it has
    started and a worker slot is free, once, before the report itself."""
    from pipeline import report

    cfg, _ = trained
    run = _copy(trained, tmp_path / "run")
    calls = []
    monkeypatch.setattr(report, "prepare", lambda cfg: calls.append(sorted(RunDir.open(run.path).manifest["stages"])))
    report_run = report.run
    monkeypatch.setattr(report, "run", lambda *a, **k: calls.append("report") or report_run(*a, **k))
    runner.run_stages(_with_workers(cfg, 2), run, ["evaluate", "explain", "audit", "report"])
    assert len(calls) == 2 and calls[1] == "report", calls
    assert {"evaluate", "explain", "audit"} <= set(calls[0]) and "report" not in calls[0]  # the group begun, not it


def test_a_failing_prepare_fails_no_stage(trained, tmp_path, monkeypatch):
    # A prepare that fails (an import) leaves the group's stages alone: the stage meets the problem again itself.
    from pipeline import report

    cfg, _ = trained
    run = _copy(trained, tmp_path / "run")
    monkeypatch.setattr(report, "prepare", lambda cfg: 1 / 0)
    runner.run_stages(_with_workers(cfg, 2), run, ["evaluate", "explain", "audit", "report"])
    assert all(RunDir.open(run.path).stage_status(s) == "complete" for s in ("evaluate", "explain", "audit", "report"))


def test_an_output_that_does_not_pickle_is_named_and_its_worker_runs_nothing_after_it(tmp_path):
    # Two jobs in one worker, started early: the first hands back a lambda (unpicklable); the runner gets a named
    # error, and the worker stops there, as after any failure (the second job never runs).
    def job(name, runtime):
        (tmp_path / name).touch()
        return (lambda: 0) if name == "a" else name, None

    back = []
    with stage_workers.Pool(
        n_workers=2, job=job, runtime_of=lambda name: Runtime(), on_start=lambda name: None, on_done=back.append
    ) as pool:
        pool.start_early(["a", "b"])  # one worker (n_workers - 1) runs both, one after the other
        pool.run([])
    assert [d.name for d in back] == ["a"] and "could not hand back its output" in str(back[0].error)
    assert (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_run_keeps_what_lives_through_it_out_of_the_collector_and_gives_it_back(trained, tmp_path, monkeypatch):
    # A stage runs with what was alive at its start frozen (gc.freeze), and a worker inherits its runner's objects
    # frozen; once the run returns, also after a failed stage, nothing is left frozen for its caller.
    from pipeline import evaluate

    cfg, _ = trained
    seen = []
    real = evaluate.run
    monkeypatch.setattr(evaluate, "run", lambda *a, **k: seen.append(gc.get_freeze_count()) or real(*a, **k))
    gc.unfreeze()
    runner.run_stages(cfg, _copy(trained, tmp_path / "run"), ["evaluate"])
    assert seen[0] > 10_000 and gc.get_freeze_count() == 0, (seen, gc.get_freeze_count())

    monkeypatch.setattr(evaluate, "run", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        runner.run_stages(cfg, _copy(trained, tmp_path / "failed"), ["evaluate"])
    assert gc.get_freeze_count() == 0

    back = []
    with stage_workers.Pool(
        n_workers=2,
        job=lambda name, runtime: (gc.get_freeze_count(), None),
        runtime_of=lambda name: Runtime(),
        on_start=lambda name: None,
        on_done=back.append,
    ) as pool:
        pool.run(["a"])
    assert back[0].output > 10_000
    gc.unfreeze()


def test_on_idle_runs_once_after_the_last_job_started():
    started, idle = [], []
    with stage_workers.Pool(
        n_workers=2,
        job=lambda name, runtime: (name, None),
        runtime_of=lambda name: Runtime(),
        on_start=started.append,
        on_done=lambda done: None,
    ) as pool:
        pool.run(["a", "b", "c"], on_idle=lambda: idle.append(list(started)))
    assert idle == [["a", "b", "c"]]


# --------------------------------------------------------------------------- processes


def _start_and_wait_for_workers(tmp_path: Path) -> tuple[subprocess.Popen, Path, list[int]]:
    """A tiny run with a long explain stage; returns once its independent stages run in workers."""
    args = [sys.executable, "-m", "pipeline", "--out", str(tmp_path), "--quiet", *ALL, "stages.workers=3"]
    args += ["explain.lime_image_num_samples=20000", "explain.stability_rows=4"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        children = _children(proc.pid)  # the workers (a git subprocess at start-up is a child too: hence the manifest)
        if len(children) >= 2 and _status(tmp_path, "explain") == "running":
            return proc, next(tmp_path.glob("*/manifest.json")).parent, _children(proc.pid)
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"no workers appeared: {proc.communicate()[1][-2000:]}")


def _status(out: Path, stage: str) -> str | None:
    for manifest in out.glob("*/manifest.json"):
        try:
            return json.loads(manifest.read_text())["stages"].get(stage, {}).get("status")
        except ValueError:
            return None  # caught mid-replace
    return None


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _gone(pids: list[int], within: float) -> bool:
    deadline = time.time() + within
    while time.time() < deadline:
        alive = [p for p in pids if Path(f"/proc/{p}").exists() and "Z" not in _state(p)]
        if not alive:
            return True
        time.sleep(0.05)
    return False


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


@pytest.mark.slow  # a whole tiny run up to its workers, twice
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers are forked on Linux only")
def test_no_worker_outlives_its_runner_killed_or_terminated(tmp_path):
    proc, _, workers = _start_and_wait_for_workers(tmp_path / "kill")
    proc.kill()  # kill -9: nothing of ours runs in the runner any more
    proc.wait()
    assert _gone(workers, within=5.0), workers

    proc, run, workers = _start_and_wait_for_workers(tmp_path / "term")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    lines = [ln for ln in err.splitlines() if ln.strip() and "has no effect" not in ln]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("terminated (SIGTERM)"), err
    assert _gone(workers, within=5.0), workers
    stages = RunDir.open(run).manifest["stages"]
    assert "running" not in {s["status"] for s in stages.values()}, stages  # what ran is marked failed
    assert stages["explain"]["status"] == "failed"


@pytest.mark.slow  # a tiny run up to its CNN's training (made long)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers are forked on Linux only")
def test_no_worker_started_beside_the_training_outlives_its_runner_killed(tmp_path):
    """kill -9 of the runner while the CNN trains and the regressor's jobs run in a worker beside it."""
    args = [sys.executable, "-m", "pipeline", "--out", str(tmp_path), "--quiet", *ALL, "stages.workers=2"]
    args += ["cnn.fit.epochs=2000", "train.patience=0"]  # the CNN trains for minutes: the kill lands in it
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, workers = time.time() + 240, []
    while time.time() < deadline and proc.poll() is None and not workers:
        if _status(tmp_path, "train") == "running" and _status(tmp_path, "explain") == "running":
            workers = _children(proc.pid)  # explain begun while train runs: the regressor's worker is forked
        time.sleep(0.1)
    assert workers, f"no worker beside the training: {proc.communicate()[1][-2000:] if proc.poll() is not None else ''}"
    proc.kill()
    proc.wait()
    assert _gone(workers, within=5.0), workers


# --------------------------------------------------------------------------- a run in a terminal

_BAR_THEN_WORKERS = """
import sys
from auditml_core.config import load_config
from auditml_core.epoch import progress_bar
from pipeline import stage_workers
if sys.argv[1] == "fixed":
    stage_workers.no_tqdm_monitor()
for _ in progress_bar(range(3), True, "a training bar"):
    pass
print(stage_workers.workers(load_config(None, ["stages.workers=2"]), 3))
"""


@pytest.mark.parametrize("setting, forks", [("fixed", "2"), ("tqdm's default", "1")])
def test_a_progress_bar_leaves_no_thread_that_keeps_the_stages_out_of_workers(setting, forks):
    # In a fresh interpreter (this one may hold threads of other tests): tqdm's monitor thread, started with the
    # first bar, made workers() refuse to fork. The positive control is tqdm's default, which must still refuse.
    out = subprocess.run(
        [sys.executable, "-c", _BAR_THEN_WORKERS, setting], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == forks, out.stderr[-2000:]


def test_a_run_in_a_terminal_runs_its_independent_stages_in_workers(tmp_path):
    """With a terminal on stderr the pipeline shows progress bars; it ran every stage in one process (tqdm's
    monitor thread, see above) until the runner turned that thread off."""
    import fcntl
    import pty
    import struct
    import termios

    main, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 0 columns: tqdm draws nothing
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "--out", str(tmp_path), "--stages", "data,train,evaluate,explain"]
        + [*TRAIN, *EXPLAIN, "stages.workers=2"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=terminal,
    )
    os.close(terminal)
    chunks = []
    try:
        while True:  # read as it writes (a full terminal buffer would block it) until its end closes
            try:
                chunk = os.read(main, 65536)
            except OSError:  # EIO: the other end is closed and drained
                break
            if not chunk:
                break
            chunks.append(chunk)
        proc.wait(timeout=300)
    finally:
        os.close(main)
        if proc.poll() is None:
            proc.kill()
    log = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, log[-3000:]
    assert "%|" in log  # the bars were drawn: a terminal, as a user's
    assert re.search(r"stages [a-z,]+: 3 jobs, 2 at once in worker processes", log), log[-3000:]
