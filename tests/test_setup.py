"""Set-up hygiene: make targets that keep the evidence, install nothing outside .venv, run the notebooks;
pyproject metadata setuptools accepts without deprecations; a consistent environment."""

import os
import re
import shutil
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAKEFILE = ROOT / "Makefile"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
MAKE = shutil.which("make")
needs_make = pytest.mark.skipif(MAKE is None, reason="make is not installed")


def _make(*args, cwd):
    return subprocess.run([MAKE, "-f", str(MAKEFILE), *args], cwd=cwd, capture_output=True, text=True, timeout=60)


@needs_make
def test_clean_keeps_run_directories_and_deleting_them_needs_its_own_confirmed_target(tmp_path):
    (tmp_path / "runs" / "20260101T000000Z-abc").mkdir(parents=True)
    (tmp_path / "pkg" / "__pycache__").mkdir(parents=True)
    (tmp_path / ".pytest_cache").mkdir()
    assert _make("clean", cwd=tmp_path).returncode == 0
    assert (tmp_path / "runs" / "20260101T000000Z-abc").is_dir()  # the evidence stays
    assert not (tmp_path / "pkg" / "__pycache__").exists() and not (tmp_path / ".pytest_cache").exists()
    refused = _make("delete-runs", cwd=tmp_path)
    assert refused.returncode != 0 and "CONFIRM=yes" in refused.stderr
    assert (tmp_path / "runs").is_dir()
    assert _make("delete-runs", "CONFIRM=yes", cwd=tmp_path).returncode == 0
    assert not (tmp_path / "runs").exists()


def _prerequisites(target: str) -> list[str]:
    line = next(ln for ln in MAKEFILE.read_text().splitlines() if ln.startswith(f"{target}:"))
    return line.split(":", 1)[1].split()


@needs_make
def test_make_test_installs_nothing_outside_the_virtual_environment():
    assert "browser" not in _prerequisites("test") and "browser" not in _prerequisites("test-all")
    # Pretend nothing is installed yet: every command `make test` would run writes only under .venv.
    # (--no-print-directory: under CI this test itself runs inside `make test`, and a nested make would print
    # "make[1]: Entering directory" lines.)
    dry = subprocess.run(
        [MAKE, "-n", "-B", "--no-print-directory", "test", "VENV=.venv-probe"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert dry.returncode == 0, dry.stderr
    for command in filter(None, dry.stdout.splitlines()):
        assert not re.search(r"\b(apt-get|apt|sudo|dnf|yum|brew)\b|--user\b", command), command
        assert re.match(
            r"(test -x \.venv-probe/bin/python \|\| )?(python3 -m venv \.venv-probe|\.venv-probe/bin/python |touch \.venv-probe/)",
            command,
        ), command


def test_license_is_an_spdx_expression_setuptools_accepts_without_deprecation():
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    assert isinstance(PYPROJECT["project"]["license"], str)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_configuration(Distribution(), ROOT / "pyproject.toml")
    assert not [w for w in caught if "license" in str(w.message)], [str(w.message)[:200] for w in caught]


def test_the_environment_is_consistent():
    proc = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_make_install_installs_what_runs_the_notebooks():
    extra = " ".join(PYPROJECT["project"]["optional-dependencies"]["notebooks"])
    for need in ("nbconvert", "nbclient", "ipykernel"):
        assert need in extra
    install = next(ln for ln in MAKEFILE.read_text().splitlines() if "pip install" in ln and "-e" in ln)
    assert "notebooks" in install
    jupyter = Path(sys.executable).parent / "jupyter"
    proc = subprocess.run([str(jupyter), "nbconvert", "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def _readme_notebook_command() -> str:
    text = (ROOT / "README.md").read_text()
    return next(ln.split("  #")[0].strip() for ln in text.splitlines() if ln.startswith("jupyter nbconvert"))


@pytest.mark.slow
def test_readme_notebook_command_executes(tmp_path, tiny_overrides):
    command = _readme_notebook_command().split()
    assert command[:4] == ["jupyter", "nbconvert", "--to", "html"] and "--execute" in command
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
        "PIPELINE_NOTEBOOK_OVERRIDES": " ".join(tiny_overrides),
        "PIPELINE_NOTEBOOK_OUT": str(tmp_path / "runs"),
    }
    proc = subprocess.run(
        [*command, "--output-dir", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    page = tmp_path / (Path(command[-1]).stem + ".html")
    assert page.is_file() and "Traceback" not in page.read_text()
