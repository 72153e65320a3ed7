"""User-level DP with the noise added by the clients under SecAgg+ (auditml_core/privacy/client_noise.py, federated/app/secagg.py).

What is checked, each against something this code does not compute itself:

- each client's noise has std σ·C/√t (a seeded draw, 20 000 coordinates and in a real run);
- the released aggregate's noise has std >= σ·C/(q·N), the server-noise path's;
- a round with fewer than t masked uploads is never unmasked (the workflow asks for no key
  shares) and fails the run;
- the recorded δ is the accountant's δ plus (1 + e^ε)·p with p the union bound over every
  upload's coordinates, and the recorded ε is recomputed by dp-accounting from the recorded σ, q
  and rounds;
- the server never receives an un-noised upload: what leaves each client, read at the last
  point before masking, differs from its clipped update by noise of the planned std, and the
  masked vectors match nothing a client really uploads;
- client noise without secure aggregation is refused, and so is an upload SecAgg+ would clip.
"""

import math
from types import SimpleNamespace

import numpy as np
import pytest
from fed_helpers import make_cfg, prepare_work_dir, server_context
from flwr.app import MetricRecord, RecordDict
from flwr.common import Code, FitRes, Status, bytes_to_ndarray, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from test_secagg import RecordingGrid, client_mod

from auditml_core.config import ClientDPConfig
from auditml_core.errors import ConfigError
from auditml_core.privacy.client_noise import clip_probability, noisy_upload, plan_client_noise, tail_probability
from auditml_core.privacy.second_accountant import check_epsilon, independent_epsilons
from auditml_core.privacy.user_level import dp_fedavg_aggregate, plan_user_dp
from federated.app import secagg, secagg_client
from federated.app.server_app import main
from federated.app.strategies import RoundFailedError
from federated.app.workdir import read_result

CLIENT_NOISE = [
    "federated.secure_aggregation=true",
    "federated.n_clients=3",
    "client_dp.enabled=true",
    "client_dp.noise_placement=client",
    "client_dp.delta=0.01",
    "client_dp.target_epsilon=8",
]


def test_each_clients_noise_has_std_sigma_c_over_sqrt_t():
    noise = plan_client_noise(
        placement="client", noise_multiplier=1.3, clipping_norm=0.5, min_survivors=7, clip_sigmas=8
    )
    g = [np.zeros(20000)]
    upload, norm = noisy_upload(g, None, clipping_norm=0.5, noise_std=noise.noise_std, rng=np.random.default_rng(0))
    assert norm == 0.0
    assert np.std(upload[0]) == pytest.approx(1.3 * 0.5 / math.sqrt(7), rel=0.02)  # sd of the estimate 0.5 %
    # a sampled client's update is clipped to C before its noise
    big = [np.full(20000, 3.0)]
    up, norm = noisy_upload(g, big, clipping_norm=0.5, noise_std=0.0, rng=np.random.default_rng(1))
    assert norm == pytest.approx(3.0 * math.sqrt(20000)) and float(np.linalg.norm(up[0])) == pytest.approx(0.5)
    assert noise.clipping_range == pytest.approx(0.5 + 8 * noise.noise_std)


def _results(uploads):
    """What the unmask stage hands the strategy: every result carries the mean of the weight-1 uploads."""
    mean = ndarrays_to_parameters([np.mean([u[0] for u in uploads], axis=0)])
    return [
        (
            SimpleNamespace(node_id=i),
            FitRes(Status(Code.OK, "OK"), mean, 1, {"dp-sampled": 0, "dp-clipped": 0}),
        )
        for i in range(len(uploads))
    ]


def test_the_released_noise_is_at_least_the_server_paths():
    n, q, d = 20, 0.25, 10000
    plan = plan_user_dp(
        # ε against the server (10 un-amplified rounds) is 12.1: the budget binds that one
        ClientDPConfig(enabled=True, sample_rate=q, delta=1e-3, target_epsilon=15.0, noise_multiplier=1.2),
        rounds=10,
        n_clients=n,
    )
    t = 15  # fewest uploads the round is unmasked with
    noise = plan_client_noise(
        placement="client", noise_multiplier=plan.noise_multiplier, clipping_norm=1.0, min_survivors=t, clip_sigmas=8
    )
    rng = np.random.default_rng(3)
    floor = plan.noise_multiplier * 1.0 / (q * n)  # the server-noise path's std: σC/(qN)
    server, _ = dp_fedavg_aggregate(
        [np.zeros(d)], [], clipping_norm=1.0, noise_multiplier=plan.noise_multiplier, expected_clients=q * n, rng=rng
    )
    assert np.std(server[0]) == pytest.approx(floor, rel=0.03)
    for survivors in (t, n):  # the fewest survivors a round is released with, and no dropout
        s = secagg.SecAggFedAvg(
            n_clients=n, min_clients=2, round_offset=0, keys=["w"], evaluate_fn=None, plan=plan, noise=noise, rng=rng
        )
        s._current[1], s.dp_rounds[1] = [np.zeros(d, np.float32)], {"sampled": 0}
        uploads = [
            noisy_upload([np.zeros(d)], None, clipping_norm=1.0, noise_std=noise.noise_std, rng=rng)[0]
            for _ in range(survivors)
        ]
        params, metrics = s._dp_release(1, _results(uploads))
        [released] = parameters_to_ndarrays(params)
        assert released.dtype == np.float32 and metrics["survivors"] == survivors
        assert np.std(released) == pytest.approx(floor * math.sqrt(survivors / t), rel=0.03)
        assert np.std(released) >= floor * 0.97


def test_fewer_than_t_uploads_are_never_unmasked():
    wf = secagg.GuardedSecAggPlusWorkflow(
        min_uploads=3, num_shares=1.0, reconstruction_threshold=0.5, clipping_range=4.0, quantization_range=2**20
    )

    class NoGrid:
        def send_and_receive(self, *a, **k):
            raise AssertionError("the server asked for key shares")

    context = SimpleNamespace(
        state=SimpleNamespace(config_records={MAIN_CONFIGS_RECORD: {WorkflowKey.CURRENT_ROUND: 4}})
    )
    assert wf.unmask_stage(NoGrid(), context, SimpleNamespace(active_node_ids={1, 2})) is False
    assert "2 masked upload(s) arrived" in wf.halted[4]


def test_client_noise_without_secure_aggregation_is_refused():
    with pytest.raises(ConfigError, match="federated.secure_aggregation=true"):
        make_cfg("client_dp.enabled=true", "client_dp.noise_placement=client")
    make_cfg(*CLIENT_NOISE)  # and accepted with it


def test_a_client_refuses_an_upload_secagg_would_clip(monkeypatch):
    plan = plan_user_dp(ClientDPConfig(enabled=True, delta=1e-3), rounds=2, n_clients=3)
    noise = plan_client_noise(
        placement="client", noise_multiplier=plan.noise_multiplier, clipping_norm=1.0, min_survivors=2, clip_sigmas=8
    )
    noise = type(noise)(**{**noise.to_dict(), "clipping_range": 0.01})  # far too narrow for the noise
    content = RecordDict({"metrics": MetricRecord({"num-examples": 0, "partition-id": 0})})
    with pytest.raises(secagg.SecAggRefusal, match="outside the SecAgg\\+ range"):
        secagg_client._dp_fitres_record(
            content,
            ["w"],
            [np.zeros(100, np.float32)],
            secagg_client._ClientDP(plan, noise, quantization_step=1e-6),
            sampled=False,
        )


@pytest.fixture
def uploads(monkeypatch):
    """Seeded sampling and noise; every client's clipped update and noised upload, and what it masked."""
    seen = SimpleNamespace(noised=[], masked_input=[])
    monkeypatch.setattr(secagg_client, "noise_rng", lambda: np.random.default_rng(len(seen.noised) + 11))
    monkeypatch.setattr(secagg, "private_rng", lambda: np.random.default_rng(5))

    def spy_upload(global_weights, weights, **kw):
        out, norm = noisy_upload(global_weights, weights, **kw)
        clean, _ = noisy_upload(global_weights, weights, **{**kw, "noise_std": 0.0})
        seen.noised.append({"clean": clean, "upload": out, "sampled": weights is not None})
        return out, norm

    monkeypatch.setattr(secagg_client, "noisy_upload", spy_upload)
    original = client_mod._collect_masked_vectors

    def collect(state, configs, num_examples, parameters):
        seen.masked_input.append(parameters_to_ndarrays(parameters))
        return original(state, configs, num_examples, parameters)

    monkeypatch.setattr(client_mod, "_collect_masked_vectors", collect)
    return seen


def test_a_client_noise_run_never_shows_the_server_an_un_noised_update(tmp_path, digits_data, uploads):
    cfg = make_cfg(
        *CLIENT_NOISE,
        "federated.min_clients=2",
        "client_dp.sample_rate=0.6",
        "federated.rounds=2",
        "client_dp.noise_multiplier=1.0",
    )
    rc = prepare_work_dir(tmp_path, cfg, digits_data)
    grid = RecordingGrid(rc, 3)
    main(grid, server_context(rc))
    _, record = read_result(tmp_path, "cnn")
    u, sa = record["user_level_privacy"], record["secure_aggregation"]
    t = sa["min_uploads_to_unmask"]
    assert t == 2 and u["noise_placement"] == "client" and u["client_noise"]["min_survivors"] == t
    s = u["noise_multiplier"] * u["clipping_norm"] / math.sqrt(t)
    assert u["client_noise"]["noise_std"] == pytest.approx(s)

    # every client uploads every round (3 x 2), noise on top of its clipped (or zero) update, std s
    assert len(uploads.noised) == 6 and len(uploads.masked_input) == 6
    assert sum(n["sampled"] for n in uploads.noised) == sum(h["clients_trained"] for h in record["history"])
    residual = np.concatenate(
        [(a - c).ravel() for n in uploads.noised for a, c in zip(n["upload"], n["clean"])]
    )  # 6 x 650 coordinates: sd of the std estimate ~1.1 %
    assert np.std(residual) == pytest.approx(s, rel=0.04)
    for n in uploads.noised:  # what leaves the client is the noised upload, and no coordinate is clipped
        sent = next(m for m in uploads.masked_input if all(np.array_equal(a, b) for a, b in zip(m, n["upload"])))
        assert max(float(np.max(np.abs(x))) for x in sent) < sa["clipping_range"]
        assert min(float(np.linalg.norm(a - c)) for a, c in zip(n["upload"], n["clean"])) > 0

    # the server receives nothing in the clear, and no masked vector matches a true quantised upload
    masked = [
        [bytes_to_ndarray(b) for b in r.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
        for r in grid.replies
        if Key.MASKED_PARAMETERS in r.content.config_records[RECORD_KEY_CONFIGS]
    ]
    assert len(masked) == 6
    for reply in grid.replies:
        assert not reply.has_error() and all(len(rec) == 0 for rec in reply.content.array_records.values())
    r, qr = sa["clipping_range"], sa["quantization_range"]
    for vec in masked:
        flat = np.concatenate([v.ravel() for v in vec[1:]]).astype(np.int64)
        for n in uploads.noised:
            for version in (n["clean"], n["upload"]):
                truth = np.round(np.concatenate([((x + r) * qr / (2 * r)).ravel() for x in version])).astype(np.int64)
                gap = np.abs(flat - truth) % 2**32
                assert np.mean(np.minimum(gap, 2**32 - gap) <= 2) < 0.01

    # δ = the accountant's δ + (1 + e^ε)·p, p over all N·R uploads of d coordinates
    p = 3 * 2 * record["n_parameters"] * tail_probability(8.0)  # N x R uploads
    assert u["client_noise"]["clip_probability"] == pytest.approx(p)
    assert u["delta_clip"] == pytest.approx((1 + math.exp(u["epsilon"])) * p) and u["delta_clip"] > 0
    assert u["delta"] == pytest.approx(u["delta_accountant"] + u["delta_clip"]) and u["delta_accountant"] == 0.01
    # the recorded ε reproduces with dp-accounting for the recorded σ, q and rounds
    history = [[u["noise_multiplier"], u["sample_rate"], u["completed_rounds"]]]
    assert u["accountant_history"] == history and u["completed_rounds"] == 2
    pld, rdp = independent_epsilons(history, delta=u["delta_accountant"])
    assert pld * 0.98 <= u["epsilon"] <= rdp * 1.02
    assert check_epsilon(history, delta=u["delta_accountant"], recorded_epsilon=u["epsilon"]).agrees
    # against the server (it knows the sample): un-amplified over the rounds a client took part in
    assert 1 <= u["known_sample"]["max_participations"] <= 2 and u["known_sample"]["epsilon"] >= u["epsilon"]
    assert "train-loss" not in record["client_rounds"][0]["trained"][0]


@pytest.mark.slow
def test_a_round_with_fewer_than_t_survivors_is_not_released(tmp_path, digits_data, uploads, monkeypatch):
    cfg = make_cfg(*CLIENT_NOISE, "federated.min_clients=3", "client_dp.sample_rate=1.0")
    rc = prepare_work_dir(tmp_path, cfg, digits_data, fail_partition=0, fail_round=2)
    grid = RecordingGrid(rc, 3)
    released = []
    aggregate = secagg.SecAggFedAvg.aggregate_fit

    def spy(self, server_round, results, failures):
        released.append(server_round)
        return aggregate(self, server_round, results, failures)

    monkeypatch.setattr(secagg.SecAggFedAvg, "aggregate_fit", spy)
    with pytest.raises(RoundFailedError, match="fewer than the 3"):
        main(grid, server_context(rc))
    assert released == [1]
    unmask_requests = [
        r
        for r in grid.replies
        if not r.has_error() and Key.SHARE_LIST in r.content.config_records.get(RECORD_KEY_CONFIGS, {})
    ]
    assert len(unmask_requests) == 3  # round 1's three clients; round 2 asked nobody for shares


def test_clip_probability_is_the_union_bound():
    noise = plan_client_noise(
        placement="client", noise_multiplier=1.0, clipping_norm=1.0, min_survivors=4, clip_sigmas=8
    )
    from scipy.stats import norm

    from auditml_core.privacy.client_noise import tail_probability

    # the per-coordinate tail against scipy's normal (another implementation) and against sampled noise
    assert clip_probability(noise, n_parameters=1000, uploads=50) == pytest.approx(50 * 1000 * 2 * norm.sf(8))
    z = np.random.default_rng(0).normal(size=400_000)
    assert np.mean(np.abs(z) > 2.0) == pytest.approx(tail_probability(2.0), rel=0.03)
    server = plan_client_noise(
        placement="server", noise_multiplier=1.0, clipping_norm=1.0, min_survivors=4, clip_sigmas=8
    )
    assert clip_probability(server, n_parameters=1000, uploads=50) == 0.0 and server.server_noise_std == 1.0


def test_report_states_client_noise_the_server_facing_epsilon_and_what_is_not_covered():
    from auditml_core.config import load_config
    from auditml_core.privacy.user_level import user_privacy_record
    from pipeline.report.fmt import number
    from pipeline.report.privacy_federated import federated_privacy

    cfg = load_config(
        None,
        [
            "train.mode=federated",
            *CLIENT_NOISE,
            "client_dp.sample_rate=0.5",
            "client_dp.noise_multiplier=1.0",
            "client_dp.target_epsilon=9",  # 8.07 against the server over 5 un-amplified rounds
        ],
    )
    plan = plan_user_dp(cfg.client_dp, rounds=5, n_clients=3)
    noise = secagg.noise_plan(cfg, plan)
    rec = user_privacy_record(plan, completed_rounds=5, noise=noise, n_parameters=650, max_participations=4)
    params = secagg.SecAggParams.from_config(cfg.federated.secagg, max_weight=300, noise=noise)
    sa = secagg.secagg_record(params, n_clients=3, min_uploads=secagg.min_survivors(cfg), noise=noise)
    assert params.max_weight == 1.0 and sa["clipping_range"] == pytest.approx(noise.clipping_range)
    trained = SimpleNamespace(
        models={
            "cnn": SimpleNamespace(
                training={
                    "user_level_privacy": rec,
                    "secure_aggregation": sa,
                    "client_rounds": [{"trained": [{"node_id": 1, "dp-clipped": 1, "seconds": 0.1}]}],
                }
            ),
            "regressor": SimpleNamespace(training={}),
        }
    )
    off = {"enabled": False, "statement": "No formal privacy guarantee.", "models": {}, "not_covered": []}
    out = federated_privacy(off, cfg, trained)
    # what reached the server in the clear is read from the record, and nothing is said to be clipped by SecAgg+
    assert any("reported metrics (dp-clipped, seconds) reach the server" in c for c in out["not_covered"])
    assert "a client refuses an upload with any coordinate outside it, so nothing is clipped" in out["statement"]
    assert "noise added by the clients" in out["statement"] and "never holds a sum with noise below" in out["statement"]
    assert "does NOT protect a client from the server itself" not in out["statement"]
    # SecAgg+'s own line: the server unmasks a sum of noised clipped updates, not the weighted average of weights
    assert (
        "the sum of the clipped model updates of the clients that completed a round (each already carrying"
        in (out["statement"])
    )
    assert "weighted average" not in out["statement"] and "dp-clipped" in out["statement"]
    assert rec["known_sample"]["epsilon"] > rec["epsilon"]  # no amplification against the server
    assert f"a client is protected at ε = {number(rec['known_sample']['epsilon'], 4)}" in out["statement"]
    assert any("stochastic rounding" in c for c in out["not_covered"])
    assert any("which clients were sampled" in c for c in out["not_covered"])
    [level] = out["federated"]["levels"]
    assert level["delta"] == pytest.approx(rec["delta_accountant"] + rec["delta_clip"]) and level["delta_clip"] > 0
    assert "for a SecAgg+ clip" in out["statement"]


def test_server_noise_under_secagg_adds_sigma_c_to_the_unmasked_sum():
    n, q, d = 20, 0.25, 10000
    plan = plan_user_dp(
        # ε against the server (10 un-amplified rounds) is 12.1: the budget binds that one
        ClientDPConfig(enabled=True, sample_rate=q, delta=1e-3, target_epsilon=15.0, noise_multiplier=1.2),
        rounds=10,
        n_clients=n,
    )
    noise = plan_client_noise(
        placement="server", noise_multiplier=plan.noise_multiplier, clipping_norm=1.0, min_survivors=10, clip_sigmas=8
    )
    s = secagg.SecAggFedAvg(
        n_clients=n,
        min_clients=2,
        round_offset=0,
        keys=["w"],
        evaluate_fn=None,
        plan=plan,
        noise=noise,
        rng=np.random.default_rng(4),
    )
    s._current[1], s.dp_rounds[1] = [np.zeros(d, np.float32)], {"sampled": 0}
    params, _ = s._dp_release(1, _results([[np.zeros(d)]] * 12))  # clipped updates carry no noise of their own
    [released] = parameters_to_ndarrays(params)
    assert np.std(released) == pytest.approx(plan.noise_multiplier / (q * n), rel=0.03)
    assert noise.noise_std == 0 and noise.clipping_range == pytest.approx(1.0, rel=1e-5)


def test_server_placed_uploads_stay_within_c_after_secaggs_rounding():
    """Clipped to C − step·√d, every upload rounded by Flower's own quantize/dequantize has norm ≤ C (and C alone fails)."""
    from flwr.common.secure_aggregation.quantization import dequantize, quantize

    from auditml_core.privacy.client_noise import rounding_safe_norm

    c, d, levels = 1.0, 1000, 2**10
    clip_range = c * (1 + 1e-6)  # the server placement's SecAgg+ range (plan_client_noise)
    step = 2 * clip_range / levels
    safe = rounding_safe_norm(c, quantization_step=step, n_parameters=d)
    assert safe == pytest.approx(c - step * np.sqrt(d))
    rng = np.random.default_rng(0)
    np.random.seed(0)  # Flower's stochastic rounding draws from numpy's global generator
    over = {"safe": 0, "plain": 0}
    for _ in range(200):
        update = rng.normal(size=d)
        for name, bound in (("safe", safe), ("plain", c)):
            clipped = update * min(1.0, bound / np.linalg.norm(update))
            rounded = dequantize(quantize([clipped], clip_range, levels), clip_range, levels)[0]
            over[name] += int(np.linalg.norm(rounded) > c)
    assert over["safe"] == 0
    assert over["plain"] > 50  # without the slack the rounding pushes uploads past C: the check can fail
    with pytest.raises(ConfigError, match="quantization_range"):
        rounding_safe_norm(c, quantization_step=0.1, n_parameters=d)
