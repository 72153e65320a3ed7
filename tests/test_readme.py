"""Every command in README.md is run by a test, so the README never says something false.

The commands are the lines of the README's ```bash blocks (a trailing ``\\`` joins lines; ``# ...`` comments are
dropped). Each one is run here, as the README writes it, in a sandbox folder that holds the files the README
names (``patients.csv``, ``visits.csv``, ``scans.npz``, ``scans/``, ``new_rows.csv``, ``a.csv``, ``b.csv``), with ``python`` this
test's interpreter and the tiny settings of ``tests/tiny.py`` appended to every training command (the README's
own overrides are still parsed and validated: an unknown key fails). ``runs/<run>`` is the run the first
training command made. A command whose README comment says ``-> exit N`` must exit with N (e.g. a refusal);
every other must exit 0.

Commands that need something this folder cannot give (a server to talk to, a second host) are run by the test
named for them in ``ELSEWHERE``; the guard test checks that each such test exists. The set-up commands
(``make run``, ``make test``) are CI's own: ``.ci/run`` runs ``make test``, and ``make -n`` here checks that
both targets do what the README says. A README command that none of these covers fails the guard.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.tiny import ALL as TINY
from tests.tiny import TRAIN as TINY_TRAIN

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# README command prefix -> "tests/<file>.py::<test>" that runs it (a server, a second host, ...).
ELSEWHERE: dict[str, str] = {
    "torchrun ": "tests/pipeline/test_ranks.py::test_two_hosts_on_loopback_kill_9_and_resume",  # two "hosts"
    "python -m pipeline train.mode=federated federated.ray_address=": (
        "tests/federated/test_ray_cluster.py::test_readme_ray_command_on_a_two_node_cluster"  # a Ray cluster
    ),
    "jupyter nbconvert": "tests/test_setup.py::test_readme_notebook_command_executes",  # with tiny settings
    "python -m pipeline serve": "tests/pipeline/test_serve.py::test_readme_serve_section_runs_as_written",  # a server
    "curl -s localhost:8000/": "tests/pipeline/test_serve.py::test_readme_serve_section_runs_as_written",  # its client
    "mlflow ui ": (  # a server, on the store the README's tracking run wrote
        "tests/pipeline/test_tracking.py::test_readme_mlflow_ui_serves_an_embedded_run_and_a_run_logged_over_http"
    ),
}
TINY_FEDERATED = ["federated.rounds=2"]  # every model, in either mode (auditml_core.config.federated_schedule)
SET_UP = {"make run": "python -m pipeline", "make test": "pytest"}
_EXIT = re.compile(r"->\s*exit\s+(\d+)")


def readme_commands(text: str | None = None) -> list[tuple[str, int]]:
    """(command, expected exit code) for every line of every ```bash block, in README order."""
    text = README.read_text() if text is None else text
    out: list[tuple[str, int]] = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\s*\\\n\s*", " ", block)
        for line in joined.splitlines():
            code, _, comment = line.partition(" #") if not line.lstrip().startswith("#") else ("", "", line)
            code = code.strip()
            if code:
                m = _EXIT.search(comment)
                out.append((code, int(m.group(1)) if m else 0))
    return out


def _is_training(cmd: str) -> bool:
    words = shlex.split(cmd)
    if words[:3] == ["python", "-m", "pipeline"]:
        rest = [w for w in words[3:] if not w.startswith("-")]
        return not rest or "=" in rest[0] or rest[0].endswith(".toml")
    return words[:3] == ["python", "-m", "federated.launch.deploy"]


def _slow(cmd: str) -> bool:
    """Training commands other than the first central one start Flower, DP or a whole data set: slow tier."""
    return _is_training(cmd) and not cmd.startswith("python -m pipeline --config")


def _fixtures(folder: Path) -> None:
    """The files the README's examples name, made from the embedded data."""
    from sklearn.datasets import load_diabetes, load_digits

    diabetes = load_diabetes(as_frame=True).frame
    table = diabetes.rename(columns={"target": "outcome"})
    table.iloc[:200].to_csv(folder / "patients.csv", index=False)
    table.iloc[:200].rename_axis("visit_id").to_csv(folder / "visits.csv")  # a row-number column (refused)
    table.drop(columns="outcome").iloc[200:220].to_csv(folder / "new_rows.csv", index=False)
    sites = diabetes.rename(columns={"target": "y"})
    sites.iloc[:220].to_csv(folder / "a.csv", index=False)
    sites.iloc[220:].to_csv(folder / "b.csv", index=False)
    digits = load_digits()
    x, y = digits.images[:400].astype(np.float32), digits.target[:400]
    np.savez(folder / "scans.npz", x=x, y=y)
    from skimage.io import imsave

    for i, (image, label) in enumerate(zip(x[:200], y[:200])):
        (folder / "scans" / str(label)).mkdir(parents=True, exist_ok=True)
        imsave(folder / "scans" / str(label) / f"{i}.png", (image * 16).astype(np.uint8), check_contrast=False)


def _run(cmd: str, cwd: Path, expected: int, run_dir: Path | None) -> subprocess.CompletedProcess:
    if run_dir is not None:
        cmd = cmd.replace("runs/<run>", str(run_dir))
    assert "<" not in cmd.replace("<run>", ""), f"a placeholder this test cannot fill: {cmd}"
    tiny = TINY if cmd.startswith("python -m pipeline") else TINY_TRAIN
    if "federated" in cmd:
        tiny = [*tiny, *TINY_FEDERATED]
    if _is_training(cmd):
        cmd = f"{cmd} --quiet {' '.join(tiny)}" if cmd.startswith("python -m pipeline") else f"{cmd} {' '.join(tiny)}"
    cmd = re.sub(r"^python ", f"{shlex.quote(sys.executable)} ", cmd)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == expected, f"{cmd}\nexit {proc.returncode} (README says {expected})\n{proc.stderr[-3000:]}"
    return proc


def _covered_elsewhere(cmd: str) -> str | None:
    return next((test for prefix, test in ELSEWHERE.items() if cmd.startswith(prefix)), None)


FAST = [(c, e) for c, e in readme_commands() if c not in SET_UP and not _covered_elsewhere(c) and not _slow(c)]
SLOW = [(c, e) for c, e in readme_commands() if c not in SET_UP and not _covered_elsewhere(c) and _slow(c)]


def test_every_readme_command_is_run_by_a_test():
    commands = readme_commands()
    assert len(commands) >= 10  # the parser found the README's examples
    for cmd, _ in commands:
        assert cmd in SET_UP or _covered_elsewhere(cmd) or (cmd, _) in FAST + SLOW, cmd
    for test in set(ELSEWHERE.values()):
        path, _, name = test.partition("::")
        tree = ast.parse((ROOT / path).read_text())
        assert name in {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}, test


def test_the_parser_reads_continuations_comments_and_expected_exits():
    text = "x\n```bash\npython -m pipeline a=1 \\\n    b=2   # note\n# only a comment\nfoo --bar   # -> exit 2\n```\n"
    assert readme_commands(text) == [("python -m pipeline a=1 b=2", 0), ("foo --bar", 2)]


def test_set_up_targets_do_what_the_readme_says():
    for target, needle in SET_UP.items():
        assert target in [c for c, _ in readme_commands()]
        dry = subprocess.run(["make", "-n", *target.split()[1:]], cwd=ROOT, capture_output=True, text=True)
        assert dry.returncode == 0 and needle in dry.stdout, dry.stdout + dry.stderr


def test_fast_readme_commands_in_order(tmp_path):
    """The README's quick commands, as a user types them one after another (a config file, a run, then
    predict / verify / keygen / sign on that run)."""
    _fixtures(tmp_path)
    run_dir = None
    for cmd, expected in FAST:
        proc = _run(cmd, tmp_path, expected, run_dir)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("run directory:")]
        if lines and run_dir is None:
            run_dir = Path(lines[-1].split(":", 1)[1].strip())
            if not run_dir.is_absolute():
                run_dir = tmp_path / run_dir
    assert run_dir is not None, "no fast README command made a run for the others to use"


@pytest.mark.slow
@pytest.mark.parametrize("cmd,expected", SLOW, ids=[c[:60] for c, _ in SLOW])
def test_slow_readme_command(cmd, expected, tmp_path):
    _fixtures(tmp_path)
    _run(cmd, tmp_path, expected, None)
