"""Shorter deployment polling (federated/fast_poll.py): the grid wrapper and the SuperNode patch, no processes."""

import time
from types import SimpleNamespace

from federated import fast_poll


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
