"""Shorter message polling for deployments: Flower 1.42 waits a fixed 3 s between polls on both sides.

A deployment round is one message to every SuperNode and one reply back. Flower 1.42's
SuperNode sleeps 3 s whenever it finds no message (``flwr.supernode.start_client_internal``,
plus 0.5 s sleeps while it waits for the ClientApp's reply), and the ServerApp's gRPC/HTTP
grid sleeps 3 s between reply pulls (``flwr.superlink.grid.http_grid``): measured here, ~6 s
of every deployment round was these sleeps, with 0.05-1 s of training. Neither interval
is a setting in 1.42, so:

- :class:`FastPollGrid` wraps the ServerApp's grid and implements ``send_and_receive`` with
  the public ``push_messages`` / ``pull_messages`` calls and a ``POLL_S`` interval;
- ``python -m federated.fast_poll supernode <flower-supernode args>`` runs ``flower-supernode``
  with the sleeps of its message loop capped at ``POLL_S``. This patches a module of Flower's
  (its ``time`` name) and is applied only to the Flower versions it was checked against
  (``CHECKED_FLWR``); on any other version the SuperNode runs unpatched and says so.

Cost: each SuperNode asks the SuperLink for messages every ``POLL_S`` s instead of every 3 s
when idle (``POLL_S = 0.1``: 10 small requests per second per site).

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
import sys
import time
from typing import Any, Iterable

log = logging.getLogger(__name__)
POLL_S = 0.1  # seconds between polls (both sides)
HEARTBEAT_S = 10  # seconds between a SuperNode's heartbeats (Flower's 30; a stock SuperLink accepts >= 10)
CHECKED_FLWR = ("1.42.",)  # Flower versions whose SuperNode message loop was read for the patch


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
    """:class:`FastPollGrid` around a deployment's grid (Flower's HTTP grid); any other grid as it is."""
    if type(grid).__module__ == "flwr.superlink.grid.http_grid" and hasattr(grid, "pull_messages"):
        return FastPollGrid(grid)
    return grid


class _CappedSleep:
    """Stands in for the ``time`` module inside one Flower module: ``sleep`` is capped at ``POLL_S``."""

    def __init__(self, cap_s: float):
        self.cap_s = cap_s

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap_s))


def patch_supernode(cap_s: float = POLL_S) -> bool:
    """Cap the sleeps of Flower's SuperNode message loop at ``cap_s``; False (unpatched) on unchecked versions."""
    from importlib import metadata

    import flwr.supernode.start_client_internal as loop

    version = metadata.version("flwr")
    if not version.startswith(CHECKED_FLWR) or getattr(loop, "time", None) is not time:
        log.warning(
            "flwr %s: SuperNode polling left at Flower's 3 s (patch checked for %s only)", version, CHECKED_FLWR
        )
        return False
    loop.time = _CappedSleep(cap_s)
    return True


def patch_heartbeat(interval_s: float = HEARTBEAT_S) -> bool:
    """Announce and send this SuperNode's heartbeats every ``interval_s`` s instead of Flower's fixed 30 s.

    Flower 1.42 reads ``HEARTBEAT_DEFAULT_INTERVAL`` at call time from two modules: the SuperNode's
    fleet connection (the interval it announces in ActivateNode and every heartbeat) and the heartbeat
    sender (its period, ``(interval - HEARTBEAT_CALL_TIMEOUT) * ~0.8``). False (unpatched) on unchecked
    versions or an interval the SuperLink would refuse.
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
    if not constant.HEARTBEAT_MIN_INTERVAL <= interval_s <= constant.HEARTBEAT_MAX_INTERVAL:
        raise ValueError(
            f"heartbeat interval {interval_s} s is outside what a SuperLink accepts "
            f"[{constant.HEARTBEAT_MIN_INTERVAL}, {constant.HEARTBEAT_MAX_INTERVAL}]"
        )
    for module in modules:
        module.HEARTBEAT_DEFAULT_INTERVAL = interval_s  # type: ignore[attr-defined]
    return True


def main(argv: list[str]) -> int:
    """``python -m federated.fast_poll supernode ARGS...``: ``flower-supernode ARGS...`` with short polling
    and a 10 s heartbeat."""
    if not argv or argv[0] != "supernode":
        print("usage: python -m federated.fast_poll supernode <flower-supernode arguments>", file=sys.stderr)
        return 2
    patch_supernode()
    patch_heartbeat()
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *argv[1:]]
    return flower_supernode() or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
