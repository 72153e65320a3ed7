"""Start and stop Flower's processes (SuperLink, SuperNodes, ``flwr run``) and clean up after them.

Everything started here runs in its own session, and :meth:`Processes.stop` ends each
one with its whole process tree (found through ``/proc`` before anything is killed, so
Ray's workers that outlive their parent are found too): on success, on failure, on
Ctrl-C and on SIGTERM. Flower's own settings go through the environment
(:func:`flower_env`), never through the user's ``~/.flwr``.

When the parent itself dies without running any ``finally`` (``kill -9``, OOM killer),
two mechanisms still end the run (Linux):

- every direct child is started with ``prctl(PR_SET_PDEATHSIG, SIGKILL)``: the kernel
  kills it when the thread that started it dies;
- grandchildren (``flwr-simulation``, Ray's raylet and workers) do not inherit that
  and re-parent to PID 1, so every process carries a run token in its environment
  (``AUDITABLE_FED_RUN=<uuid>``; children inherit the environment) and a small
  watchdog process (:mod:`federated.launch.watchdog`, in a session of its own so Ctrl-C does
  not reach it) polls the parent; when the parent is gone it SIGKILLs every process
  whose environment carries the token, until none is left.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator, Sequence

from auditml_core.errors import UserError
from federated.launch.watchdog import REMOVE, alive, all_pids, pids_with_markers

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]  # the Flower app: pyproject.toml with [tool.flwr.app]


class FederatedRunError(UserError):
    """The Flower run failed; the message carries the server's error or the log's tail."""


def bin_path(name: str) -> str:
    """A console script of this environment (``flwr``, ``flower-superlink``...), by absolute path."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def flower_env(flwr_home: Path, *, ray_tmp: Path | None = None) -> dict[str, str]:
    """Environment for Flower processes: own FLWR_HOME, no telemetry, no update check, no runtime installs.

    ``ray_tmp`` keeps Ray's session files (logs, sockets) in a folder of ours instead of ``/tmp/ray``.
    """
    env = dict(os.environ)
    if ray_tmp is not None:
        ray_tmp.mkdir(parents=True, exist_ok=True)
        env["RAY_TMPDIR"] = str(ray_tmp)
    env.update(
        {
            "FLWR_HOME": str(flwr_home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            # Otherwise the SuperLink runs `uv sync` on the app's dependencies, which ignores the
            # environment's torch build and downloads another one.
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
            "RAY_DISABLE_USAGE_STATS": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_connection(flwr_home: Path, name: str, *, address: str, root_certificates: str | None = None) -> None:
    """Write ``$FLWR_HOME/config.toml`` with one SuperLink connection, the default."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]", f'address = "{address}"']
    if root_certificates:
        lines.append(f'root-certificates = "{root_certificates}"')
    else:
        lines.append("insecure = true")
    (flwr_home / "config.toml").write_text("\n".join(lines) + "\n")


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux ``/proc``; empty elsewhere)."""
    if not Path("/proc").is_dir():
        return []
    children, out, todo = _children_map(), [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _tree(root: int) -> list[tuple[int, int]]:
    """``(pid, depth)`` of ``root`` (depth 0) and every process below it."""
    children = _children_map() if Path("/proc").is_dir() else {}
    out, todo = [], [(root, 0)]
    while todo:
        pid, depth = todo.pop()
        out.append((pid, depth))
        todo.extend((child, depth + 1) for child in children.get(pid, []))
    return out


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _wait_dead(pids: list[int], timeout_s: float, reap=None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if reap is not None:
            reap()  # reap our own children so they do not linger as zombies
        if not any(alive(p) for p in pids):
            return
        time.sleep(0.1)


def stop_trees(roots: Sequence[int], *, timeout_s: float = 10.0, reap=None) -> None:
    """Stop processes ``roots`` and everything below them, deepest first; SIGKILL whatever ignores SIGTERM.

    Leaves go first so that every process is reaped by its own (still living) parent:
    orphans would be left to PID 1, which in some containers never reaps them. The tree is
    recorded before any signal, so children that outlive their parent are found too.
    """
    levels: dict[int, list[int]] = {}
    for root in roots:
        for pid, depth in _tree(root):
            levels.setdefault(depth, []).append(pid)
    targets = [pid for pids in levels.values() for pid in pids]
    sessions = {_session(pid) for pid in targets} - {os.getsid(0), None}  # recorded while they live
    per_level = timeout_s / max(len(levels), 1)
    for depth in sorted(levels, reverse=True):
        for pid in levels[depth]:
            _signal(pid, signal.SIGTERM)
        _wait_dead(levels[depth], per_level, reap)
    for pid in targets:
        if alive(pid):
            _signal(pid, signal.SIGKILL)
    _wait_dead(targets, 5.0, reap)  # SIGKILL is not instantaneous either
    # Processes spawned while we were stopping (Ray restarts workers) are no longer below a
    # root, but they are still in one of the tree's sessions (never our own session).
    stragglers = [pid for pid in all_pids() if pid != os.getpid() and _session(pid) in sessions and alive(pid)]
    for pid in stragglers:
        _signal(pid, signal.SIGKILL)
    _wait_dead(stragglers, 5.0, reap)


def _session(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_peak_tree_bytes = 0  # highest sum of RSS over this process and all its descendants seen by any TreeMemory


def tree_rss_bytes(root: int | None = None) -> int:
    """Sum of the resident set sizes of ``root`` (default: this process) and every process below it.

    Pages shared between processes (libraries, Ray's object store) count once per process,
    as ``ps`` and ``top`` show them: an upper bound of the memory the tree holds.
    """
    total = 0
    for pid, _ in _tree(os.getpid() if root is None else root):
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
        except (OSError, IndexError, ValueError):
            continue
    return total


def peak_tree_rss_mb() -> float:
    """Peak of :func:`tree_rss_bytes` seen while any :class:`Processes` ran in this process, in MB (0 if none)."""
    return _peak_tree_bytes / 2**20


class TreeMemory:
    """Samples :func:`tree_rss_bytes` every ``interval_s`` in a daemon thread while Flower's processes run."""

    def __init__(self, interval_s: float = 0.5):
        import threading

        self.interval_s, self._stop, self._thread = interval_s, threading.Event(), None

    def _loop(self) -> None:
        global _peak_tree_bytes
        while not self._stop.is_set():
            _peak_tree_bytes = max(_peak_tree_bytes, tree_rss_bytes())
            self._stop.wait(self.interval_s)

    def start(self) -> None:
        import threading

        if self._thread is None and Path("/proc").is_dir():
            self._thread = threading.Thread(target=self._loop, name="tree-memory", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._thread = None


RUN_TOKEN_VAR = "AUDITABLE_FED_RUN"  # environment variable marking every process of one federated run
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _load_prctl():
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: the watchdog still covers the parent's death
        return None


# Looked up once here: the preexec_fn runs between fork and exec, where it should do as little as possible.
_PRCTL = _load_prctl() if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:
    """``preexec_fn``: ask the kernel to SIGKILL this child when the thread that started it dies (Linux only).

    The setting survives ``execve``, so it holds for the program the child becomes.
    """
    _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


# ``preexec_fn`` for a child that must not outlive this process (None where the kernel offers no such signal).
DIE_WITH_PARENT = _die_with_parent if _PRCTL is not None else None


def pids_with_token(token: str) -> list[int]:
    """Live processes (other than this one) whose environment carries ``AUDITABLE_FED_RUN=<token>``."""
    return pids_with_markers([f"{RUN_TOKEN_VAR}={token}"])


class Processes:
    """The processes of one federated run; a context manager that always stops them all.

    Every process gets the run token in its environment (``env[AUDITABLE_FED_RUN]``) and,
    while the context is open, a watchdog ends them all if this process dies abruptly.
    """

    def __init__(self, log_dir: Path, env: dict[str, str], *, disposable: Sequence[Path] = ()):
        self.token = uuid.uuid4().hex
        self.disposable = list(disposable)  # scratch folders the watchdog deletes if this process dies abruptly
        self.log_dir, self.env = log_dir, {**env, RUN_TOKEN_VAR: self.token}
        # Ray starts some agents without our token but with these per-run folders in their environment.
        self.markers = [f"{RUN_TOKEN_VAR}={self.token}"] + [
            f"{k}={env[k]}" for k in ("FLWR_HOME", "RAY_TMPDIR") if k in env
        ]
        self.procs: dict[str, subprocess.Popen] = {}
        self.watchdog: subprocess.Popen | None = None
        self.memory = TreeMemory()
        log_dir.mkdir(parents=True, exist_ok=True)

    def _start_watchdog(self) -> None:
        env = {k: v for k, v in self.env.items() if k != RUN_TOKEN_VAR}  # it must not match its own token
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
        with (self.log_dir / "watchdog.log").open("ab") as out:
            self.watchdog = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "federated.launch.watchdog",
                    str(os.getpid()),
                    *self.markers,
                    *(f"{REMOVE}{d}" for d in self.disposable),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # Ctrl-C in the terminal must not stop it before it has cleaned up
            )

    def start(self, name: str, argv: Sequence[str], *, cwd: Path | None = None) -> subprocess.Popen:
        """Start ``argv`` in its own session (killed with this process), output to ``<log_dir>/<name>.log``."""
        if self.watchdog is None:
            self._start_watchdog()
        self.memory.start()
        with (self.log_dir / f"{name}.log").open("ab") as out:
            proc = subprocess.Popen(
                list(argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=str(cwd) if cwd else None,
                start_new_session=True,
                preexec_fn=_die_with_parent if _PRCTL is not None else None,
            )
        self.procs[name] = proc
        log.debug("started %s (pid %d): %s", name, proc.pid, " ".join(argv))
        return proc

    def log_tail(self, name: str, lines: int = 25) -> str:
        """The last lines of a process's log."""
        path = self.log_dir / f"{name}.log"
        if not path.is_file():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop every process started here with its descendants (see :func:`stop_trees`)."""
        procs = list(self.procs.values())
        stop_trees([p.pid for p in procs], timeout_s=timeout_s, reap=lambda: [p.poll() for p in procs])
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        # Whatever carries the run token but was not below a root any more (re-parented, restarted by Ray).
        for _ in range(3):
            stragglers = pids_with_markers(self.markers)
            if not stragglers:
                break
            for pid in stragglers:
                _signal(pid, signal.SIGKILL)
            _wait_dead(stragglers, 5.0)
        self.procs.clear()
        self.memory.stop()
        if self.watchdog is not None:
            self.watchdog.kill()
            self.watchdog.wait(timeout=5)
            self.watchdog = None

    def __enter__(self) -> "Processes":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# The packages the Flower apps import: pyproject.toml's ``fab-include`` (a test checks the two agree).
APP_PACKAGES = ("auditml_core", "federated")


def stage_app(dest: Path) -> Path:
    """``dest``, holding this repository's Flower app and nothing else: pyproject.toml and the app's ``.py`` files.

    ``flwr run APP`` lists and pattern-matches every file under ``APP`` before it keeps the ones its
    include rules name; from the repository root that walk covers the ``.venv`` (~50k files): 3.2 s
    before every run on this machine (``flwr.cli.build.build_fab_from_disk``), against 0.01 s for the
    staged folder. The bundle built from it is byte for byte the one built from the repository root.
    """
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(REPO_ROOT / "pyproject.toml", dest / "pyproject.toml")
    for package in APP_PACKAGES:
        for src in sorted((REPO_ROOT / package).rglob("*.py")):  # (__pycache__ holds .pyc files only)
            target = dest / src.relative_to(REPO_ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)
    return dest


def start_flwr_run(procs: "Processes", connection: str, run_config: Path, *extra: str, app: Path) -> subprocess.Popen:
    """Submit the Flower app in folder ``app`` (see :func:`stage_app`) to ``connection`` with ``flwr run --stream``."""
    argv = [bin_path("flwr"), "run", str(app), connection, "--stream", "--run-config", str(run_config), *extra]
    return procs.start("flwr-run", argv)


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Turn SIGTERM into SystemExit while active, so ``finally`` blocks stop the processes."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def wait_until_healthy(
    proc: subprocess.Popen,
    port: int,
    *,
    timeout_s: float,
    what: str,
    logs: Processes,
    name: str,
    ca_file: str | None = None,
    host: str = "127.0.0.1",
) -> None:
    """Wait until ``GET /health`` on ``host``:``port`` answers 200 (HTTPS when ``ca_file``); fail fast if ``proc`` exits.

    Over HTTPS the server's certificate must cover ``host`` (an IP SAN for an address).
    """
    import ssl
    import urllib.error
    import urllib.request

    scheme = "https" if ca_file else "http"
    context = ssl.create_default_context(cafile=ca_file) if ca_file else None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FederatedRunError(f"{what} exited with code {proc.returncode} while starting:\n{logs.log_tail(name)}")
        try:
            url = f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}/health"
            with urllib.request.urlopen(url, timeout=1.0, context=context) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise FederatedRunError(f"{what} did not become ready within {timeout_s:.0f} s:\n{logs.log_tail(name)}")


def local_superlinks(flwr_home: Path) -> list[int]:
    """PIDs of SuperLinks that ``flwr run`` started on its own (``:local:`` connections) for this FLWR_HOME.

    ``flwr run`` leaves that SuperLink running after the run. It is recognised by its command
    line (``flower-superlink ... --simulation``) and its environment's ``FLWR_HOME``, so only
    the one started for ``flwr_home`` matches.
    """
    found = []
    want = f"FLWR_HOME={Path(flwr_home).expanduser().resolve()}".encode()
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"flower-superlink") for a in argv) and b"--simulation" in argv and want in environ:
            found.append(int(entry.name))
    return found


def stop_local_superlink(flwr_home: Path) -> list[int]:
    """Stop (with their process trees) the SuperLinks :func:`local_superlinks` finds; return their PIDs."""
    pids = local_superlinks(flwr_home)
    stop_trees(pids)
    return pids


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m federated.launch.processes",
        description="Stop the SuperLink that `flwr run` left running for a local simulation.",
    )
    parser.add_argument("command", choices=["stop-local-superlink"])
    parser.add_argument(
        "--flwr-home",
        default=os.environ.get("FLWR_HOME", str(Path.home() / ".flwr")),
        help="the FLWR_HOME `flwr run` used (default: $FLWR_HOME or ~/.flwr)",
    )
    stopped = stop_local_superlink(Path(parser.parse_args().flwr_home))
    print(
        f"stopped {len(stopped)} local SuperLink(s): {stopped}"
        if stopped
        else "no local SuperLink found for that FLWR_HOME"
    )
