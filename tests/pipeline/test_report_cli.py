"""End to end as a user runs it: ``python -m pipeline`` writes the report, prints its path, and verify covers it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600
    )


@pytest.mark.slow  # a whole pipeline run: the default tier keeps one (tests/pipeline/test_cli.py)
def test_cli_writes_report_json_and_model_cards_and_prints_the_path(tmp_path, tiny_overrides):
    proc = cli("--out", str(tmp_path), "--quiet", *tiny_overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
    run = Path(lines["run directory"])
    assert Path(lines["report"]) == run / "report.html" and (run / "report.html").is_file()
    for rel in ("report.json", "model_card_regressor.md", "model_card_cnn.md", "explain/metrics.json"):
        assert (run / rel).is_file(), rel
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages"]["explain"]["status"] == manifest["stages"]["report"]["status"] == "complete"
    content = json.loads((run / "report.json").read_text())
    assert content["run_id"] == run.name and content["reproducibility"]["git_commit"] == manifest["git_commit"]
    assert cli("verify", str(run)).returncode == 0
    # Re-rendering only the report keeps every earlier stage as it was.
    again = cli("--run-dir", str(run), "--stages", "report", "--quiet")
    assert again.returncode == 0, again.stderr[-3000:]
    after = json.loads((run / "manifest.json").read_text())
    assert after["stages"]["report"]["attempt"] == 2 and after["stages"]["explain"] == manifest["stages"]["explain"]
    assert cli("verify", str(run)).returncode == 0
