"""A checkpoint replaced while the process is killed leaves a run directory that still verifies and resumes."""

from __future__ import annotations

import pytest

from auditml_core.errors import RunDirError
from pipeline import rundir
from pipeline.rundir import RunDir


def _run(tmp_path) -> RunDir:
    return RunDir.create(tmp_path, config_toml="seed = 0\n", command=["test"], device="cpu")


def test_a_kill_between_manifest_and_file_leaves_the_previous_checkpoint_valid(tmp_path, monkeypatch):
    run = _run(tmp_path)
    run.replace_checkpoint("checkpoints/cnn.pt", b"epoch 1", stage="train", seed=1)
    assert RunDir.open(run.path).read("checkpoints/cnn.pt") == b"epoch 1"

    def killed(path, data):  # the process dies after saving the manifest, before replacing the file
        raise KeyboardInterrupt

    monkeypatch.setattr(rundir, "atomic_write", killed)
    with pytest.raises(KeyboardInterrupt):
        run.replace_checkpoint("checkpoints/cnn.pt", b"epoch 2", stage="train", seed=1)
    monkeypatch.undo()
    reopened = RunDir.open(run.path)
    assert reopened.read("checkpoints/cnn.pt") == b"epoch 1"  # one write behind, accepted
    assert reopened.verify() == []
    run.replace_checkpoint("checkpoints/cnn.pt", b"epoch 2", stage="train", seed=1)
    assert RunDir.open(run.path).read("checkpoints/cnn.pt") == b"epoch 2"


def test_an_edited_checkpoint_is_still_refused(tmp_path):
    run = _run(tmp_path)
    run.replace_checkpoint("checkpoints/cnn.pt", b"epoch 1", stage="train", seed=1)
    run.replace_checkpoint("checkpoints/cnn.pt", b"epoch 2", stage="train", seed=1)
    (run.path / "checkpoints/cnn.pt").write_bytes(b"tampered")
    reopened = RunDir.open(run.path)
    with pytest.raises(RunDirError, match="modified after it was written"):
        reopened.read("checkpoints/cnn.pt")
    assert any(line.startswith("edited: checkpoints/cnn.pt") for line in reopened.verify())


def test_only_checkpoints_accept_their_previous_version(tmp_path):
    run = _run(tmp_path)
    run.write("models/cnn.json", b"v1", stage="train", seed=1)
    run.manifest["artifacts"]["models/cnn.json"]["previous_sha256"] = run.manifest["artifacts"]["models/cnn.json"][
        "sha256"
    ]
    run.write("models/cnn.json", b"v2", stage="train", seed=1)
    run.save_manifest()
    (run.path / "models/cnn.json").write_bytes(b"v1")
    with pytest.raises(RunDirError):
        RunDir.open(run.path).read("models/cnn.json")
