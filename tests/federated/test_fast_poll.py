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
