"""Hostile run directories, command lines and signals: the pipeline refuses cleanly and never records something false.

Outcome classes: a clean refusal (exit 2, one ``error:`` line, no traceback, nothing outside the
run directory touched) or correct acceptance. Most cases drive ``pipeline.__main__.main``
in-process on copies of one tiny recorded run (fast); the signal case runs a real process.

Findings of issue 9 covered here: 2 (path traversal), 5 (divergence recorded as complete),
6 (verify on an incomplete run), 10 (damaged run-directory files, --out), 11 (SIGTERM),
12 (intermixed overrides, --from/--stages names), and the manifest as evidence.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from auditml_core.artifacts import json_bytes, npz_bytes
from auditml_core.errors import RunDirError
from auditml_core.runtime import Runtime
from pipeline.__main__ import VERIFY_INCOMPLETE, VERIFY_MISMATCH, VERIFY_OK, main
from pipeline.rundir import RunDir
from tests.tiny import ALL

ROOT = Path(__file__).resolve().parents[2]


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def clean_refusal(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def run_dir_of(out: str) -> Path:
    return Path([ln for ln in out.splitlines() if ln.startswith("run directory:")][-1].split(":", 1)[1].strip())


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory) -> Path:
    """One complete tiny run (every stage), made once; tests work on copies."""
    out = tmp_path_factory.mktemp("runs")
    assert main(["--out", str(out), "--quiet", *ALL]) == 0
    return next(p for p in out.iterdir() if (p / "manifest.json").is_file())


@pytest.fixture
def run(recorded_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(recorded_run, copy, symlinks=True)
    return copy


def edit_manifest(run: Path, change) -> None:
    m = json.loads((run / "manifest.json").read_text())
    change(m)
    (run / "manifest.json").write_bytes(json_bytes(m))


def replace_artifact(run: Path, rel: str, data: bytes) -> None:
    """Replace a file *and* its manifest hash: what an attacker (or a bad tool) who edits both does."""
    (run / rel).write_bytes(data)

    def change(m):
        m["artifacts"][rel].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))

    edit_manifest(run, change)


# --------------------------------------------------------------------------- finding 2: traversal


@pytest.mark.parametrize("hostile", ["../victim.txt", "VICTIM_ABSOLUTE", "models/../../victim.txt"])
def test_manifest_paths_outside_the_run_are_refused_and_nothing_is_deleted(run, capsys, hostile):
    victim = run.parent / "victim.txt"
    victim.write_text("precious")
    rel = str(victim) if hostile == "VICTIM_ABSOLUTE" else hostile
    digest = hashlib.sha256(b"precious").hexdigest()
    edit_manifest(run, lambda m: m["artifacts"].__setitem__(rel, {"sha256": digest, "bytes": 8, "stage": "report"}))
    code, _, err = run_main(capsys, "--run-dir", str(run), "--from", "report", "--quiet")
    clean_refusal(code, err, "damaged", "leaves the run directory")
    assert victim.read_text() == "precious"
    code, out, err = run_main(capsys, "verify", str(run))
    clean_refusal(code, err, "damaged")
    assert "OK" not in out


def test_invalidate_checks_every_path_before_deleting_anything(run):
    victim = run.parent / "victim.txt"
    victim.write_text("precious")
    r = RunDir.open(run)
    r.manifest["artifacts"]["../victim.txt"] = {"sha256": "0" * 64, "bytes": 8, "stage": "report"}
    with pytest.raises(RunDirError):
        r.invalidate("report")
    assert victim.read_text() == "precious" and (run / "report.html").is_file()


def test_a_symlink_leading_out_of_the_run_is_refused(run, capsys):
    outside = run.parent / "outside.json"
    outside.write_bytes((run / "models" / "ridge.json").read_bytes())
    (run / "models" / "ridge.json").unlink()
    (run / "models" / "ridge.json").symlink_to(outside)
    code, _, err = run_main(capsys, "verify", str(run))
    clean_refusal(code, err, "damaged", "models/ridge.json")


def test_opening_a_run_never_deletes_temporary_files_outside_it(run):
    """Not in the issue: a resume removes interrupted writes (.*.tmp), and rglob follows a symlinked folder."""
    outside = run.parent / "outside"
    outside.mkdir()
    (outside / ".precious.tmp").write_text("x")
    (run / "linked").symlink_to(outside, target_is_directory=True)
    (run / "models" / ".ridge.json.abc.tmp").write_text("half-written")
    RunDir.open(run)  # read-only: deletes nothing (issue 24 item 9)
    assert (run / "models" / ".ridge.json.abc.tmp").is_file()
    RunDir.open(run).remove_interrupted_writes()  # what a resume does
    assert (outside / ".precious.tmp").is_file() and not (run / "models" / ".ridge.json.abc.tmp").exists()


# --------------------------------------------------------------------------- finding 10: damaged files


@pytest.mark.parametrize(
    "damage, fragment",
    [
        (lambda run: (run / "manifest.json").write_bytes((run / "manifest.json").read_bytes()[:100]), "manifest.json"),
        (lambda run: (run / "manifest.json").write_bytes(b"[1, 2]"), "manifest.json"),
        (lambda run: edit_manifest(run, lambda m: m.__setitem__("artifacts", [])), "artifacts"),
        (lambda run: edit_manifest(run, lambda m: m["artifacts"]["report.html"].pop("sha256")), "report.html"),
        (lambda run: edit_manifest(run, lambda m: m.pop("config")), "config"),
        (lambda run: (run / "config.toml").write_text("seed = 1\n"), "config.toml"),  # resumed config was edited
        (lambda run: (run / "config.toml").write_text("[[[ not toml"), "config.toml"),
    ],
)
def test_damaged_manifest_or_config_is_named(run, capsys, damage, fragment):
    damage(run)
    code, _, err = run_main(capsys, "--run-dir", str(run), "--from", "report", "--quiet")
    clean_refusal(code, err, "damaged", fragment)


@pytest.mark.parametrize(
    "rel, data, stages",
    [
        ("models/cnn.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage", "evaluate"),  # malformed safetensors
        ("models/cnn.safetensors", b"", "evaluate"),
        ("data/tabular.npz", npz_bytes({"x_train": np.array([object()], dtype=object)}), "train"),  # pickled object
        ("data/images.npz", b"PK\x03\x04 truncated zip", "train"),
        ("models/regressor.json", b"{not json", "evaluate"),
        ("models/regressor.json", b'{"spec": 1}', "evaluate"),  # valid JSON, wrong keys
        ("explain/metrics.json", b"[]", "report"),
    ],
)
def test_hash_matching_but_undecodable_files_say_which_file_is_damaged(run, capsys, rel, data, stages):
    replace_artifact(run, rel, data)
    code, _, err = run_main(capsys, "--run-dir", str(run), "--stages", stages, "--quiet")
    clean_refusal(code, err, "this run directory is damaged", rel)
    assert "running" != RunDir.open(run).stage_status(stages)


class Hostile:
    """A class torch.load(weights_only=True) must refuse to rebuild (it could run code on unpickling)."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.parametrize("payload", [b"not a checkpoint", b"", "pickle"])
def test_a_checkpoint_torch_refuses_is_a_damaged_file_not_a_traceback(payload):
    if payload == "pickle":
        import io

        buf = io.BytesIO()
        torch.save({"epoch": Hostile()}, buf)
        payload = buf.getvalue()
    runtime = Runtime(load_bytes=lambda rel: payload)
    with pytest.raises(RunDirError) as info:
        runtime.load_checkpoint("cnn")
    assert "damaged: checkpoints/cnn.pt" in str(info.value)


# --------------------------------------------------------------------------- finding 6: completeness


@pytest.mark.parametrize("status", ["running", "failed", "stale"])
def test_verify_reports_an_incomplete_run_separately_from_hashes(run, capsys, status):
    edit_manifest(run, lambda m: m["stages"]["distill"].update(status=status))
    code, out, err = run_main(capsys, "verify", str(run))
    assert code == VERIFY_INCOMPLETE, out + err
    assert f"incomplete: stage distill is {status}" in out and "OK" not in out
    (run / "metrics" / "evaluation.json").write_text("{}")
    code, out, _ = run_main(capsys, "verify", str(run))
    assert code == VERIFY_MISMATCH and "edited: metrics/evaluation.json" in out


def test_verify_ok_only_for_a_complete_untouched_run(run, capsys):
    code, out, _ = run_main(capsys, "verify", str(run))
    assert code == VERIFY_OK and "every stage is complete" in out


# --------------------------------------------------------------------------- the manifest as evidence


def test_the_run_prints_its_manifest_sha256_and_the_report_names_its_provenance(recorded_run):
    content = json.loads((recorded_run / "report.json").read_text())
    provenance = (recorded_run / "report_provenance.json").read_bytes()
    assert content["manifest_sha256"] == hashlib.sha256(provenance).hexdigest()
    assert content["manifest_sha256"] in (recorded_run / "report.html").read_text()
    assert json.loads(provenance)["artifacts"]["models/cnn.safetensors"]["sha256"] == (
        hashlib.sha256((recorded_run / "models" / "cnn.safetensors").read_bytes()).hexdigest()
    )


def test_report_re_renders_byte_for_byte(run, capsys):
    code, out, err = run_main(capsys, "verify", str(run), "--rerender")
    assert code == VERIFY_OK, out + err
    before = {p: (run / p).read_bytes() for p in ("report.html", "report.json", "model_card_cnn.md")}
    code, out, _ = run_main(capsys, "--run-dir", str(run), "--from", "report", "--quiet")
    assert code == 0 and "manifest sha256: " in out
    assert {p: (run / p).read_bytes() for p in before} == before  # a real re-run, same bytes


def test_a_consistent_tamper_passes_hashes_but_not_the_signature(run, capsys, tmp_path):
    key = tmp_path / "key.pem"
    assert run_main(capsys, "keygen", str(key))[0] == 0
    pub = tmp_path / "key.pub.pem"
    assert run_main(capsys, "sign", str(run), "--key", str(key))[0] == 0
    code, out, err = run_main(capsys, "verify", str(run), "--key", str(pub))
    assert code == VERIFY_OK and "signature valid" in out, out + err
    # Edit a metric *and* its hash in the manifest: the hashes agree, only the signature can tell.
    metrics = json.loads((run / "metrics" / "evaluation.json").read_text())
    metrics["cnn"]["test"]["accuracy"] = 0.999
    replace_artifact(run, "metrics/evaluation.json", json_bytes(metrics))
    assert run_main(capsys, "verify", str(run))[0] == VERIFY_OK
    code, out, _ = run_main(capsys, "verify", str(run), "--key", str(pub))
    assert code == VERIFY_MISMATCH and "signature:" in out
    (run / "manifest.sig").unlink()
    code, out, _ = run_main(capsys, "verify", str(run), "--key", str(pub))
    assert code == VERIFY_MISMATCH and "unsigned" in out
    code, _, err = run_main(capsys, "verify", str(run), "--key", str(run / "report.json"))
    clean_refusal(code, err, "not an unencrypted PEM public key")


# --------------------------------------------------------------------------- command line (finding 12, 10)


def test_overrides_are_accepted_anywhere_on_the_line(tmp_path, capsys):
    code, out, err = run_main(capsys, "--out", str(tmp_path), "seed=7", "--stages", "data", "--quiet", "cnn.fit.lr=0.5")
    assert code == 0, err
    text = (run_dir_of(out) / "config.toml").read_text()
    assert "seed = 7" in text and "lr = 0.5" in text


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["--from", "nosuch"], ["unknown stage 'nosuch'"]),
        (["--stages", "data,nosuch"], ["unknown stage 'nosuch'"]),
        (["--stages", "data", "dp.enabled=true", "cnn.dp_fit.max_grad_norm=inf"], ["cnn.dp_fit.max_grad_norm"]),
        (["--stages", "data", "dp.noise_multiplier=inf"], ["dp.noise_multiplier"]),
        (["--stages", "data", "distill.synthetic_noise=inf"], ["distill.synthetic_noise"]),
        (["--stages", "data", "data.tabular_csv=DIR", "data.target=y"], ["is a directory"]),
        (["--stages", "data", "--out", "FILE"], ["--out", "not a directory"]),
        (["--stages", "data", "--out", "FILE/sub"], ["--out", "cannot be created"]),
        (["--stages", "data", "--out", "/proc/hostile-out"], ["--out", "cannot be created"]),
        (["--run-dir", "FILE"], ["not a directory"]),
        (["--run-dir", "DIR"], ["not a run directory"]),
    ],
)
def test_bad_command_lines_are_refused_cleanly(tmp_path, capsys, argv, fragments):
    (tmp_path / "file").write_text("x")
    subs = {"DIR": str(tmp_path), "FILE": str(tmp_path / "file")}
    argv = [
        a.replace("DIR", subs["DIR"]).replace("FILE", subs["FILE"]) if ("DIR" in a or "FILE" in a) else a for a in argv
    ]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "runs")]
    code, _, err = run_main(capsys, *argv, "--quiet")
    clean_refusal(code, err, *fragments)
    recorded = [RunDir.open(p.parent) for p in (tmp_path / "runs").glob("*/manifest.json")]
    if any("tabular_csv" in a for a in argv):  # a data error: found by the data stage, which is marked failed
        assert [r.stage_status("data") for r in recorded] == ["failed"]
    else:  # a usage or config error: refused before any run directory exists
        assert not recorded


# --------------------------------------------------------------------------- finding 5: divergence


def test_a_diverged_training_fails_the_stage_and_records_no_model(tmp_path, capsys):
    code, _, err = run_main(
        capsys,
        "--out",
        str(tmp_path),
        "--quiet",
        "--stages",
        "data,train,evaluate",
        *ALL,
        "regressor.fit.optimizer=sgd",
        "regressor.fit.momentum=0.0",
        "regressor.fit.lr=1e12",
    )
    clean_refusal(code, err, "training diverged at epoch", "lower regressor.fit.lr")
    run = RunDir.open(next(tmp_path.iterdir()))
    assert run.stage_status("train") == "failed" and run.stage_status("evaluate") == "pending"
    assert not any(rel.startswith("models/") for rel in run.manifest["artifacts"])


# --------------------------------------------------------------------------- finding 11: SIGTERM


def test_sigterm_marks_the_stage_failed_with_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-m", "pipeline", "--out", str(tmp_path), "--quiet", "--stages", "data,train", *ALL]
    args += ["cnn.fit.epochs=400", "train.patience=0"]
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, run = time.time() + 120, None
    while time.time() < deadline and proc.poll() is None:
        manifests = list(tmp_path.glob("*/manifest.json"))
        if manifests and manifests[0].stat().st_size:
            try:
                if json.loads(manifests[0].read_text())["stages"].get("train", {}).get("status") == "running":
                    run = manifests[0].parent
                    break
            except ValueError:
                pass  # caught mid-replace
        time.sleep(0.05)
    time.sleep(1.0)  # inside the training loop
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert run is not None
    assert proc.returncode == 128 + signal.SIGTERM, err
    # tests/tiny.py's DP-only keys warn "has no effect" in this central run (issue 30); the signal gets one line
    lines = [ln for ln in err.splitlines() if ln.strip() and "has no effect" not in ln]
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("terminated (SIGTERM)")
    assert RunDir.open(run).stage_status("train") == "failed"


def test_sigterm_wrapped_by_library_code_still_exits_as_terminated(monkeypatch, capsys):
    """A SIGTERM that lands while a class body is created (torch lazily importing torch._dynamo inside the
    first optimizer) reaches us as a RuntimeError caused by Terminated: still one line and exit 143."""
    import pipeline.__main__ as entry

    def wrapped(argv):
        try:
            entry._on_sigterm(signal.SIGTERM, None)
        except entry.Terminated as exc:
            raise RuntimeError("Error calling __set_name__ on 'Field' instance") from exc

    def unrelated(argv):
        raise RuntimeError("not a signal")

    monkeypatch.setattr(entry, "cmd_run", wrapped)
    assert main(["--quiet"]) == 128 + signal.SIGTERM
    assert capsys.readouterr().err.startswith("terminated (SIGTERM)")
    monkeypatch.setattr(entry, "cmd_run", unrelated)
    with pytest.raises(RuntimeError, match="not a signal"):
        main(["--quiet"])


# --------------------------------------------------------------------------- issue 24: round two


def test_rerender_fails_when_a_weight_file_was_swapped_after_the_report(run, capsys):
    """Item 1: the swapped file's hash is rewritten in the manifest, so the hashes agree; the report does not."""
    weights = bytearray((run / "models" / "cnn.safetensors").read_bytes())
    weights[-1] ^= 1
    replace_artifact(run, "models/cnn.safetensors", bytes(weights))
    assert run_main(capsys, "verify", str(run))[0] == VERIFY_OK  # the manifest alone cannot tell
    code, out, _ = run_main(capsys, "verify", str(run), "--rerender")
    assert code == VERIFY_MISMATCH and "OK" not in out
    line = next(ln for ln in out.splitlines() if "models/cnn.safetensors" in ln)
    assert line.startswith("not reproduced:") and "replaced after the report" in line


def test_a_failed_re_run_of_an_early_stage_keeps_every_later_artifact(run, capsys, monkeypatch):
    """Item 7: later stages become stale only once the re-run stage has completed."""
    import pipeline.data
    from auditml_core.errors import DataError
    from pipeline import runner

    before = {rel: a["sha256"] for rel, a in RunDir.open(run).manifest["artifacts"].items()}
    later = [rel for rel, a in RunDir.open(run).manifest["artifacts"].items() if a["stage"] != "data"]
    assert len(later) >= 12

    def unreachable(*args, **kwargs):
        raise DataError("the data source is unreachable; try again")

    monkeypatch.setattr(pipeline.data, "run", unreachable)
    code, _, err = run_main(capsys, "--run-dir", str(run), "--stages", "data", "--quiet")
    clean_refusal(code, err, "unreachable")
    after = RunDir.open(run)
    assert {rel: a["sha256"] for rel, a in after.manifest["artifacts"].items()} == before
    assert after.verify() == [] and all((run / rel).is_file() for rel in later)
    assert after.stage_status("data") == "failed" and after.stage_status("report") == "complete"
    assert runner.resume_stages(after) == list(runner.STAGES)  # a resume re-runs everything after data
    monkeypatch.undo()
    code, _, err = run_main(capsys, "--run-dir", str(run), "--stages", "data", "--quiet")
    assert code == 0, err
    rerun = RunDir.open(run)  # completed: now the later stages are stale, their files gone
    assert rerun.stage_status("train") == "stale" and rerun.verify() == []
    assert not any(a["stage"] == "train" for a in rerun.manifest["artifacts"].values())


def test_keygen_never_overwrites_a_key_and_names_a_missing_folder(tmp_path, capsys):
    """Item 8."""
    pub = tmp_path / "k.pub.pem"
    pub.write_text("the auditor's copy")
    code, _, err = run_main(capsys, "keygen", str(tmp_path / "k.pem"))
    clean_refusal(code, err, "k.pub.pem", "--force")
    assert pub.read_text() == "the auditor's copy" and not (tmp_path / "k.pem").exists()
    code, _, err = run_main(capsys, "keygen", str(tmp_path / "missing" / "k.pem"))
    clean_refusal(code, err, "does not exist", "missing")
    assert run_main(capsys, "keygen", str(tmp_path / "k.pem"), "--force")[0] == 0
    assert pub.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert (tmp_path / "k.pem").stat().st_mode & 0o077 == 0  # the private key stays private
    code, _, err = run_main(capsys, "keygen", str(tmp_path / "k.pem"))
    clean_refusal(code, err, "already exist")


@pytest.fixture
def read_only(monkeypatch):
    """``read_only(folder)``: chmod it read-only; as root (whom modes do not stop) every write under it fails too."""
    import builtins
    import errno
    import io

    def make(root: Path) -> None:
        root = root.resolve()
        for p in [root, *root.rglob("*")]:
            if not p.is_symlink():
                p.chmod(p.stat().st_mode & ~0o222)
        if os.geteuid() != 0:
            return

        def inside(path) -> bool:
            try:
                target = Path(os.fsdecode(path)).resolve()
            except (TypeError, ValueError):
                return False
            return target == root or root in target.parents

        def refuse(path):
            raise PermissionError(errno.EROFS, "Read-only file system (simulated)", os.fsdecode(path))

        def guard(fn, *positions):
            def wrapped(*args, **kwargs):
                for i in positions:
                    if i < len(args) and inside(args[i]):
                        refuse(args[i])
                return fn(*args, **kwargs)

            return wrapped

        for name, positions in (("unlink", (0,)), ("remove", (0,)), ("rmdir", (0,)), ("replace", (0, 1))):
            monkeypatch.setattr(os, name, guard(getattr(os, name), *positions))
        monkeypatch.setattr(os, "rename", guard(os.rename, 0, 1))
        real_os_open, real_open = os.open, builtins.open

        def os_open(path, flags, *args, **kwargs):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC) and inside(path):
                refuse(path)
            return real_os_open(path, flags, *args, **kwargs)

        def open_(file, mode="r", *args, **kwargs):
            if isinstance(file, (str, bytes, os.PathLike)) and set(mode) & set("wax+") and inside(file):
                refuse(file)
            return real_open(file, mode, *args, **kwargs)

        monkeypatch.setattr(os, "open", os_open)
        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(io, "open", open_)

    return make


def test_read_only_commands_never_write_or_delete_in_the_run(run, capsys, tmp_path, read_only):
    """Item 9: verify (with --rerender) and predict on a read-only run holding a live run's temporary file."""
    import pandas as pd
    from sklearn.datasets import load_diabetes

    live = run / "models" / ".cnn.safetensors.a1b2c3.tmp"  # a running stage's write in progress
    live.write_bytes(b"half of a checkpoint")
    d = load_diabetes()
    pd.DataFrame(d.data[:5], columns=d.feature_names).to_csv(tmp_path / "x.csv", index=False)
    snapshot = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    read_only(run)
    code, out, err = run_main(capsys, "verify", str(run), "--rerender")
    assert code == VERIFY_INCOMPLETE and "Traceback" not in err, out + err
    assert "leftover: models/.cnn.safetensors.a1b2c3.tmp" in out and "not reproduced" not in out
    assert "but 1 leftover temporary file(s) in" in err and "stage(s)" not in err  # every stage is complete
    code, _, err = run_main(
        capsys, "predict", str(run), "--input", str(tmp_path / "x.csv"), "--out", str(tmp_path / "p.csv")
    )
    assert code == 0, err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == snapshot


@pytest.mark.parametrize(
    "change, where",
    [
        (lambda m: m["stages"]["report"].__setitem__("seed", "x"), "stages/report/seed"),
        (lambda m: m["stages"]["report"].__setitem__("attempt", "x"), "stages/report/attempt"),
        (lambda m: m.__setitem__("invocations", {}), "invocations"),
        (lambda m: m["stages"]["data"].__setitem__("started", 5), "stages/data/started"),
        (lambda m: m.__setitem__("library_versions", "x"), "library_versions"),
        (lambda m: m["artifacts"]["models/cnn.safetensors"].__setitem__("bytes", "many"), "bytes"),
        (lambda m: m["config"].__setitem__("sha256", 7), "config/sha256"),
    ],
)
def test_a_manifest_with_wrong_types_is_a_damaged_run_not_a_traceback(run, capsys, change, where):
    """Item 12: the manifest is checked against its schema on every read."""
    edit_manifest(run, change)
    for argv in (["verify", str(run), "--rerender"], ["--run-dir", str(run), "--from", "report", "--quiet"]):
        code, _, err = run_main(capsys, *argv)
        clean_refusal(code, err, "this run directory is damaged", "manifest.json", where)


def full_disk(monkeypatch, fragment: str) -> None:
    """Every file opened with ``os.fdopen`` whose path contains ``fragment`` fails to write: ENOSPC."""
    import errno

    real = os.fdopen

    class Full:
        def __init__(self, fh):
            self._fh = fh

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self._fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._fh.close()

    def fdopen(fd, *args, **kwargs):
        fh = real(fd, *args, **kwargs)
        return Full(fh) if fragment in os.readlink(f"/proc/self/fd/{fd}") else fh

    monkeypatch.setattr(os, "fdopen", fdopen)


def test_a_full_disk_fails_the_stage_in_one_line_and_the_run_stays_resumable(run, capsys, monkeypatch):
    """Item 13: ENOSPC while a stage writes: one line, the stage marked failed, its earlier file intact."""
    from pipeline import runner

    before = (run / "metrics" / "evaluation.json").read_bytes()
    full_disk(monkeypatch, ".evaluation.json.")
    code, _, err = run_main(capsys, "--run-dir", str(run), "--stages", "evaluate", "--quiet")
    assert code == 1 and "Traceback" not in err, err
    (line,) = [ln for ln in err.splitlines() if ln.strip()]
    assert line.startswith("error: no space left on the file system at ")
    assert "metrics/evaluation.json" in line and "marked failed" in line and "--run-dir" in line
    after = RunDir.open(run)
    assert after.stage_status("evaluate") == "failed" and after.interrupted_writes() == []
    assert (run / "metrics" / "evaluation.json").read_bytes() == before and after.verify() == []
    assert runner.resume_stages(after)[0] == "evaluate"
    monkeypatch.undo()
    code, _, err = run_main(capsys, "--run-dir", str(run), "--stages", "evaluate", "--quiet")  # space is back
    assert code == 0, err
    assert RunDir.open(run).stage_status("evaluate") == "complete"


@pytest.mark.slow
def test_a_table_of_16_features_runs_to_a_report_that_names_its_shap_method(tmp_path, capsys):
    """Item 10 end to end: it trained, then crashed in the explain stage (shap-exact stops at 14 features)."""
    import pandas as pd
    from sklearn.datasets import load_diabetes

    d = load_diabetes()
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(d.data, columns=d.feature_names)
    for j in range(6):  # 16 features in all
        frame[f"extra{j}"] = rng.normal(size=len(frame))
    frame["y"] = d.target
    frame.to_csv(tmp_path / "wide.csv", index=False)
    argv = ["--out", str(tmp_path / "runs"), "--quiet", "--stages", "data,train,evaluate,explain,report", *ALL]
    code, out, err = run_main(capsys, *argv, f"data.tabular_csv={tmp_path / 'wide.csv'}", "data.target=y")
    assert code == 0, err
    run = run_dir_of(out)
    report = json.loads((run / "report.json").read_text())
    text = json.dumps(report)
    assert "shap-permutation" in text and "the table has 16 features" in text
    assert "shap-permutation" in (run / "report.html").read_text()
    metrics = json.loads((run / "explain" / "metrics.json").read_text())["models"]["regressor"]
    assert metrics["methods"]["primary"] == "shap-permutation"
    assert metrics["quality"]["reference"]["n"] > 0 and metrics["quality"]["additivity"]["max_abs_error"] < 1e-4
