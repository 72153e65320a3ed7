"""User-level DP-FedAvg: the accountant (plan, refusal, independent check), the mechanism, a whole run."""

import dataclasses

import numpy as np
import pytest
from fed_helpers import InProcessGrid, make_cfg, prepare_work_dir, server_context
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from auditml_core.config import ClientDPConfig, load_config
from auditml_core.errors import ConfigError, PrivacyBudgetError
from auditml_core.privacy.client_noise import known_sample_epsilon
from auditml_core.privacy.second_accountant import independent_epsilons
from auditml_core.privacy.user_level import (
    UNIT_OF_PRIVACY,
    dp_fedavg_aggregate,
    l2_norm,
    plan_user_dp,
    poisson_sample,
    user_epsilon,
    user_privacy_record,
)
from federated.app.server_app import main
from federated.app.strategies import RoundFailedError
from federated.app.user_dp import build_user_dp_strategy
from federated.app.workdir import read_result


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
@pytest.mark.parametrize(("q", "rounds", "n"), [(0.1, 50, 100), (1.0, 10, 10)])
def test_planned_sigma_reaches_the_target_and_dp_accounting_agrees(accountant, q, rounds, n):
    cfg = ClientDPConfig(enabled=True, target_epsilon=2.0, delta=1e-4, sample_rate=q, accountant=accountant)
    plan = plan_user_dp(cfg, rounds=rounds, n_clients=n)
    # Opacus' search stops within 0.01 below the target; the budget binds the ε against the server, who knows the
    # sample (R un-amplified rounds), and the amplified ε an outsider faces is below it (equal when q = 1)
    assert cfg.target_epsilon - 0.05 <= plan.known_sample_epsilon <= cfg.target_epsilon
    assert plan.planned_epsilon <= plan.known_sample_epsilon and (
        q < 1 or plan.planned_epsilon == plan.known_sample_epsilon
    )
    pld, rdp = independent_epsilons(plan.history(), delta=cfg.delta)
    assert pld * 0.98 <= plan.planned_epsilon <= rdp * 1.02
    if accountant == "rdp":  # the same analysis, another implementation: equal within 2 %
        assert plan.planned_epsilon == pytest.approx(rdp, rel=0.02)


def test_sampling_amplifies_and_epsilon_grows_with_rounds():
    kw = dict(noise_multiplier=1.0, delta=1e-4, accountant="rdp")
    eps = [user_epsilon(sample_rate=0.1, rounds=r, **kw) for r in (1, 10, 100)]
    assert eps[0] < eps[1] < eps[2]
    assert user_epsilon(sample_rate=0.1, rounds=10, **kw) < user_epsilon(sample_rate=1.0, rounds=10, **kw)


def test_a_fixed_sigma_over_budget_is_refused_before_training():
    cfg = ClientDPConfig(enabled=True, target_epsilon=1.0, delta=1e-4, noise_multiplier=0.5, sample_rate=1.0)
    with pytest.raises(PrivacyBudgetError, match="client_dp.target_epsilon=1.0"):
        plan_user_dp(cfg, rounds=20, n_clients=10)
    with pytest.raises(PrivacyBudgetError, match="client_dp.delta"):
        plan_user_dp(dataclasses.replace(cfg, noise_multiplier=0.0, delta=0.2), rounds=20, n_clients=10)


def test_the_budget_holds_against_the_server_who_knows_the_sample():
    """#23 item 6: σ = 3, q = 0.5, 10 rounds spends 1.82 against an outsider but 3.77 against the server (which
    draws the sample and may sample a client every round); the budget 3 is enforced against the server."""
    cfg = ClientDPConfig(enabled=True, target_epsilon=3.0, delta=1e-3, sample_rate=0.5, noise_multiplier=3.0)
    with pytest.raises(PrivacyBudgetError, match=r"ε=3\.77\d against the server.*\(1\.819 against an outsider\)"):
        plan_user_dp(cfg, rounds=10, n_clients=20)
    plan = plan_user_dp(dataclasses.replace(cfg, noise_multiplier=0.0), rounds=10, n_clients=20)
    worst = known_sample_epsilon(
        noise_multiplier=plan.noise_multiplier, participations=10, delta=1e-3, accountant="rdp"
    )
    assert worst == pytest.approx(plan.known_sample_epsilon) and 2.95 <= worst <= 3.0
    rec = user_privacy_record(plan, completed_rounds=10, max_participations=10)  # sampled in every round
    assert rec["known_sample"]["epsilon"] <= cfg.target_epsilon and rec["epsilon"] < rec["known_sample"]["epsilon"]


def test_config_validates_the_section():
    with pytest.raises(ConfigError, match="client_dp.sample_rate"):
        load_config(None, ["client_dp.sample_rate=0"])
    with pytest.raises(ConfigError, match="federated.strategy"):
        load_config(None, ["client_dp.enabled=true", "federated.strategy=fedadam"])


def test_recorded_epsilon_is_checked_and_both_levels_stated():
    plan = plan_user_dp(
        ClientDPConfig(enabled=True, target_epsilon=3.0, delta=1e-3, sample_rate=0.5), rounds=8, n_clients=20
    )
    rec = user_privacy_record(
        plan, completed_rounds=5, sample_level={"epsilon": 2.0, "delta": 1e-5, "unit_of_privacy": "one record"}
    )
    assert rec["epsilon"] < plan.planned_epsilon  # 5 of 8 rounds spent
    assert rec["independent_check"]["agrees"] and rec["accountant_history"] == [[plan.noise_multiplier, 0.5, 5]]
    assert rec["unit_of_privacy"] == UNIT_OF_PRIVACY and rec["sample_level"]["unit_of_privacy"] == "one record"


def test_poisson_sampling_has_rate_q():
    rng = np.random.default_rng(0)
    counts = [len(poisson_sample(list(range(100)), sample_rate=0.2, rng=rng)) for _ in range(200)]
    assert np.mean(counts) == pytest.approx(20, abs=1.0)  # sd of the mean 4/sqrt(200) = 0.28
    assert len(set(counts)) > 5  # not a fixed-size sample


def test_one_client_moves_the_noiseless_aggregate_by_at_most_c_over_qn():
    rng = np.random.default_rng(1)
    g = [np.zeros((4, 3), np.float32), np.zeros(5, np.float32)]
    clients = [[rng.normal(0, s, (4, 3)), rng.normal(0, s, 5)] for s in (0.01, 3.0, 50.0, 0.2)]
    c, expected = 0.5, 4.0
    kw = dict(clipping_norm=c, noise_multiplier=0.0, expected_clients=expected, rng=rng)
    full, counts = dp_fedavg_aggregate(g, clients, **kw)
    assert counts == {"aggregated": 4, "clipped": 3}
    for drop in range(4):  # add/remove-one-client sensitivity of the released average
        without, _ = dp_fedavg_aggregate(g, clients[:drop] + clients[drop + 1 :], **kw)
        diff = l2_norm([a - b for a, b in zip(full, without)])
        assert diff <= c / expected * (1 + 1e-5)
    # the big client is clipped to exactly C
    one, _ = dp_fedavg_aggregate(g, [clients[2]], **{**kw, "expected_clients": 1.0})
    assert l2_norm(one) == pytest.approx(c, rel=1e-5)


def test_noise_on_the_sum_has_std_sigma_c_over_qn():
    g = [np.zeros(20000, np.float64)]
    out, _ = dp_fedavg_aggregate(
        g, [], clipping_norm=2.0, noise_multiplier=1.5, expected_clients=10.0, rng=np.random.default_rng(2)
    )
    assert np.std(out[0]) == pytest.approx(1.5 * 2.0 / 10.0, rel=0.03)  # 20k samples: sd of the std ~0.5 %


class _Nodes:
    def __init__(self, n):
        self.n = n

    def get_node_ids(self):
        return list(range(1, self.n + 1))


def _reply(to: Message, value: float) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(np.full(3, value, dtype=np.float32))}),
            "metrics": MetricRecord(
                {"num-examples": 5, "partition-id": to.metadata.dst_node_id - 1, "epsilon": 0.0, "refused": 0}
            ),
        }
    )
    return Message(content, reply_to=to)


def test_strategy_samples_poisson_clips_and_releases_even_an_empty_round():
    plan = plan_user_dp(
        ClientDPConfig(enabled=True, sample_rate=0.5, clipping_norm=1.0, delta=1e-3), rounds=4, n_clients=10
    )
    s = build_user_dp_strategy(plan, rng=np.random.default_rng(5))
    arrays = ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})
    sizes = []
    for r in (1, 2, 3):
        msgs = list(s.configure_train(r, arrays, ConfigRecord({}), _Nodes(10)))
        sizes.append(len(msgs))
        new, _ = s.aggregate_train(r, [_reply(m, 100.0) for m in msgs])
        assert new is not None  # also with zero participants: noise only
        assert s.dp_rounds[r]["clipped"] == len(msgs)
    assert s.rounds[1].sent_to and len(set(sizes)) >= 1
    # Connected clients that Poisson sampling left out of a round are not failures (issue 24).
    assert all(r.failed == [] for r in s.rounds.values())
    nobody = build_user_dp_strategy(plan, rng=_NoneSampled())
    assert list(nobody.configure_train(1, arrays, ConfigRecord({}), _Nodes(10))) == []
    new, _ = nobody.aggregate_train(1, [])  # nobody sampled: the round still releases (noise only)
    assert new is not None and nobody.dp_rounds[1]["aggregated"] == 0


class _NoneSampled:
    """A generator under which Poisson sampling picks no client (noise still comes from a real one)."""

    def __init__(self):
        self._rng = np.random.default_rng(0)

    def random(self, n):
        return np.ones(n)

    def normal(self, *args, **kwargs):
        return self._rng.normal(*args, **kwargs)


def _failed(to: Message) -> Message:
    return Message(Error(code=2, reason="RuntimeError: CUDA out of memory"), reply_to=to)


@pytest.mark.parametrize("trained", [0, 1])
def test_a_round_with_fewer_than_min_clients_trained_fails_the_run(trained):
    """Issue 24 item 5: DP-FedAvg required no replies at all (min_clients = 0), so noise alone was 'trained'."""
    plan = plan_user_dp(ClientDPConfig(enabled=True, sample_rate=1.0, delta=1e-3), rounds=3, n_clients=3)
    s = build_user_dp_strategy(plan, min_clients=2, rng=np.random.default_rng(1))
    arrays = ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})
    msgs = list(s.configure_train(1, arrays, ConfigRecord({}), _Nodes(3)))
    replies = [_reply(m, 0.1) for m in msgs[:trained]] + [_failed(m) for m in msgs[trained:]]
    with pytest.raises(RoundFailedError, match="federated.min_clients=2") as info:
        s.aggregate_train(1, replies)
    assert "CUDA out of memory" in str(info.value)
    ok = build_user_dp_strategy(plan, min_clients=2, rng=np.random.default_rng(1))
    msgs = list(ok.configure_train(1, arrays, ConfigRecord({}), _Nodes(3)))
    new, _ = ok.aggregate_train(1, [_reply(msgs[0], 0.1), _reply(msgs[1], 0.1), _failed(msgs[2])])
    assert new is not None and ok.dp_rounds[1]["aggregated"] == 2  # two of three: enough


def test_a_user_dp_federation_whose_clients_all_fail_is_not_recorded_as_trained(tmp_path, digits_data):
    """Issue 24 item 5, end to end in process: the run fails instead of writing a noise-only model."""
    cfg = make_cfg("client_dp.enabled=true", "client_dp.delta=0.01", "client_dp.target_epsilon=8")
    rc = prepare_work_dir(tmp_path, cfg, digits_data)
    grid = InProcessGrid(rc, 2)

    def broken(msg, context):
        raise RuntimeError("the client's disk is unreadable")

    grid.client_app = broken
    with pytest.raises(RoundFailedError, match="unreadable"):
        main(grid, server_context(rc))
    with pytest.raises(Exception):
        read_result(tmp_path, "cnn")  # no result was written


@pytest.mark.parametrize(
    "override",
    [
        "client_dp.target_epsilon=1e300",
        "client_dp.clipping_norm=1e300",
        "client_dp.noise_multiplier=1e300",
        "client_dp.clip_sigmas=1e300",
    ],
)
def test_every_client_dp_number_has_an_upper_bound(override):
    """Issue 24 items 5 and 11: unbounded, these hung the σ search or overflowed the noise into a NaN model."""
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as info:
        load_config(None, [override])
    assert "\n" not in str(info.value) and "out of range" in str(info.value)


def test_the_sigma_search_ends_for_a_budget_beyond_float_precision():
    """Issue 24 item 11: ε never gets within 0.01 of 1e300, so the bisection looped forever on a fixed σ."""
    import signal

    from auditml_core.privacy import accounting

    def too_long(signum, frame):
        raise TimeoutError("the σ search did not end within 20 s")

    previous = signal.signal(signal.SIGALRM, too_long)
    signal.alarm(20)
    try:
        sigma = accounting.noise_multiplier(
            target_epsilon=1e300, delta=1e-3, sample_rate=1.0, steps=10, accountant="rdp"
        )
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert (
        sigma > 0
        and user_epsilon(noise_multiplier=sigma, sample_rate=1.0, rounds=10, delta=1e-3, accountant="rdp") <= 1e300
    )  # stopping early still returns a σ within the budget


def test_a_user_dp_run_records_plan_epsilon_and_check(tmp_path, digits_data):
    cfg = make_cfg(
        "client_dp.enabled=true", "client_dp.sample_rate=0.5", "client_dp.delta=0.01", "client_dp.target_epsilon=8"
    )
    rc = prepare_work_dir(tmp_path, cfg, digits_data)
    main(InProcessGrid(rc, 2), server_context(rc))
    weights, record = read_result(tmp_path, "cnn")
    u = record["user_level_privacy"]
    assert u["completed_rounds"] == 3 and u["rounds"] == 3 and u["sample_rate"] == 0.5
    assert u["epsilon"] == pytest.approx(u["planned_epsilon"]) and u["epsilon"] <= 8.0
    assert u["independent_check"]["agrees"]
    assert set(record["user_dp_rounds"]) == {"1", "2", "3"}
    assert all(np.isfinite(v.numpy()).all() for v in weights.values())


def test_a_run_over_the_user_budget_fails_before_any_round(tmp_path, digits_data):
    cfg = make_cfg(
        "client_dp.enabled=true", "client_dp.noise_multiplier=0.3", "client_dp.delta=0.01", "client_dp.target_epsilon=1"
    )
    rc = prepare_work_dir(tmp_path, cfg, digits_data)
    grid = InProcessGrid(rc, 2)
    with pytest.raises(PrivacyBudgetError, match="user-level"):
        main(grid, server_context(rc))
    assert grid.sent_rounds == []


def test_report_states_threat_model_unit_and_both_levels():
    from types import SimpleNamespace

    from pipeline.report.privacy_federated import federated_privacy

    plan = plan_user_dp(ClientDPConfig(enabled=True, delta=1e-3), rounds=5, n_clients=10)
    rec = user_privacy_record(plan, completed_rounds=5)
    trained = SimpleNamespace(
        models={"cnn": SimpleNamespace(training={"user_level_privacy": rec}), "regressor": SimpleNamespace(training={})}
    )
    cfg = load_config(None, ["train.mode=federated", "client_dp.enabled=true"])
    off = {
        "enabled": False,
        "mode": "federated",
        "statement": "No formal privacy guarantee.",
        "models": {},
        "covered": [],
        "not_covered": ["every artifact of this run: x"],
        "caveats": [],
    }
    out = federated_privacy(off, cfg, trained)
    assert out["enabled"] and "whole client's data" in out["statement"] and "honest-but-curious" in out["statement"]
    assert "No formal" not in out["statement"]
    [level] = out["federated"]["levels"]
    assert level["level"] == "user" and level["epsilon"] == pytest.approx(rec["epsilon"]) and level["delta"] == 1e-3
    assert any(c.startswith("participation") for c in out["not_covered"])
    cfg2 = load_config(None, ["train.mode=federated", "client_dp.enabled=true", "dp.enabled=true"])
    sample = {"epsilon": 2.5, "delta": 1e-5, "accountant": "rdp", "unit_of_privacy": "one training record"}
    on = {**off, "enabled": True, "statement": "DP-SGD protects records.", "models": {"cnn": sample}, "not_covered": []}
    out2 = federated_privacy(on, cfg2, trained)
    assert {lv["level"] for lv in out2["federated"]["levels"]} == {"user", "sample"}
    assert "Both levels" in out2["statement"]
