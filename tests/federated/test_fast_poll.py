"""Shorter deployment polling (federated/patches/fast_poll.py): the grid wrapper and the SuperNode patch, no processes."""

import sys
import time
from types import SimpleNamespace

from federated.patches import fast_poll


class FakeGrid:
    """Replies to message i arrive at pull number ``arrive[i]``."""

    def __init__(self, arrive):
        self.arrive, self.pulls, self.other = arrive, 0, "delegated"

    def push_messages(self, messages):
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, ids):
        self.pulls += 1
        return [
            SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=f"m{i}"))
            for i, at in enumerate(self.arrive)
            if at == self.pulls and f"m{i}" in ids
        ]


def test_every_reply_is_collected_once_polling_at_the_short_interval():
    grid = FakeGrid([1, 3, 3])
    t0 = time.monotonic()
    replies = fast_poll.FastPollGrid(grid, poll_s=0.01).send_and_receive(["a", "b", "c"], timeout=5)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]
    assert grid.pulls == 3 and time.monotonic() - t0 < 1.0  # Flower's grid: 2 x 3 s of sleep
    assert fast_poll.FastPollGrid(grid).other == "delegated"


def test_a_missing_reply_ends_at_the_timeout_with_the_replies_that_came():
    grid = FakeGrid([1, 99])
    replies = fast_poll.FastPollGrid(grid, poll_s=0.01).send_and_receive(["a", "b"], timeout=0.2)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]


def test_only_flowers_deployment_grid_is_wrapped():
    grid = FakeGrid([1])
    assert fast_poll.wrap_grid(grid) is grid  # simulation and test grids keep their own polling


def test_the_supernode_patch_caps_only_the_sleeps_of_its_message_loop(monkeypatch):
    import flwr.supernode.start_client_internal as loop

    monkeypatch.setattr(loop, "time", time)  # undone after the test
    assert fast_poll.patch_supernode(cap_s=0.01)
    t0 = time.monotonic()
    loop.time.sleep(3)
    assert time.monotonic() - t0 < 0.5 and loop.time.time() > 0  # everything else is the real module
    assert time.sleep is not loop.time.sleep


def test_the_heartbeat_patch_announces_the_shortest_interval_a_stock_superlink_accepts(monkeypatch):
    import flwr.supercore.heartbeat as sender
    import flwr.supernode.fleet_http_connection as connection
    from flwr.common import constant
    from flwr.superlink.servicer.fleet.fleet_handlers import _validate_heartbeat_interval

    for module in (connection, sender):  # undone after the test
        monkeypatch.setattr(module, "HEARTBEAT_DEFAULT_INTERVAL", constant.HEARTBEAT_DEFAULT_INTERVAL)
    assert fast_poll.patch_heartbeat()
    assert connection.HEARTBEAT_DEFAULT_INTERVAL == sender.HEARTBEAT_DEFAULT_INTERVAL == fast_poll.HEARTBEAT_S
    assert fast_poll.HEARTBEAT_S < constant.HEARTBEAT_DEFAULT_INTERVAL
    _validate_heartbeat_interval(fast_poll.HEARTBEAT_S)  # the SuperLink's own check accepts it (raises otherwise)
    # The sender's period stays positive: (interval - call timeout) x ~0.8 (Flower's formula).
    assert fast_poll.HEARTBEAT_S > constant.HEARTBEAT_CALL_TIMEOUT
    # Dead-site detection: offline once HEARTBEAT_PATIENCE intervals pass without a heartbeat.
    assert constant.HEARTBEAT_PATIENCE * fast_poll.HEARTBEAT_S <= 20


def _record_backoffs(monkeypatch, failures: int) -> list[float]:
    """Pull one object that is unavailable ``failures`` times; the back-off waits Flower asked for (not slept)."""
    import flwr.supercore.inflatable.inflatable_utils as inflatable

    waits: list[float] = []

    class Event(inflatable.threading.Event):
        def wait(self, timeout=None):
            if sys._getframe(1).f_code.co_name != "pull_with_retries":  # the executor's own events
                return super().wait(timeout)
            waits.append(timeout)
            return self.is_set()

    monkeypatch.setattr(inflatable.threading, "Event", Event)
    calls = {"n": 0}

    def pull(object_id):
        calls["n"] += 1
        if calls["n"] <= failures:
            raise inflatable.ObjectUnavailableError(object_id)
        return b"content"

    assert inflatable.pull_objects(["obj"], pull_object_fn=pull) == {"obj": b"content"}
    return waits


def test_object_pulls_retry_after_the_short_back_off_and_wait_as_long_as_flower_would(monkeypatch):
    import flwr.supercore.inflatable.inflatable_utils as inflatable
    from flwr.supercore import constant

    for f in (inflatable.pull_objects, inflatable.pull_and_inflate_object_from_tree):  # undone after the test
        monkeypatch.setattr(f, "__kwdefaults__", dict(f.__kwdefaults__))
    flower = _record_backoffs(monkeypatch, failures=3)
    assert flower[0] >= 0.8 * constant.PULL_INITIAL_BACKOFF  # Flower's: 1 s, 2 s, 4 s (+-20 % jitter)
    assert fast_poll.patch_object_pulls() and fast_poll.patch_object_pulls()  # idempotent
    waits = _record_backoffs(monkeypatch, failures=6)
    first, cap = fast_poll.PULL_BACKOFF_S
    assert len(waits) == 6 and first * 0.8 <= waits[0] <= first * 1.2 and max(waits) <= cap * 1.2
    assert waits[-1] >= cap * 0.8  # doubled up to the cap
    defaults = inflatable.pull_and_inflate_object_from_tree.__kwdefaults__
    assert defaults["initial_backoff"] == first and defaults["backoff_cap"] == cap
    # No object is given up on sooner than Flower would: tries x cap >= Flower's tries x cap.
    patience = defaults["max_tries_per_object"] * cap
    assert patience >= constant.PULL_MAX_TRIES_PER_OBJECT * constant.PULL_BACKOFF_CAP


def test_object_pull_patch_leaves_defaults_it_was_not_read_against(monkeypatch):
    import flwr.supercore.inflatable.inflatable_utils as inflatable

    for f in (inflatable.pull_objects, inflatable.pull_and_inflate_object_from_tree):
        monkeypatch.setattr(f, "__kwdefaults__", {**f.__kwdefaults__, "initial_backoff": 3})
    assert not fast_poll.patch_object_pulls()
    assert inflatable.pull_objects.__kwdefaults__["initial_backoff"] == 3
