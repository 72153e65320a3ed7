import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from auditml_core.errors import ConfigError
from federated.app import checkpoint
from federated.app.strategies import STRATEGIES, RoundFailedError, build_strategy


def _sent(node: int) -> Message:
    return Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)


def _trained(node: int, value: float, n: int, pid: int) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(np.full(3, value, dtype=np.float32))}),
            "metrics": MetricRecord({"num-examples": n, "partition-id": pid, "epsilon": 1.5, "refused": 0}),
        }
    )
    return Message(content, reply_to=_sent(node))


def _refused(node: int, pid: int) -> Message:
    content = RecordDict(
        {
            "metrics": MetricRecord({"num-examples": 0, "partition-id": pid, "epsilon": 3.0, "refused": 1}),
            "status": ConfigRecord({"refused": "client refuses: budget"}),
        }
    )
    return Message(content, reply_to=_sent(node))


def _failed(node: int) -> Message:
    return Message(Error(code=2, reason="Traceback...\nRuntimeError: disk on fire"), reply_to=_sent(node))


def _strategy(name="fedavg", *, min_clients=1, sent=(1, 2, 3, 4), offset=0):
    s = build_strategy(name, n_clients=len(sent), min_clients=min_clients, round_offset=offset)
    from federated.app.strategies import RoundReplies

    s.rounds[1 + offset] = RoundReplies(round=1 + offset, sent_to=list(sent))
    return s


def test_only_trained_replies_are_averaged_and_everything_is_recorded():
    s = _strategy(min_clients=2)
    arrays, _ = s.aggregate_train(1, [_trained(1, 1.0, 10, 0), _trained(2, 4.0, 30, 1), _refused(3, 2), _failed(4)])
    assert np.allclose(arrays["w"].numpy(), (1.0 * 10 + 4.0 * 30) / 40)
    rec = s.rounds[1]
    assert [c["partition-id"] for c in rec.trained] == [0, 1]
    assert rec.refused[0]["reason"] == "client refuses: budget"
    assert rec.failed[0]["node_id"] == 4 and rec.failed[0]["reason"].endswith("RuntimeError: disk on fire")


def test_the_average_does_not_depend_on_the_order_the_replies_arrive_in():
    """Flower samples nodes in a random order; float32 sums depend on their order, so the strategy sums the updates
    in client order (else a seeded federated run is not reproducible: issue 25 item 8's accuracy table)."""
    rng = np.random.default_rng(0)
    values = [rng.standard_normal(1000).astype(np.float32) * 10.0 ** rng.integers(-3, 4) for _ in range(5)]

    def replies(order):
        out = []
        for pid in order:
            content = RecordDict(
                {
                    "arrays": ArrayRecord({"w": Array(values[pid])}),
                    "metrics": MetricRecord({"num-examples": 50 + 7 * pid, "partition-id": pid, "refused": 0}),
                }
            )
            out.append(Message(content, reply_to=_sent(pid + 1)))
        return out

    orders = [[0, 1, 2, 3, 4], [4, 2, 0, 3, 1], [3, 1, 4, 0, 2]]
    averages = []
    for order in orders:
        s = _strategy(min_clients=1, sent=(1, 2, 3, 4, 5))
        averages.append(s.aggregate_train(1, replies(order))[0]["w"].numpy())
    assert all(np.array_equal(averages[0], a) for a in averages[1:])  # bit for bit

    # The control: summed in the arrival order, the orders above give different float32 averages.
    def naive(order):
        n = np.array([50 + 7 * pid for pid in order], dtype=np.float64)
        out = None
        for pid, w in zip(order, n / n.sum()):
            out = values[pid] * w if out is None else out + values[pid] * w
        return out

    assert not all(np.array_equal(naive(orders[0]), naive(o)) for o in orders[1:])


def test_a_node_that_never_replies_is_a_failure():
    s = _strategy(min_clients=1, sent=(1, 2))
    s.aggregate_train(1, [_trained(1, 1.0, 10, 0)])
    assert s.rounds[1].failed == [{"node_id": 2, "reason": "no reply before the round timeout"}]


def test_failures_below_min_clients_stop_the_run():
    s = _strategy(min_clients=3, sent=(1, 2, 3))
    with pytest.raises(RoundFailedError, match="federated.min_clients=3"):
        s.aggregate_train(1, [_trained(1, 1.0, 10, 0), _trained(2, 1.0, 10, 1), _failed(3)])


def test_refusals_alone_fail_the_run_naming_the_budget():
    from auditml_core.errors import PrivacyBudgetError

    s = _strategy(min_clients=1, sent=(1, 2))
    with pytest.raises(PrivacyBudgetError, match=r"2 refused.*dp\.target_epsilon.*client refuses: budget"):
        s.aggregate_train(1, [_refused(1, 0), _refused(2, 1)])


def test_rounds_continue_their_numbering_after_a_resume():
    s = _strategy(offset=4, sent=(1,))
    s.aggregate_train(1, [_trained(1, 2.0, 5, 0)])
    assert 5 in s.rounds and s.rounds[5].trained


def test_factory_lists_the_valid_strategies():
    with pytest.raises(ConfigError, match=", ".join(STRATEGIES)):
        build_strategy("scaffold", n_clients=2, min_clients=1)


def test_fedadam_moments_round_trip_through_the_checkpoint(tmp_path):
    s = build_strategy("fedadam", n_clients=2, min_clients=1)
    s.m_t, s.v_t = {"w": np.ones(3)}, {"w": np.full(3, 2.0)}
    path = tmp_path / "ck.safetensors"
    checkpoint.save(
        path,
        checkpoint.ServerCheckpoint(
            weights={"w": np.zeros(3)},
            strategy_state=s.optimizer_state(),
            record={"completed_rounds": 1, "x": float("nan")},
        ),
    )
    ck = checkpoint.load(path)
    t = build_strategy("fedadam", n_clients=2, min_clients=1)
    t.load_optimizer_state(ck.strategy_state)
    assert np.array_equal(t.m_t["w"], s.m_t["w"]) and np.array_equal(t.v_t["w"], s.v_t["w"])
    assert ck.record["completed_rounds"] == 1 and np.array_equal(ck.weights["w"], np.zeros(3))


def test_fingerprint_ignores_where_files_live_but_not_what_is_trained():
    base = {"federated.rounds": 3, "app.work-dir": "/a"}
    assert checkpoint.fingerprint(base) == checkpoint.fingerprint({**base, "app.work-dir": "/b"})
    assert checkpoint.fingerprint(base) != checkpoint.fingerprint({**base, "federated.rounds": 4})


class _Grid:
    """The Grid surface configure_train uses: connected node ids (a SuperNode that died is no longer listed)."""

    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return list(self.nodes)


def test_a_supernode_gone_between_rounds_is_recorded_and_the_round_goes_to_the_others():
    s = build_strategy("fedavg", n_clients=3, min_clients=2)
    arrays = ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})
    sent1 = s.configure_train(1, arrays, ConfigRecord(), _Grid([1, 2, 3]))
    assert sorted(m.metadata.dst_node_id for m in sent1) == [1, 2, 3]
    s.aggregate_train(1, [_trained(1, 1.0, 10, 0), _trained(2, 1.0, 10, 1), _trained(3, 1.0, 10, 2)])
    # Node 3's SuperNode was killed: round 2 must not wait for it (Flower would wait for min_available_nodes).
    sent2 = s.configure_train(2, arrays, ConfigRecord(), _Grid([1, 2]))
    assert sorted(m.metadata.dst_node_id for m in sent2) == [1, 2]
    arrays2, _ = s.aggregate_train(2, [_trained(1, 2.0, 10, 0), _trained(2, 2.0, 10, 1)])
    assert arrays2 is not None
    assert s.rounds[2].failed == [{"node_id": 3, "reason": "node not connected when the round started"}]


def test_a_node_killed_mid_round_is_recorded_once_under_its_own_id():
    """The SuperLink answers for a dead node ("Node Unavailable") from its own node id: the record names the
    dead node (the message's destination), once, not the SuperLink plus a "no reply" for the node."""
    from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

    s = build_strategy("fedavg", n_clients=3, min_clients=2)
    arrays = ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})
    sent = s.configure_train(1, arrays, ConfigRecord(), _Grid([11, 12, 13]))
    for m in sent:  # what the grid does as it pushes them
        m.metadata.__dict__["_message_id"] = m.object_id
    dead = next(m for m in sent if m.metadata.dst_node_id == 13)
    unavailable = create_message_error_unavailable_res_message(dead.metadata, "node_unavail")
    assert unavailable.metadata.src_node_id not in (11, 12, 13)  # Flower's SuperLink id, not the node's
    s.aggregate_train(1, [_trained(11, 1.0, 10, 0), _trained(12, 1.0, 10, 1), unavailable])
    (failure,) = s.rounds[1].failed
    assert failure["node_id"] == 13 and "Node Unavailable" in failure["reason"]


def test_a_node_whose_site_came_back_under_a_new_id_is_not_counted_missing():
    s = build_strategy("fedavg", n_clients=2, min_clients=1)
    arrays = ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})
    s.configure_train(1, arrays, ConfigRecord(), _Grid([1, 2]))
    s.aggregate_train(1, [_trained(1, 1.0, 10, 0), _trained(2, 1.0, 10, 1)])
    grid = _Grid([1, 3])
    grid.replaced_nodes = {2}  # site 1 rejoined as node 3 (federated.app.site.AdmittedSites)
    s.configure_train(2, arrays, ConfigRecord(), grid)
    s.aggregate_train(2, [_trained(1, 1.0, 10, 0), _trained(3, 1.0, 10, 1)])
    assert s.rounds[2].failed == []
    s.configure_train(3, arrays, ConfigRecord(), _Grid([1, 3]))  # without the grid's word, node 2 is missing
    assert [f["node_id"] for f in s.rounds[3].failed] == [2]
