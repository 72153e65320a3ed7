"""Shorter message polling for deployments: Flower 1.42 waits a fixed 3 s between polls on both sides.

A deployment round is one message to every SuperNode and one reply back. Flower 1.42's
SuperNode sleeps 3 s whenever it finds no message (``flwr.supernode.start_client_internal``,
plus 0.5 s sleeps while it waits for the ClientApp's reply), and the ServerApp's gRPC/HTTP
grid sleeps 3 s between reply pulls (``flwr.superlink.grid.http_grid``): measured here, ~6 s
of every deployment round was these sleeps, with 0.05-1 s of training. Neither interval
is a setting in 1.42, so:

- :class:`FastPollGrid` wraps the ServerApp's grid and implements ``send_and_receive`` with
  the public ``push_messages`` / ``pull_messages`` calls and a ``POLL_S`` interval;
- ``python -m federated.patches.fast_poll supernode <flower-supernode args>`` runs ``flower-supernode``
  with the sleeps of its message loop capped at ``POLL_S``. This patches a module of Flower's
  (its ``time`` name) and is applied only to the Flower versions it was checked against
  (``CHECKED_FLWR``); on any other version the SuperNode runs unpatched and says so.

Flower also backs off from 1 s (doubling to 10 s) whenever it pulls a message's objects before
their sender has pushed them all (``flwr.supercore.inflatable.inflatable_utils.pull_objects``):
the sender pushes the message, then its objects, and the receiver starts pulling as soon as it
sees the message, so on loopback almost every round paid one such back-off at each hop that was
quicker than its sender (measured: the ServerApp idle 1.1 s mid-pull while the last site's reply
objects arrived; a SuperNode idle 0.5 s waiting for the server's). :func:`patch_object_pulls`
lowers those default back-offs to 0.05 s doubling to 0.5 s, in whichever process pulls (the
ServerApp, every SuperNode, every ClientApp process), and raises the retry count so an object is
waited for no shorter than Flower waits (500 tries x 10 s cap, bounded by its 7200 s limit).

Cost, and the back-off when idle (issue 25): every poll and heartbeat costs the SuperLink ~6-8 ms of CPU
(``scripts/bench_idle_sites.py``, this machine). Flat 0.1 s polls made every idle site 10 requests a second; now
a SuperNode polls every ``POLL_S`` only right after it handled a message and backs off in proportion to the time
it has been idle (``idle / IDLE_RATIO``, up to ``IDLE_POLL_S`` = 15 s after 5 idle minutes: a message waits at
most ~5 % of the time already waited), and its heartbeat goes from ``HEARTBEAT_S`` to Flower's 30 s after a
minute idle. An idle site then costs the SuperLink ~0.12 requests a second (Flower's stock: ~0.3).

In a simulation (issue 12) the ServerApp's in-memory grid looks for replies every ``SIM_PULL_S`` s
(:func:`wrap_grid`, its own ``pull_interval`` setting) and the engine hands queued messages to the
clients as often (:func:`patch_simulation_pickup`), instead of every 0.1 s each: lookups in the
memory of one process, where a CNN round of ~0.1 s of client work took two or three 0.1 s waits.

The same wrapper also shortens the SuperNode's heartbeat (:func:`patch_heartbeat`). A SuperLink
marks a node offline only once ``HEARTBEAT_PATIENCE`` (2) heartbeat intervals pass without one,
and only then answers the server's pending message to it with a "node unavailable" error: with
Flower's fixed 30 s a site killed mid-round held its round up for up to 60 s. The SuperNode
announces its interval to the SuperLink, which accepts 10-1800 s (``HEARTBEAT_MIN_INTERVAL``,
checked in the SuperLink): ``HEARTBEAT_S = 10`` is the shortest a stock SuperLink accepts, so a
dead site is declared unavailable within ~20 s, and nothing of the SuperLink is patched.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any, Iterable

from federated.patches.flower_api import CHECKED_FLWR  # the versions every patch here was read against

log = logging.getLogger(__name__)
POLL_S = 0.1  # seconds between polls (both sides)
# Simulation: the ServerApp's in-memory grid looks for replies every 0.1 s (Flower's default); each look is a
# lookup in this process's memory, and a CNN round (~0.1 s of work) ended on the second or third look.
SIM_PULL_S = 0.02
HEARTBEAT_S = 10  # heartbeat interval while a run is active (Flower's 30; a stock SuperLink accepts >= 10)
HEARTBEAT_IDLE_S = 30  # ... and while idle (Flower's own)
IDLE_RATIO = 20.0  # an idle SuperNode waits idle time / IDLE_RATIO between polls (POLL_S to IDLE_POLL_S)
STOCK_POLL_S = 3.0  # Flower's fixed wait after an empty poll (how the patch recognises that wait)
# The longest wait between an idle site's polls, reached after 300 s idle. Each poll costs the SuperLink ~6-8 ms of
# CPU (measured, scripts/bench_idle_sites.py): at Flower's 3 s, 1,000 idle sites would need ~2 SuperLink cores.
IDLE_POLL_S = 15.0
IDLE_HEARTBEAT_AFTER_S = 60.0  # idle this long: announce HEARTBEAT_IDLE_S; HEARTBEAT_SWITCH_S later, beat at it
HEARTBEAT_SWITCH_S = 15.0  # > one active beat period plus its call timeout: see patch_heartbeat
PULL_BACKOFF_S = (0.05, 0.5)  # first retry and cap (s) while a message's objects are not all pushed yet


class FastPollGrid:
    """A grid that polls for replies every ``poll_s`` seconds; everything else goes to the wrapped grid."""

    def __init__(self, grid: Any, poll_s: float = POLL_S):
        self._grid, self._poll_s = grid, poll_s

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None) -> list[Any]:
        """Push ``messages``, then pull replies until all arrived or ``timeout`` seconds passed (as Flower does)."""
        pending = set(self._grid.push_messages(messages))
        end = time.time() + (timeout if timeout is not None else 0.0)
        replies: list[Any] = []
        while timeout is None or time.time() < end:
            got = list(self._grid.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending:
                break
            time.sleep(self._poll_s)
        return replies


def wrap_grid(grid: Any) -> Any:
    """:class:`FastPollGrid` around a deployment's grid (Flower's HTTP grid), with short object-pull back-offs
    in this process (:func:`patch_object_pulls`); a simulation's grid polls every ``SIM_PULL_S`` s (its own
    ``pull_interval`` setting); any other grid as it is."""
    if type(grid).__module__ == "flwr.superlink.grid.http_grid" and hasattr(grid, "pull_messages"):
        patch_object_pulls()
        return FastPollGrid(grid)
    if type(grid).__name__ == "InMemoryGrid" and isinstance(getattr(grid, "pull_interval", None), float):
        grid.pull_interval = min(grid.pull_interval, SIM_PULL_S)
    return grid


def patch_simulation_pickup(interval_s: float = SIM_PULL_S) -> bool:
    """In Flower's simulation process: hand queued messages to the clients every ``interval_s`` s, not 0.1 s.

    Flower 1.42's simulation engine moves the ServerApp's messages to its client workers from a thread
    that scans every node and then waits a fixed 0.1 s (``vce_api.add_messages_to_queue``, not a setting):
    a round waited up to 0.1 s before any client started, and a CNN round (~0.1 s of client work on 2
    workers) took two or three such waits. This replaces that function (looked up when the engine starts its
    thread) with the same loop and a shorter wait, on the Flower versions it was checked against
    (``CHECKED_FLWR``), and only where the engine is already imported (the simulation process); False when
    it did nothing. Applied before the engine starts its thread, it takes effect; after, it changes nothing.
    """
    from importlib import metadata

    vce = sys.modules.get("flwr.server.superlink.fleet.vce.vce_api")
    if vce is None or not metadata.version("flwr").startswith(CHECKED_FLWR):
        return False
    if getattr(vce.add_messages_to_queue, "_fast_poll", False):
        return True

    def add_messages_to_queue(state, queue, nodes_mapping, f_stop) -> None:
        while not f_stop.is_set():  # Flower's loop, with interval_s for its 0.1
            for node_id in nodes_mapping.keys():
                for msg in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(msg)
            f_stop.wait(interval_s)

    add_messages_to_queue._fast_poll = True  # type: ignore[attr-defined]
    vce.add_messages_to_queue = add_messages_to_queue
    return True


def backoff_interval(idle_s: float, *, fast_s: float, slow_s: float, ratio: float = IDLE_RATIO) -> float:
    """The wait before the next poll of a process idle for ``idle_s`` s: ``idle_s / ratio``, within
    [``fast_s``, ``slow_s``]. Polls are short right after activity (the next message of a run follows soon) and
    back off to ``slow_s`` while idle, so a message waits at most ~1/``ratio`` of the time already waited."""
    return min(slow_s, max(fast_s, idle_s / ratio))


class _Activity:
    """When this SuperNode last handled a message (monotonic seconds); starts at the process's start."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    def mark(self) -> None:
        self.last = time.monotonic()

    def idle_s(self) -> float:
        return time.monotonic() - self.last


_ACTIVITY = _Activity()
_ON_POLL: list[Any] = []  # callables of the idle time, run before every wait of the message loop (heartbeat switch)


class _IdleBackoffSleep:
    """Stands in for the ``time`` module inside the SuperNode's message loop.

    The loop's wait after an empty poll (Flower's fixed ``time.sleep(3)``) becomes
    :func:`backoff_interval` of the time since the last message: ``cap_s`` while a run is active, backing off
    to ``idle_poll_s`` when idle (a run's first message then waits up to that long). Every other sleep of the loop (0.5 s waits while a message is handled) is capped at
    ``cap_s``. Everything else is the real :mod:`time`.
    """

    def __init__(self, cap_s: float, idle_poll_s: float = IDLE_POLL_S):
        self.cap_s, self.idle_poll_s = cap_s, idle_poll_s

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        if seconds < STOCK_POLL_S:  # a wait inside a message's handling
            time.sleep(min(seconds, self.cap_s))
            return
        idle = _ACTIVITY.idle_s()
        for hook in _ON_POLL:
            hook(idle)
        time.sleep(backoff_interval(idle, fast_s=self.cap_s, slow_s=self.idle_poll_s))


def patch_supernode(cap_s: float = POLL_S) -> bool:
    """Poll every ``cap_s`` s while a run is active and back off to Flower's 3 s when idle
    (:class:`_IdleBackoffSleep`; activity: the loop's ``_push_messages``, called once per message handled);
    False (unpatched) on unchecked versions."""
    from importlib import metadata

    import flwr.supernode.start_client_internal as loop

    version = metadata.version("flwr")
    if (
        not version.startswith(CHECKED_FLWR)
        or getattr(loop, "time", None) is not time
        or not callable(getattr(loop, "_push_messages", None))
    ):
        log.warning(
            "flwr %s: SuperNode polling left at Flower's 3 s (patch checked for %s only)", version, CHECKED_FLWR
        )
        return False
    push = loop._push_messages

    def _push_messages(*args: Any, **kwargs: Any) -> None:  # a message was pulled: the run is active
        _ACTIVITY.mark()
        for hook in _ON_POLL:  # the active heartbeat at once, for the whole of the message's handling
            hook(0.0)
        try:
            push(*args, **kwargs)
        finally:
            _ACTIVITY.mark()

    loop._push_messages = _push_messages
    loop.time = _IdleBackoffSleep(cap_s)
    return True


def patch_heartbeat(interval_s: float = HEARTBEAT_S, idle_interval_s: float = HEARTBEAT_IDLE_S) -> bool:
    """Announce and send this SuperNode's heartbeats every ``interval_s`` s instead of Flower's fixed 30 s while
    a run is active, and every ``idle_interval_s`` s once idle (with :func:`patch_supernode`).

    Flower 1.42 reads ``HEARTBEAT_DEFAULT_INTERVAL`` at call time from two modules: the SuperNode's
    fleet connection (the interval it announces in ActivateNode and every heartbeat) and the heartbeat
    sender (its period, ``(interval - HEARTBEAT_CALL_TIMEOUT) * ~0.8``). The SuperLink declares a node
    offline ``HEARTBEAT_PATIENCE`` announced intervals after its last heartbeat, so going idle switches in
    two steps: after ``IDLE_HEARTBEAT_AFTER_S`` idle the beats announce the idle interval, and only
    ``HEARTBEAT_SWITCH_S`` later (longer than one active period plus a call's timeout, so one such beat has
    gone out) do they come that seldom. Back to active, both switch at once (the pending wait is within the
    idle interval's patience). False (unpatched) on unchecked versions; ValueError for an interval the
    SuperLink would refuse.
    """
    from importlib import metadata

    import flwr.supercore.heartbeat as sender
    import flwr.supernode.fleet_http_connection as connection
    from flwr.common import constant

    version = metadata.version("flwr")
    modules = (connection, sender)
    if not version.startswith(CHECKED_FLWR) or not all(
        getattr(m, "HEARTBEAT_DEFAULT_INTERVAL", None) == constant.HEARTBEAT_DEFAULT_INTERVAL for m in modules
    ):
        log.warning(
            "flwr %s: SuperNode heartbeat left at Flower's default (patch checked for %s only)", version, CHECKED_FLWR
        )
        return False
    for value in (interval_s, idle_interval_s):
        if not constant.HEARTBEAT_MIN_INTERVAL <= value <= constant.HEARTBEAT_MAX_INTERVAL:
            raise ValueError(
                f"heartbeat interval {value} s is outside what a SuperLink accepts "
                f"[{constant.HEARTBEAT_MIN_INTERVAL}, {constant.HEARTBEAT_MAX_INTERVAL}]"
            )
    active_period = (interval_s - constant.HEARTBEAT_CALL_TIMEOUT) * (
        constant.HEARTBEAT_BASE_MULTIPLIER + max(constant.HEARTBEAT_RANDOM_RANGE)
    ) + constant.HEARTBEAT_CALL_TIMEOUT
    if HEARTBEAT_SWITCH_S <= active_period:
        raise ValueError(
            f"the {HEARTBEAT_SWITCH_S} s between announcing and using the idle heartbeat is not longer than one "
            f"active beat ({active_period:.1f} s): a node could be declared offline"
        )

    def set_interval(announced: float, period: float) -> None:
        connection.HEARTBEAT_DEFAULT_INTERVAL = announced  # type: ignore[attr-defined]
        sender.HEARTBEAT_DEFAULT_INTERVAL = period  # type: ignore[attr-defined]

    def switch(idle: float) -> None:
        announced = idle_interval_s if idle >= IDLE_HEARTBEAT_AFTER_S else interval_s
        period = idle_interval_s if idle >= IDLE_HEARTBEAT_AFTER_S + HEARTBEAT_SWITCH_S else interval_s
        set_interval(announced, period)

    set_interval(interval_s, interval_s)
    _ON_POLL[:] = [switch]
    return True


def patch_object_pulls(initial_s: float = PULL_BACKOFF_S[0], cap_s: float = PULL_BACKOFF_S[1]) -> bool:
    """Retry a not-yet-pushed object after ``initial_s`` s (doubling to ``cap_s``) instead of Flower's 1 s (to 10 s).

    Flower 1.42 binds ``PULL_INITIAL_BACKOFF`` / ``PULL_BACKOFF_CAP`` as keyword defaults of
    ``pull_objects`` and ``pull_and_inflate_object_from_tree`` (``flwr.supercore.inflatable.
    inflatable_utils``); every caller that matters here passes none (the SuperNode's message pull,
    the HTTP grid's ``pull_messages``, ``run_clientapp.pull_task_input``), so changing the functions'
    defaults changes them all. ``max_tries_per_object`` is raised by the same factor as the cap is
    lowered, so no object is given up on sooner than Flower would (its ``max_time`` still bounds
    the wait). False (unpatched) on unchecked versions or defaults other than the ones read.
    """
    from importlib import metadata

    import flwr.supercore.inflatable.inflatable_utils as inflatable
    from flwr.supercore import constant

    version = metadata.version("flwr")
    functions = (inflatable.pull_objects, inflatable.pull_and_inflate_object_from_tree)
    flower = {
        "initial_backoff": constant.PULL_INITIAL_BACKOFF,
        "backoff_cap": constant.PULL_BACKOFF_CAP,
        "max_tries_per_object": constant.PULL_MAX_TRIES_PER_OBJECT,
    }
    patched = {
        "initial_backoff": initial_s,
        "backoff_cap": cap_s,
        "max_tries_per_object": math.ceil(constant.PULL_MAX_TRIES_PER_OBJECT * constant.PULL_BACKOFF_CAP / cap_s),
    }
    if not 0 < initial_s <= cap_s:
        raise ValueError(f"back-off {initial_s} s to {cap_s} s: need 0 < initial <= cap")
    current = [{k: (f.__kwdefaults__ or {}).get(k) for k in flower} for f in functions]
    if all(c == patched for c in current):
        return True  # already patched in this process
    if not version.startswith(CHECKED_FLWR) or any(c != flower for c in current):
        log.warning(
            "flwr %s: object pulls keep Flower's %s-%s s back-off (patch checked for %s only)",
            version,
            constant.PULL_INITIAL_BACKOFF,
            constant.PULL_BACKOFF_CAP,
            CHECKED_FLWR,
        )
        return False
    for f in functions:
        f.__kwdefaults__ = {**(f.__kwdefaults__ or {}), **patched}
    return True


def main(argv: list[str]) -> int:
    """``python -m federated.patches.fast_poll supernode ARGS...``: ``flower-supernode ARGS...`` with short polling
    and a 10 s heartbeat."""
    if not argv or argv[0] != "supernode":
        print("usage: python -m federated.patches.fast_poll supernode <flower-supernode arguments>", file=sys.stderr)
        return 2
    patch_supernode()
    patch_object_pulls()
    patch_heartbeat()
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *argv[1:]]
    return flower_supernode() or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
