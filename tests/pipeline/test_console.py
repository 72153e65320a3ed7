"""A quiet console: the project's own loggers at INFO, the libraries' only with -v, one line per stage, and
progress bars only on a terminal and never with --quiet."""

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
PROJECT = ("pipeline", "auditml_core", "federated", "explain")

# What a library logs at INFO (shap logs its arrays there), through the CLI's logging set-up.
LIBRARY_INFO = """
import logging, sys
from pipeline.console import configure_logging
configure_logging(quiet="--quiet" in sys.argv, verbose="-v" in sys.argv)
for name in ("shap", "matplotlib", "PIL", "httpx", "numba", "lime"):
    logging.getLogger(name).info("library info")
logging.getLogger("shap").warning("library warning")
logging.getLogger("pipeline.runner").info("project info")
"""


def _snippet(*flags):
    proc = subprocess.run(
        [sys.executable, "-c", LIBRARY_INFO, *flags], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stderr.splitlines()


def test_libraries_info_only_with_verbose_and_project_info_unless_quiet():
    assert _snippet() == ["WARNING shap: library warning", "INFO pipeline.runner: project info"]
    verbose = _snippet("-v")
    assert sum("library info" in line for line in verbose) == 6 and "INFO pipeline.runner: project info" in verbose
    assert _snippet("--quiet") == ["WARNING shap: library warning"]


def _console_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def test_a_run_prints_one_line_per_stage_and_no_library_info(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "--stages", "data", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = _console_lines(proc.stderr)
    assert [ln for ln in lines if re.match(r"INFO pipeline\.runner: stage data +done in +[0-9.]+ s$", ln)] == lines[1:2]
    assert len(lines) == 3, lines  # run directory, the stage's line, the total
    assert "\r" not in proc.stderr  # no progress bar: stderr is not a terminal


@pytest.mark.slow
def test_default_console_of_a_whole_run_is_short(tmp_path, tiny_overrides):
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "--out", str(tmp_path), *tiny_overrides],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=ROOT,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr
    lines = _console_lines(proc.stderr)
    loggers = [m.group(1) for ln in lines if (m := re.match(r"(?:INFO|DEBUG) ([\w.]+):", ln))]
    foreign = [name for name in loggers if name.split(".")[0] not in PROJECT]
    assert not foreign, foreign  # shap's INFO arrays were ~80 % of a default run's console
    assert len([ln for ln in lines if " done in " in ln and "stage " in ln]) == 7  # one per stage
    # Without the inert-settings warnings of the tiny overrides (dp_fit under DP off), at most ~20 lines.
    assert len([ln for ln in lines if "has no effect" not in ln]) <= 20, lines


def _on_a_terminal(args, cwd):
    """Run the CLI with stderr on a pseudo-terminal; return what it wrote there."""
    master, slave = pty.openpty()
    # A real terminal has a size; a fresh pty is 0 x 0, on which tqdm draws a bar of width 0 (nothing).
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args], stdout=subprocess.DEVNULL, stderr=slave, env=ENV, cwd=cwd
    )
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert proc.wait(timeout=900) == 0, out.decode(errors="replace")[-3000:]
    return out.decode(errors="replace")


@pytest.mark.slow
def test_progress_bars_on_a_terminal_and_none_with_quiet(tmp_path, tiny_overrides):
    args = ["--stages", "data,train", "--out", str(tmp_path), *tiny_overrides]
    shown = _on_a_terminal(args, ROOT)
    assert re.search(r"(regressor|cnn): +\d+%\|", shown), shown[-2000:]  # tqdm's epoch bar
    quiet = _on_a_terminal([*args, "--quiet"], ROOT)
    assert "%|" not in quiet and "stage " not in quiet
