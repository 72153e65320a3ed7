"""``python -m federated.launch.watchdog PARENT_PID MARKER... [--remove=DIR...]``: end a federated run whose parent died.

Started by :class:`federated.launch.processes.Processes` in a session of its own. It polls
``PARENT_PID`` every :data:`POLL_S` seconds; once that process is gone (``kill -9``,
OOM killer: no ``finally`` ran), it SIGKILLs every process whose environment carries one
of the run's markers (``AUDITABLE_FED_RUN=<token>``, and the run's own ``FLWR_HOME`` and
``RAY_TMPDIR``: Ray starts some agents without our token but with those) — SuperLink,
``flwr-simulation``, Ray's raylet, agents and workers, SuperNodes, ClientApps —
repeating until none has been seen for a while, then exits.
On a normal exit the parent stops the processes itself and kills this watchdog.
Kept free of heavy imports: it must start in a fraction of a second.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Sequence

POLL_S = 0.2  # how often the parent is checked, seconds
QUIET_S = 3.0  # stop sweeping after this long without finding a process of the run
MAX_SWEEP_S = 60.0  # give up sweeping after this long
REMOVE = "--remove="  # argument prefix: a scratch folder to delete once the run's processes are gone


def _parent_alive(pid: int, original_ppid: int) -> bool:
    if os.getppid() != original_ppid:
        return False  # re-parented: our parent is gone
    return alive(pid)


def all_pids() -> list[int]:
    """Every process id (Linux ``/proc``; empty elsewhere)."""
    return [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()] if Path("/proc").is_dir() else []


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def pids_with_markers(markers: Sequence[str]) -> list[int]:
    """Live processes (other than watchdogs) whose environment holds any of ``markers`` (``NAME=value``), or
    whose environment or command line names, anywhere, a folder a marker names (the run's ``FLWR_HOME``,
    ``RAY_TMPDIR``).

    The wider match catches Ray's agents (``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``): Ray starts them
    with an environment of its own (none of the markers; their ``PYTHONPATH`` names the run's ``FLWR_HOME``)
    and a process title in place of their arguments. They exit once they notice their raylet gone, which
    after a kill -9 in CI took more than 10 s.
    """
    wanted = {m.encode() for m in markers}
    folders = [m.split("=", 1)[1].encode() for m in markers if m.partition("=")[2].startswith("/")]
    found = []
    for pid in all_pids():
        if pid == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"federated.launch.watchdog" in cmdline:
            continue  # a run's watchdog (its arguments are the markers): the parent ends it, or it exits itself
        named = any(f in environ or f in cmdline for f in folders)
        if (named or set(environ.split(b"\0")) & wanted) and alive(pid):
            found.append(pid)
    return found


def sweep(markers: Sequence[str]) -> int:
    """SIGKILL every process of the run until none has been seen for QUIET_S seconds; return how many were killed."""
    killed, quiet_since, deadline = set(), time.monotonic(), time.monotonic() + MAX_SWEEP_S
    while time.monotonic() < deadline and time.monotonic() - quiet_since < QUIET_S:
        pids = pids_with_markers(markers)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except (ProcessLookupError, PermissionError):
                pass
        if pids:
            quiet_since = time.monotonic()
        time.sleep(0.1)
    return len(killed)


def main(argv: list[str]) -> int:
    parent = int(argv[0])
    markers = [a for a in argv[1:] if not a.startswith(REMOVE)]
    disposable = [a[len(REMOVE) :] for a in argv[1:] if a.startswith(REMOVE)]
    original_ppid = os.getppid()
    while _parent_alive(parent, original_ppid):
        time.sleep(POLL_S)
    n = sweep(markers)
    for folder in disposable:
        # The run's scratch folders (weights and ledgers trained on private data, Ray's session): the parent's
        # own clean-up never ran. What a resume needs was already mirrored into the run directory.
        shutil.rmtree(folder, ignore_errors=True)
    print(
        f"watchdog: parent {parent} died; killed {n} process(es) of run {markers[0]}; removed {disposable}", flush=True
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
