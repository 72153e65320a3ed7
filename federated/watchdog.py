"""``python -m federated.watchdog PARENT_PID TOKEN``: end a federated run whose parent died abruptly.

Started by :class:`federated.launcher.Processes` in a session of its own. It polls
``PARENT_PID`` every :data:`POLL_S` seconds; once that process is gone (``kill -9``,
OOM killer: no ``finally`` ran), it SIGKILLs every process whose environment carries
``AUDITABLE_FED_RUN=TOKEN`` (SuperLink, ``flwr-simulation``, Ray's raylet and workers,
SuperNodes, ClientApps), repeating until none has been seen for a while, then exits.
On a normal exit the parent stops the processes itself and kills this watchdog.
Kept free of heavy imports: it must start in a fraction of a second.
"""

from __future__ import annotations

import os
import signal
import sys
import time

POLL_S = 0.2  # how often the parent is checked, seconds
QUIET_S = 3.0  # stop sweeping after this long without finding a process of the run
MAX_SWEEP_S = 60.0  # give up sweeping after this long


def _parent_alive(pid: int, original_ppid: int) -> bool:
    if os.getppid() != original_ppid:
        return False  # re-parented: our parent is gone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def sweep(token: str) -> int:
    """SIGKILL every process of the run until none has been seen for QUIET_S seconds; return how many were killed."""
    from federated.launcher import pids_with_token

    killed, quiet_since, deadline = set(), time.monotonic(), time.monotonic() + MAX_SWEEP_S
    while time.monotonic() < deadline and time.monotonic() - quiet_since < QUIET_S:
        pids = pids_with_token(token)
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
    parent, token = int(argv[0]), argv[1]
    original_ppid = os.getppid()
    while _parent_alive(parent, original_ppid):
        time.sleep(POLL_S)
    n = sweep(token)
    print(f"watchdog: parent {parent} died; killed {n} process(es) of run {token}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
