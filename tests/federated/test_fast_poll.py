"""Shorter deployment polling (federated/patches/fast_poll.py): the grid wrapper and the SuperNode patch, no processes."""

import sys
import time
from types import SimpleNamespace

import pytest

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
    monkeypatch.setattr(loop, "_push_messages", loop._push_messages)
    assert fast_poll.patch_supernode(cap_s=0.01)
    fast_poll._ACTIVITY.mark()  # a message was just handled: the run is active
    t0 = time.monotonic()
    loop.time.sleep(3)
    assert time.monotonic() - t0 < 0.5 and loop.time.time() > 0  # everything else is the real module
    assert time.sleep is not loop.time.sleep


def test_an_idle_supernode_backs_off_and_a_message_makes_it_fast_again(monkeypatch):
    """Issue 25 item 5: 0.1 s polls while a run is active, backing off when idle (each poll costs the SuperLink)."""
    import flwr.supernode.start_client_internal as loop

    monkeypatch.setattr(loop, "time", time)
    handled = []
    monkeypatch.setattr(loop, "_push_messages", lambda *a, **k: handled.append(a))
    hooks: list[float] = []
    monkeypatch.setattr(fast_poll, "_ON_POLL", [hooks.append])
    assert fast_poll.patch_supernode()
    waits: list[float] = []
    monkeypatch.setattr(fast_poll.time, "sleep", waits.append)  # record, do not sleep (the module is shared)
    now = time.monotonic()
    for idle, want in ((0.0, 0.1), (1.0, 0.1), (10.0, 0.5), (40.0, 2.0), (200.0, 10.0), (3600.0, 15.0)):
        fast_poll._ACTIVITY.last = now - idle
        loop.time.sleep(3)  # the loop's wait after an empty poll
        assert waits.pop() == pytest.approx(want, abs=0.01), idle
        assert hooks.pop() == pytest.approx(idle, abs=1.0)  # the heartbeat switch sees the idle time
    loop.time.sleep(0.5)  # a wait while a message is handled: short even when idle
    assert waits.pop() == fast_poll.POLL_S
    loop._push_messages("state")  # a message came: fast again, and the heartbeat active for its handling
    assert handled == [("state",)] and fast_poll._ACTIVITY.idle_s() < 1.0 and hooks.pop() == 0.0
    loop.time.sleep(3)
    assert waits.pop() == fast_poll.POLL_S
    # Polls in an idle site's first hour: 20 in the first 2 s, ~110 backing off until 300 s, then every 15 s.
    t, polls = 0.0, 0
    while t < 3600:
        t += fast_poll.backoff_interval(t, fast_s=fast_poll.POLL_S, slow_s=fast_poll.IDLE_POLL_S)
        polls += 1
    assert 340 < polls < 360  # flat 0.1 s polls: 36,000; Flower's 3 s: 1,200


def test_the_heartbeat_patch_announces_the_shortest_interval_a_stock_superlink_accepts(monkeypatch):
    import flwr.supercore.heartbeat as sender
    import flwr.supernode.fleet_http_connection as connection
    from flwr.common import constant
    from flwr.superlink.servicer.fleet.fleet_handlers import _validate_heartbeat_interval

    for module in (connection, sender):  # undone after the test
        monkeypatch.setattr(module, "HEARTBEAT_DEFAULT_INTERVAL", constant.HEARTBEAT_DEFAULT_INTERVAL)
    monkeypatch.setattr(fast_poll, "_ON_POLL", [])
    assert fast_poll.patch_heartbeat()
    assert connection.HEARTBEAT_DEFAULT_INTERVAL == sender.HEARTBEAT_DEFAULT_INTERVAL == fast_poll.HEARTBEAT_S
    assert fast_poll.HEARTBEAT_S < constant.HEARTBEAT_DEFAULT_INTERVAL
    _validate_heartbeat_interval(fast_poll.HEARTBEAT_S)  # the SuperLink's own check accepts it (raises otherwise)
    # The sender's period stays positive: (interval - call timeout) x ~0.8 (Flower's formula).
    assert fast_poll.HEARTBEAT_S > constant.HEARTBEAT_CALL_TIMEOUT
    # Dead-site detection: offline once HEARTBEAT_PATIENCE intervals pass without a heartbeat.
    assert constant.HEARTBEAT_PATIENCE * fast_poll.HEARTBEAT_S <= 20


def test_the_heartbeat_slows_down_when_idle_in_two_steps_the_superlink_accepts(monkeypatch):
    import flwr.supercore.heartbeat as sender
    import flwr.supernode.fleet_http_connection as connection
    from flwr.common import constant

    for module in (connection, sender):
        monkeypatch.setattr(module, "HEARTBEAT_DEFAULT_INTERVAL", constant.HEARTBEAT_DEFAULT_INTERVAL)
    monkeypatch.setattr(fast_poll, "_ON_POLL", [])
    assert fast_poll.patch_heartbeat()
    (switch,) = fast_poll._ON_POLL
    active, idle = fast_poll.HEARTBEAT_S, fast_poll.HEARTBEAT_IDLE_S
    steps = [
        0.0,
        fast_poll.IDLE_HEARTBEAT_AFTER_S,
        fast_poll.IDLE_HEARTBEAT_AFTER_S + fast_poll.HEARTBEAT_SWITCH_S,
        0.0,
    ]
    seen = []
    for t in steps:
        switch(t)
        seen.append((connection.HEARTBEAT_DEFAULT_INTERVAL, sender.HEARTBEAT_DEFAULT_INTERVAL))
    # (announced, period): active; announce the idle interval first; then beat at it; active again at once.
    assert seen == [(active, active), (idle, active), (idle, idle), (active, active)]
    # Between the two steps at least one beat announcing the idle interval goes out: the longest active period
    # (Flower's formula, plus a call's timeout) is shorter than the gap, and every wait fits the patience.
    longest_active = (active - constant.HEARTBEAT_CALL_TIMEOUT) * 0.9 + constant.HEARTBEAT_CALL_TIMEOUT
    longest_idle = (idle - constant.HEARTBEAT_CALL_TIMEOUT) * 0.9 + constant.HEARTBEAT_CALL_TIMEOUT
    assert longest_active < fast_poll.HEARTBEAT_SWITCH_S
    assert longest_active <= constant.HEARTBEAT_PATIENCE * active and longest_idle <= constant.HEARTBEAT_PATIENCE * idle
    monkeypatch.setattr(fast_poll, "HEARTBEAT_SWITCH_S", 5.0)  # a gap no longer than one active beat
    for module in (connection, sender):
        monkeypatch.setattr(module, "HEARTBEAT_DEFAULT_INTERVAL", constant.HEARTBEAT_DEFAULT_INTERVAL)
    with pytest.raises(ValueError, match="could be declared offline"):
        fast_poll.patch_heartbeat()


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
