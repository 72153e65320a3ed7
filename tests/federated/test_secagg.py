"""SecAgg+ proven from the server's side: no client's update in the clear, the aggregate is FedAvg's.

The ServerApp runs in-process against a Grid whose nodes are ClientApp calls. The test
records, on the client side (Flower's ``_collect_masked_vectors``, the last point before
quantisation and masking), what each client really uploads, and on the server side every
reply the server receives and every result its strategy aggregates. Then:

- no reply carries a tensor in the clear, and each masked vector, read the way the server
  would read an unmasked one, matches no client's true quantised upload;
- the strategy only ever sees the unmasked *average*, and that equals plain FedAvg of the
  clients' true weights within the quantisation error bound derived below;
- a client that drops out after the keys are shared (it fails while training) leaves a
  correct average of the survivors.
"""

import copy
import importlib
import json
from types import SimpleNamespace

import numpy as np
import pytest
from fed_helpers import InProcessGrid, make_cfg, prepare_work_dir, server_context
from flwr.common import bytes_to_ndarray, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from auditml_core import models
from auditml_core.errors import ConfigError
from federated.app import secagg, workdir
from federated.app.server_app import main
from federated.app.strategies import RoundFailedError
from federated.app.workdir import read_result

client_mod = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")

SECAGG = ["federated.secure_aggregation=true", "federated.n_clients=3", "federated.min_clients=2"]


class RecordingGrid(InProcessGrid):
    """The in-process grid, keeping every reply the server receives."""

    run = SimpleNamespace(run_id=7)  # the legacy client manager reads it

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.replies = []

    def send_and_receive(self, messages, *, timeout=None):
        # a real transport serialises each message: a client must not mutate the copy another receives
        replies = super().send_and_receive([copy.deepcopy(m) for m in messages], timeout=timeout)
        self.replies.extend(replies)
        return replies


@pytest.fixture
def spy(monkeypatch):
    """Clients' true uploads (per client call) and the strategy's inputs/outputs (per round)."""
    seen = SimpleNamespace(uploads=[], rounds=[])
    original = client_mod._collect_masked_vectors

    def collect(state, configs, num_examples, parameters):
        seen.uploads.append(
            {
                "node": state.nid,
                "n": num_examples,
                "max_weight": state.max_weight,
                "weights": parameters_to_ndarrays(parameters),
            }
        )
        return original(state, configs, num_examples, parameters)

    monkeypatch.setattr(client_mod, "_collect_masked_vectors", collect)
    aggregate = secagg.SecAggFedAvg.aggregate_fit

    def aggregate_fit(self, server_round, results, failures):
        out = aggregate(self, server_round, results, failures)
        seen.rounds.append(
            {
                "results": [(int(p.node_id), parameters_to_ndarrays(r.parameters)) for p, r in results],
                "aggregate": parameters_to_ndarrays(out[0]),
                "uploads": seen.uploads[:],
            }
        )
        seen.uploads.clear()
        return out

    monkeypatch.setattr(secagg.SecAggFedAvg, "aggregate_fit", aggregate_fit)
    return seen


def _run(tmp_path, digits_data, *overrides, name="cnn", **app):
    cfg = make_cfg(*SECAGG, *overrides)
    rc = prepare_work_dir(tmp_path, cfg, digits_data, name=name, **app)
    grid = RecordingGrid(rc, 3)
    main(grid, server_context(rc))
    return cfg, grid, read_result(tmp_path, name)


def _fedavg_and_bound(uploads, cfg):
    """Plain FedAvg of the true uploads, and the largest deviation SecAgg+'s quantisation can cause.

    Client i uploads a_i·w_i with a_i = n_i / max_weight, quantised with step s = 2R/Q by
    stochastic rounding (error below one step per coordinate), and its weight a_i is itself
    rounded to â_i = round(a_i·Q)/Q (|â_i − a_i| <= 1/(2Q)). The server returns
    (Σ â_i w_i + e) / Σ â_i with |e| < n·s, so per coordinate
    |SecAgg+ − FedAvg| <= (n·s + n·max|w|/Q) / Σ â_i.
    """
    a = cfg.federated.secagg
    n = np.array([u["n"] for u in uploads], dtype=float)
    ratios = n / uploads[0]["max_weight"]
    q_ratios = np.round(ratios * a.quantization_range) / a.quantization_range
    fedavg = [
        sum(ni * u["weights"][j] for ni, u in zip(n, uploads)) / n.sum() for j in range(len(uploads[0]["weights"]))
    ]
    w_max = max(float(np.max(np.abs(w))) for u in uploads for w in u["weights"])
    step = 2 * a.clipping_range / a.quantization_range
    bound = (len(uploads) * step + len(uploads) * w_max / a.quantization_range) / q_ratios.sum()
    return fedavg, bound


@pytest.mark.parametrize("name", ["cnn", "regressor"])
def test_the_server_sees_only_the_average_and_it_is_fedavgs(tmp_path, digits_data, spy, name):
    cfg, grid, (weights, record) = _run(tmp_path, digits_data, name=name)
    a = cfg.federated.secagg
    assert [h["round"] for h in record["history"]] == [1, 2, 3]
    assert [h["clients_trained"] for h in record["history"]] == [3, 3, 3]
    assert (
        record["secure_aggregation"]["num_shares"] == 3
        and record["secure_aggregation"]["reconstruction_threshold"] == 2
    )
    assert len(spy.rounds) == 3

    # 1. nothing the server receives holds a tensor in the clear
    for reply in grid.replies:
        assert not reply.has_error()
        assert all(len(rec) == 0 for rec in reply.content.array_records.values())

    # 2. each masked vector matches no client's true quantised upload (masks are uniform mod 2^32)
    masked = [
        [bytes_to_ndarray(b) for b in r.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
        for r in grid.replies
        if Key.MASKED_PARAMETERS in r.content.config_records[RECORD_KEY_CONFIGS]
    ]
    assert len(masked) == 9  # 3 clients x 3 rounds
    uploads = [u for rnd in spy.rounds for u in rnd["uploads"]]
    q = a.quantization_range
    for vec in masked:
        flat_masked = np.concatenate([v.ravel() for v in vec[1:]]).astype(np.int64)
        for u in uploads:
            ratio = round(u["n"] / u["max_weight"] * q) / q
            truth = np.concatenate(
                [
                    (
                        (np.clip(w * ratio, -a.clipping_range, a.clipping_range) + a.clipping_range)
                        * q
                        / (2 * a.clipping_range)
                    ).ravel()
                    for w in u["weights"]
                ]
            )
            gap = np.abs(flat_masked - np.round(truth).astype(np.int64)) % 2**32
            gap = np.minimum(gap, 2**32 - gap)
            assert np.mean(gap <= 2) < 0.01, "a masked upload reveals a client's quantised weights"
            readout = flat_masked / q * 2 * a.clipping_range - a.clipping_range  # as if unmasked, dequantised
            assert np.mean(np.abs(readout - truth / q * 2 * a.clipping_range + a.clipping_range) < 1e-3) < 0.01

    # 3. the strategy sees one vector, the average; it equals FedAvg of the true weights within the bound
    for rnd in spy.rounds:
        assert len(rnd["results"]) == 3
        for _, params in rnd["results"]:
            for p, g in zip(params, rnd["aggregate"]):
                np.testing.assert_array_equal(p, g)
        fedavg, bound = _fedavg_and_bound(rnd["uploads"], cfg)
        assert bound < 1e-4
        err = max(float(np.max(np.abs(g - f))) for g, f in zip(rnd["aggregate"], fedavg))
        assert err <= bound
        # and it is not any single client's weights
        for u in rnd["uploads"]:
            assert max(float(np.max(np.abs(g - w))) for g, w in zip(rnd["aggregate"], u["weights"])) > 100 * bound
    # the released model is the last average
    keys = list(models.build(json.loads(workdir.spec_path(tmp_path, name).read_text())).state_dict())
    for k, g in zip(keys, spy.rounds[-1]["aggregate"], strict=True):
        np.testing.assert_allclose(weights[k].numpy(), g, atol=1e-6, err_msg=k)
    assert all(c["secagg-clipped"] == 0 for r in record["client_rounds"] for c in r["trained"])


def test_a_round_whose_uploads_secagg_would_clip_fails_instead_of_releasing_a_wrong_model(tmp_path, digits_data):
    with pytest.raises(RoundFailedError, match="federated.secagg.clipping_range"):
        _run(tmp_path, digits_data, "federated.secagg.clipping_range=0.01")


def test_a_client_dropping_out_mid_protocol_leaves_a_correct_average(tmp_path, digits_data, spy):
    # client 0 has shared its keys, then fails while training in round 2: the others' shares unmask the sum
    cfg, grid, (_, record) = _run(tmp_path, digits_data, fail_partition=0, fail_round=2)
    assert [h["clients_trained"] for h in record["history"]] == [3, 2, 3]
    assert [f["round"] for f in record["failures"]] == [2]
    dropped = spy.rounds[1]
    assert len(dropped["results"]) == 2 and len(dropped["uploads"]) == 2
    assert 100 not in {node for node, _ in dropped["results"]}  # node 100 is partition 0
    fedavg, bound = _fedavg_and_bound(dropped["uploads"], cfg)
    err = max(float(np.max(np.abs(g - f))) for g, f in zip(dropped["aggregate"], fedavg))
    assert err <= bound < 1e-4


def test_a_client_refuses_to_send_its_update_outside_the_protocol(tmp_path, digits_data):
    from fed_helpers import client_context
    from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

    from federated.app.components import client as client_app

    cfg = make_cfg(*SECAGG)
    rc = prepare_work_dir(tmp_path, cfg, digits_data)
    plain = Message(
        RecordDict({"arrays": ArrayRecord(), "config": ConfigRecord({"server-round": 1})}),
        dst_node_id=100,
        message_type="train",
    )
    with pytest.raises(secagg.SecAggRefusal, match="outside SecAgg"):
        client_app(plain, client_context(rc, 0, 3))


def test_config_refuses_settings_secagg_cannot_run():
    with pytest.raises(ConfigError, match="federated.n_clients"):
        make_cfg("federated.secure_aggregation=true", "federated.n_clients=2")
    with pytest.raises(ConfigError, match="fedavg"):
        make_cfg(*SECAGG, "federated.strategy=fedprox")
    with pytest.raises(ConfigError, match="wrap around"):
        make_cfg(*SECAGG, "federated.secagg.quantization_range=4294967295")
    with pytest.raises(ConfigError, match="odd"):
        make_cfg(*SECAGG, "federated.secagg.num_shares=4")
    with pytest.raises(ConfigError, match=r"num_shares.*<= federated.n_clients = 3"):
        make_cfg(*SECAGG, "federated.secagg.num_shares=5")


def test_report_says_what_secure_aggregation_hides_and_from_whom():
    from auditml_core.config import load_config
    from pipeline.report.privacy_federated import federated_privacy

    params = secagg.SecAggParams.from_config(make_cfg(*SECAGG).federated.secagg, max_weight=300)
    rec = secagg.secagg_record(params, n_clients=3)
    assert rec["num_shares"] == 3 and rec["reconstruction_threshold"] == 2
    assert rec["server_cannot_see"] == ["any single client's model weights or update"]
    trained = SimpleNamespace(
        models={"cnn": SimpleNamespace(training={"secure_aggregation": rec}), "regressor": SimpleNamespace(training={})}
    )
    cfg = load_config(None, ["train.mode=federated", *SECAGG])
    off = {"enabled": False, "statement": "No formal privacy guarantee.", "models": {}, "not_covered": []}
    out = federated_privacy(off, cfg, trained)
    assert "Secure aggregation (SecAgg+, for" in out["statement"] and "not used" not in out["statement"]
    assert "honest-but-curious" in out["statement"] and "at least 2 of that client's 3" in out["statement"]
    assert any("aggregate of each round" in c for c in out["not_covered"])
    plain = federated_privacy(
        off,
        load_config(None, ["train.mode=federated"]),
        SimpleNamespace(models={"cnn": SimpleNamespace(training={}), "regressor": SimpleNamespace(training={})}),
    )
    assert "Secure aggregation is not used" in plain["statement"]
