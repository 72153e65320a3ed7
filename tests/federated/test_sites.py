"""Per-site data: schema agreement, federated standardisation, a federation in which the server holds no row.

Fast tests drive the ServerApp and ClientApps in-process (fed_helpers.InProcessGrid) with three
CSV files; the slow one runs a real loopback deployment with three SuperNodes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fed_helpers import InProcessGrid, make_cfg, server_context
from flwr.app import Context, RecordDict
from sklearn.datasets import load_diabetes

from federated.app import schema, site
from federated.app.run_config import to_run_config
from federated.app.schema import SiteMismatchError
from federated.app.server_app import main
from federated.app.workdir import read_error, read_result

SIZES = (150, 120, 172)  # three slices of the 442-row diabetes table


def _site_files(folder: Path, *, drop_column_at: int = -1) -> list[Path]:
    bunch = load_diabetes(as_frame=True)
    frame = bunch.frame.rename(columns={"target": "y"})
    out, start = [], 0
    for i, n in enumerate(SIZES):
        part = frame.iloc[start : start + n]
        start += n
        if i == drop_column_at:
            part = part.drop(columns=["bmi"])
        path = folder / f"site{i}" / "data.csv"
        path.parent.mkdir(parents=True)
        part.to_csv(path, index=False)
        out.append(path)
    return out


def test_pooled_moments_equal_the_pooled_rows_mean_and_std():
    rng = np.random.default_rng(0)
    # Large offsets against small spreads: the naive sum-of-squares formula would lose digits here.
    parts = [rng.normal(1e4, 0.5, size=(n, 3)) + np.arange(3) for n in (7, 40, 133)]
    pooled = schema.pool_moments([schema.local_moments(p) for p in parts])
    mean, std = schema.mean_std(pooled)
    rows = np.concatenate(parts)
    np.testing.assert_allclose(mean, rows.mean(axis=0), rtol=0, atol=1e-9)
    np.testing.assert_allclose(std, rows.std(axis=0), rtol=1e-9, atol=0)
    assert pooled.n == len(rows)
    # JSON round trip (what travels in the Flower message) loses nothing.
    again = schema.Moments.from_json(json.loads(json.dumps(pooled.to_json())))
    np.testing.assert_array_equal(again.total, pooled.total)


def test_compare_schemas_names_the_site_and_the_difference():
    base = {"kind": "table", "feature_names": ["a", "b", "c"], "target": "y", "input_shape": [3], "class_names": []}
    schema.compare_schemas({"site 0": base, "site 1": dict(base)})  # agreement: no error
    other = {**base, "feature_names": ["a", "c", "d"], "input_shape": [3]}
    with pytest.raises(
        SiteMismatchError, match=r"site 1 disagrees with site 0: it lacks column\(s\) 'b' and has extra column\(s\) 'd'"
    ):
        schema.compare_schemas({"site 0": base, "site 1": other})
    with pytest.raises(SiteMismatchError, match="same columns in another order"):
        schema.compare_schemas({"site 0": base, "site 2": {**base, "feature_names": ["b", "a", "c"]}})
    with pytest.raises(SiteMismatchError, match="site 1 .* has target 'z'"):
        schema.compare_schemas({"site 0": base, "site 1": {**base, "target": "z"}})
    img = {"kind": "images", "feature_names": [], "target": "", "input_shape": [1, 8, 8], "class_names": ["0", "1"]}
    with pytest.raises(SiteMismatchError, match=r"class list \['0', '2'\]"):
        schema.compare_schemas({"site 0": img, "site 1": {**img, "class_names": ["0", "2"]}})


def _site_grid(rc: dict, files: list[Path], ledgers: Path) -> InProcessGrid:
    grid = InProcessGrid(rc, len(files))
    for i, (nid, ctx) in enumerate(sorted(grid.contexts.items())):
        grid.contexts[nid] = Context(
            run_id=ctx.run_id,
            node_id=nid,
            state=RecordDict(),
            run_config=dict(rc),
            node_config={
                "partition-id": i,
                "num-partitions": len(files),
                "data-path": str(files[i]),
                "target": "y",
                "ledger-path": str(ledgers / f"site{i}"),
            },
        )
    return grid


def _run(tmp_path: Path, *overrides: str, drop_column_at: int = -1):
    files = _site_files(tmp_path / "sites", drop_column_at=drop_column_at)
    cfg = make_cfg("federated.n_clients=3", "federated.min_clients=3", "federated.rounds=2", *overrides)
    work = tmp_path / "server"
    rc = to_run_config(cfg, model="regressor", work_dir=str(work), seed=3, node_wait_s=2.0, sites=True)
    main(_site_grid(rc, files, tmp_path / "ledgers"), server_context(rc))
    return files, work, rc


def test_three_sites_train_without_the_server_holding_a_row(tmp_path):
    files, work, rc = _run(tmp_path, "dp.enabled=true", "regressor.dp_fit.batch_size=16", "dp.target_epsilon=50")
    _, record = read_result(work, "regressor")
    sites = record["sites"]
    # Each site split its own file locally: train sizes differ as the files do, and they are what trained.
    assert [s["rows"] for s in sites["sites"]] == list(SIZES)
    assert record["partition"] == {"method": "sites", "sizes": sites["train_sizes"]}
    assert sites["train_sizes"][0] < sites["train_sizes"][2] and sites["train_sizes"][1] < sites["train_sizes"][0]
    assert [h["clients_trained"] for h in record["history"]] == [3, 3]
    assert all(np.isfinite(h["val_r2"]) and "test_r2" not in h for h in record["history"])  # test: once, at the end
    assert np.isfinite(record["final_metrics"]["test_r2"]) and record["final_metrics"]["sites_evaluated"] == 3
    # Federated standardisation = the pooled train rows' mean / std, to 1e-9, without pooling them.
    cfg = make_cfg("federated.n_clients=3")
    locals_ = [site.local_data({"data-path": str(f), "target": "y"}, cfg, model="regressor").x["train"] for f in files]
    rows = np.concatenate(locals_)
    np.testing.assert_allclose(sites["standardisation"]["x_mean"], rows.mean(axis=0), rtol=0, atol=1e-9)
    np.testing.assert_allclose(sites["standardisation"]["x_std"], rows.std(axis=0), rtol=1e-9, atol=0)
    assert any("not DP-noised" in line for line in sites["not_dp_protected"])
    # The server's inputs never name a site's file; its work folder holds no data.
    text = json.dumps(rc) + json.dumps(record)
    assert not any(str(f) in text or f.name in text.replace("data-path", "") for f in files)
    assert not (work / "data").exists() and not (work / "clients").exists()
    # Each site's ledger is at the site, and it holds that site's spend (3 sites x 2 rounds).
    for i in range(3):
        ledger = json.loads((tmp_path / "ledgers" / f"site{i}" / "regressor.json").read_text())
        assert ledger["rounds_trained"] == [1, 2] and ledger["reserved_round"] is None
        assert record["client_epsilon"][str(i)][-1] > 0


def test_a_site_with_other_columns_is_refused_by_name_before_training(tmp_path):
    with pytest.raises(
        SiteMismatchError, match=r"site 1 \(node 101\) disagrees with site 0 \(node 100\): it lacks column\(s\) 'bmi'"
    ):
        _run(tmp_path, drop_column_at=1)
    error = read_error(tmp_path / "server", "regressor")
    assert error["error_type"] == "SiteMismatchError" and "'bmi'" in error["error"]
    assert not (tmp_path / "ledgers").exists()  # no site trained (no ledger was even written)


def test_a_site_without_data_path_is_refused_in_per_site_mode(tmp_path):
    from federated.app.client_app import _client

    cfg = make_cfg()
    rc = to_run_config(cfg, model="regressor", work_dir=str(tmp_path), sites=True)
    ctx = Context(run_id=1, node_id=1, state=RecordDict(), run_config=rc, node_config={"partition-id": 0})
    with pytest.raises(Exception, match="no data-path in its node config"):
        _client(ctx)


@pytest.mark.parametrize("setting", ["federated.secure_aggregation=true", "client_dp.enabled=true"])
def test_per_site_secagg_or_user_dp_is_refused_before_any_process_starts(tmp_path, monkeypatch, capsys, setting):
    """Refused at config time in one line (it took ~60 s of start-up before), by the deploy CLI and the ServerApp."""
    from federated.launch import deploy as deploy_mod

    monkeypatch.setattr(deploy_mod.launcher.Processes, "start", lambda *a, **k: pytest.fail("a process started"))
    files = _site_files(tmp_path / "sites")
    work = tmp_path / "run"
    argv = ["--work-dir", str(work), "--site-target", "y", *[f"--site-data={f}" for f in files], setting]
    assert deploy_mod.main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and setting.split("=")[0] in err and "does not support" in err
    assert not work.exists()  # nothing half-written
    cfg = make_cfg("federated.n_clients=3", setting)
    rc = to_run_config(cfg, model="regressor", work_dir=str(tmp_path / "server"), sites=True)
    with pytest.raises(Exception, match="does not support"):
        main(InProcessGrid(rc, 0), server_context(rc))  # no node is ever waited for


@pytest.mark.slow
def test_deployment_with_three_sites_reading_their_own_csv(tmp_path):
    """A real loopback deployment: three SuperNodes, each given only its own file in its node config."""
    from auditml_core.config import load_config
    from federated.launch.deploy import SiteFiles, deploy

    files = _site_files(tmp_path / "sites")
    cfg = load_config(
        None,
        [
            "regressor.hidden_sizes=[8]",
            "federated.n_clients=3",
            "federated.min_clients=2",
            "federated.rounds=2",
            "federated.local_epochs=1",
        ],
    )
    work = tmp_path / "run"
    record = deploy(cfg, model="regressor", work=work, n_supernodes=3, sites=SiteFiles(data=tuple(files), target="y"))
    assert record["completed_rounds"] == 2 and record["deployment"]["per_site_data"]
    assert [s["rows"] for s in record["sites"]["sites"]] == list(SIZES)
    rc_text = (work / "run_config.toml").read_text()
    assert not any(str(f) in rc_text or str(f.parent) in rc_text for f in files)
    assert not (work / "data").exists()
    logs = "".join(p.read_text(errors="replace") for p in (work / "logs").glob("superlink*"))
    assert not any(str(f) in logs for f in files)
    # the bad-site case, deployed: refused before training, by site
    bad = _site_files(tmp_path / "bad", drop_column_at=2)
    with pytest.raises(SiteMismatchError, match=r"site 2 \(node \d+\) disagrees"):
        deploy(
            cfg,
            model="regressor",
            work=tmp_path / "bad-run",
            n_supernodes=3,
            sites=SiteFiles(data=tuple(bad), target="y"),
        )


def test_a_site_that_comes_back_under_a_new_node_id_is_checked_then_rejoins(tmp_path):
    """A restarted SuperNode has a new node id: it trains again only as an agreed site with its agreed schema."""
    from federated.app.task import load_task

    files = _site_files(tmp_path / "sites")
    bad = _site_files(tmp_path / "bad", drop_column_at=1)[1]
    cfg = make_cfg("federated.n_clients=3", "federated.min_clients=2", "federated.rounds=2")
    rc = to_run_config(cfg, model="regressor", work_dir=str(tmp_path / "server"), seed=3, node_wait_s=2.0, sites=True)
    grid = _site_grid(rc, files, tmp_path / "ledgers")
    from federated.app.run_config import from_run_config

    _, settings = from_run_config(rc)
    task = site.agree(grid, load_task(cfg, settings, run_id=7), timeout=5.0)
    admitted = site.AdmittedSites(grid, task, timeout=5.0)
    assert admitted.get_node_ids() == [100, 101, 102] and admitted.rejoined == []
    node_configs = [grid.contexts[100 + i].node_config for i in range(3)]

    def connect(node_id: int, partition_id: int, path: Path) -> None:
        grid.contexts[node_id] = Context(
            run_id=7,
            node_id=node_id,
            state=RecordDict(),
            run_config=dict(rc),
            node_config={**node_configs[partition_id], "data-path": str(path)},
        )

    connect(200, 0, files[0])  # site 0 twice: its first node is still connected, so this one waits
    connect(201, 1, bad)  # site 1's node, now with a file that lacks a column
    del grid.contexts[101]  # site 1's SuperNode died
    assert admitted.get_node_ids() == [100, 102]
    assert "already connected" in admitted.waiting[200] and "bmi" in admitted.refused[201]
    connect(202, 1, files[1])  # site 1 back, its own file: admitted in node 101's place
    assert admitted.get_node_ids() == [100, 102, 202]
    (rejoin,) = admitted.rejoined
    assert (rejoin["partition_id"], rejoin["node_id"], rejoin["previous_node_id"]) == (1, 202, 101)
    assert admitted.replaced_nodes == {101}
    assert admitted.get_node_ids() == [100, 102, 202]  # asked once: no second schema query
    assert sorted(admitted.refused) == [201] and sorted(admitted.waiting) == [200]
    del grid.contexts[100]  # site 0's first node dies: the waiting one takes its place
    assert admitted.get_node_ids() == [102, 200, 202] and admitted.rejoined[-1]["previous_node_id"] == 100


def _pids(*needles: str) -> list[int]:
    """Live processes whose command line holds every needle."""
    import os

    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and all(n.encode() in cmdline for n in needles) and int(entry.name) != os.getpid():
            found.append(int(entry.name))
    return found


def _ledger(work: Path, site_index: int) -> dict | None:
    try:
        return json.loads((work / f"site-{site_index}" / "privacy-ledger" / "regressor.json").read_text())
    except (OSError, ValueError):
        return None


def _snapshot(pid: int) -> tuple[list[str], dict[str, str], str]:
    """A process's command line, environment and folder: what restarting it the same way needs."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
    env = (kv.split(b"=", 1) for kv in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in kv)
    return (
        [a.decode() for a in argv],
        {k.decode(): v.decode() for k, v in env},
        str(Path(f"/proc/{pid}/cwd").readlink()),
    )


@pytest.mark.slow
def test_a_site_killed_mid_round_is_recorded_the_round_goes_on_and_the_site_rejoins(tmp_path):
    """3 sites, min_clients=2: kill -9 of site 1's SuperNode while it trains round 2 (its ClientApp worker dies
    with it); the two survivors finish the round; site 1, restarted at once with the same command, rejoins later."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parents[2]
    files = _site_files(tmp_path / "sites")
    work = tmp_path / "run"
    rounds, local_epochs = 5, 40
    cmd = [
        *[sys.executable, "-m", "federated.launch.deploy", "--work-dir", str(work), "--site-target", "y"],
        *[f"--site-data={f}" for f in files],
        *["regressor.hidden_sizes=[8]", f"federated.rounds={rounds}", "federated.min_clients=2"],
        # DP: the site's ledger shows when it starts a round (write-ahead reservation); 40 local epochs keep
        # it training for a second or more, so the kill lands mid-round.
        *["dp.enabled=true", "dp.accountant=rdp", f"federated.local_epochs={local_epochs}"],
    ]
    env = {**os.environ, "PYTHONPATH": str(root)}
    out, err = tmp_path / "deploy.out", tmp_path / "deploy.err"
    deploy = subprocess.Popen(cmd, cwd=root, env=env, stdout=out.open("wb"), stderr=err.open("wb"))
    restarted: list[subprocess.Popen] = []
    try:
        deadline = time.monotonic() + 300
        while (_ledger(work, 1) or {}).get("reserved_round") != 2:  # site 1 has reserved round 2: it trains now
            assert deploy.poll() is None, err.read_text()[-4000:]
            assert time.monotonic() < deadline, "site 1 never started round 2"
            time.sleep(0.02)
        # Site 1 is one process (python -m federated.site: its SuperNode) with its ClientApp worker as a child.
        (node,) = _pids("-m\0federated.site\0", str(files[1]))
        (worker,) = _pids("federated.launch.clientapp_worker", f"--parent-pid\0{node}\0")
        node_was = _snapshot(node)
        os.kill(node, signal.SIGKILL)  # the SuperNode alone: its worker must go with it (issue 25 item 3)
        t_kill = time.monotonic()
        while worker in _pids("federated.launch.clientapp_worker"):
            assert time.monotonic() - t_kill < 5, "the ClientApp worker outlived its SuperNode"
            time.sleep(0.05)
        # Site 1 comes back at once: the same command line (node config, ledger), which starts a new worker.
        # The SuperLink still lists the dead node for up to 2 heartbeats: the new one waits.
        argv, node_env, cwd = node_was
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        restarted.append(subprocess.Popen(argv, env=node_env, cwd=cwd, **quiet))
        while (_ledger(work, 0) or {}).get("reserved_round") != 3:  # a survivor starts round 3
            assert deploy.poll() is None, err.read_text()[-4000:]
            assert time.monotonic() - t_kill < 120, "the round did not go on within 120 s of the kill"
            time.sleep(0.05)
        print(f"kill -9 of site 1 -> round 3 started at a survivor: {time.monotonic() - t_kill:.1f} s")
        assert deploy.wait(timeout=300) == 0, err.read_text()[-4000:]
    finally:
        for proc in [deploy, *restarted]:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    printed = json.loads(out.read_text())
    exits = {e["name"]: e["exit_code"] for e in printed["deployment"]["supernode_exits"]}
    assert exits == {"supernode-1": -9}
    record = json.loads((work / "result" / "regressor.json").read_text())
    assert record["completed_rounds"] == rounds and [h["round"] for h in record["history"]] == [1, 2, 3, 4, 5]
    dead = next(s["node_id"] for s in record["sites"]["sites"] if s["partition_id"] == 1)
    (rejoin,) = record["sites_rejoined"]
    assert rejoin["partition_id"] == 1 and rejoin["previous_node_id"] == dead and rejoin["node_id"] != dead
    assert record["nodes_refused"] == {}
    # The site's ledger: round 1, the round it was killed in (its reservation stands), then every round from
    # its return on. ε is counted for all of them: steps = (rounds it spent) x local_epochs x steps per epoch.
    killed = _ledger(work, 1)
    back = killed["rounds_trained"][1]
    assert back >= 3 and killed["rounds_trained"] == [1, *range(back, rounds + 1)] and killed["reserved_round"] is None
    ((_, q, _), *_) = killed["accountant_history"]
    assert sum(n for _, _, n in killed["accountant_history"]) == (2 + rounds - back + 1) * local_epochs * round(1 / q)
    # The record: round 2 names the dead node once, by its own id (the SuperLink's "Node Unavailable");
    # later rounds went to the two survivors (the dead node "not connected") until the site was back.
    failures = [(f["round"], f["node_id"]) for f in record["failures"]]
    assert failures == [(r, dead) for r in range(2, back)]
    assert "Node Unavailable" in record["failures"][0]["reason"]
    assert all(f["reason"] == "node not connected when the round started" for f in record["failures"][1:])
    assert [h["clients_trained"] for h in record["history"]] == [3] + [2] * (back - 2) + [3] * (rounds - back + 1)
    # The survivors trained every round.
    assert [(_ledger(work, i) or {}).get("rounds_trained") for i in (0, 2)] == [[1, 2, 3, 4, 5]] * 2
    print(f"site 1 rejoined in round {back}")
    time.sleep(1.0)
    assert not _pids(str(work)), "a process of the deployment outlived it"


def test_tls_cli_issues_a_certificate_for_the_named_hosts(tmp_path):
    import ipaddress

    from cryptography import x509

    from federated.launch import tls

    assert tls.main(["--hosts", "a.example,10.0.0.5", "--supernodes", "site0", "--out", str(tmp_path)]) == 0
    cert = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"a.example", "localhost"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("10.0.0.5"),
        ipaddress.ip_address("127.0.0.1"),
    }
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.pem").read_bytes())
    cert.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    assert (tmp_path / "site0.pub").read_text().startswith("ecdsa-sha2-nistp384 ")


def test_a_site_rejoining_mid_sampling_costs_no_other_site_its_round(tmp_path, monkeypatch):
    """Issue 25 item 4: Flower sizes the sample from one node list and draws it from a second; a site admitted
    between the two calls left a random node, often a healthy one, without its round, recorded as "node not
    connected". Here a rejoin lands between them in round 2 and Flower's draw drops the first node it may."""
    import flwr.serverapp.strategy.strategy_utils as sampling

    monkeypatch.setattr(sampling.random, "sample", lambda nodes, k: list(nodes)[-k:])  # a legal, unlucky draw
    files = _site_files(tmp_path / "sites")
    cfg = make_cfg("federated.n_clients=3", "federated.min_clients=2", "federated.rounds=3")
    rc = to_run_config(cfg, model="regressor", work_dir=str(tmp_path / "server"), seed=3, node_wait_s=2.0, sites=True)

    class RejoinMidSampling(InProcessGrid):
        """Site 1's node 101 dies after round 1 (its evaluation sent); its new node 201 connects at the second
        node list asked for after that: Flower's draw of round 2's sample, which sized it on the first."""

        armed, asked = False, 0

        def get_node_ids(self):
            if self.armed:
                self.asked += 1
                if self.asked == 2:
                    self.armed = False
                    self.contexts[201] = Context(
                        run_id=7, node_id=201, state=RecordDict(), run_config=dict(rc), node_config=site_one
                    )
            return super().get_node_ids()

        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            replies = super().send_and_receive(messages, timeout=timeout)
            evaluation = messages and messages[0].metadata.message_type == "evaluate"
            if evaluation and self.sent_rounds == [1, 1, 1] and 101 in self.contexts:
                del self.contexts[101]  # site 1's SuperNode died after round 1
                self.armed = True
            return replies

    grid = RejoinMidSampling(rc, 3)
    site_grid = _site_grid(rc, files, tmp_path / "ledgers")
    grid.contexts = site_grid.contexts
    site_one = dict(grid.contexts[101].node_config)
    main(grid, server_context(rc))
    _, record = read_result(tmp_path / "server", "regressor")
    sent = {r["round"]: sorted(c["node_id"] for c in r["trained"]) for r in record["client_rounds"]}
    assert sent == {1: [100, 101, 102], 2: [100, 102], 3: [100, 102, 201]}  # both healthy sites every round
    # Only the dead node is recorded as not connected (true: it was gone when round 2 started), no healthy one.
    assert record["failures"] == [{"round": 2, "node_id": 101, "reason": "node not connected when the round started"}]
    (rejoin,) = record["client_rounds"][1]["rejoined"]  # round 2's entry says what happened to site 1
    assert (rejoin["partition_id"], rejoin["node_id"], rejoin["previous_node_id"]) == (1, 201, 101)
    assert rejoin["sent_from_round"] == 3 and record["sites_rejoined"][0]["node_id"] == 201
    assert [h["clients_trained"] for h in record["history"]] == [3, 2, 3]


@pytest.mark.slow
def test_a_deployment_whose_server_crashed_mid_round_resumes_within_budget(tmp_path):
    """Issue 25 item 1, deployed: kill -9 of the ServerApp while the sites train round 3 under DP; the deployment
    fails; the same command on the same work folder resumes after round 2 and completes, each site within its
    budget, and a site that was training when the server died spends that round once."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from auditml_core.privacy.dp_sgd import epsilon_of

    root = Path(__file__).resolve().parents[2]
    files = _site_files(tmp_path / "sites")
    work = tmp_path / "run"
    rounds, local_epochs, target = 5, 40, 3.0
    cmd = [
        *[sys.executable, "-m", "federated.launch.deploy", "--work-dir", str(work), "--site-target", "y"],
        *[f"--site-data={f}" for f in files],
        *["regressor.hidden_sizes=[8]", f"federated.rounds={rounds}", "federated.min_clients=1"],
        *[
            "dp.enabled=true",
            "dp.accountant=rdp",
            f"dp.target_epsilon={target}",
            f"federated.local_epochs={local_epochs}",
        ],
    ]
    env = {**os.environ, "PYTHONPATH": str(root)}
    err = tmp_path / "deploy-1.err"
    first = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=err.open("wb"))
    try:
        deadline = time.monotonic() + 300
        while not any((_ledger(work, i) or {}).get("reserved_round") == 3 for i in range(3)):
            assert first.poll() is None, err.read_text()[-4000:]
            assert time.monotonic() < deadline, "no site reserved round 3"
            time.sleep(0.01)
        servers = [p for p in _pids("flwr-serverapp") if str(work).encode() in Path(f"/proc/{p}/environ").read_bytes()]
        assert servers, "no ServerApp process of this deployment"
        for pid in servers:
            os.kill(pid, signal.SIGKILL)  # the server, mid-round; the sites go on until the deployment stops
        assert first.wait(timeout=300) != 0  # the run ended without a result
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(timeout=10)
    killed = {i: _ledger(work, i) for i in range(3)}
    mid_round = [i for i, led in killed.items() if led["reserved_round"] == 3 and 3 not in led["rounds_trained"]]
    second = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-4000:]
    record = json.loads((work / "result" / "regressor.json").read_text())
    assert record["resumed_from_round"] == [2] and record["completed_rounds"] == rounds
    # Every site trained every round once, within budget: a site training when the server died re-ran round 3
    # under its reservation; one that had replied already (its result reached the SuperLink: released) sent the
    # same result again when the resumed server asked for round 3 from the same global model.
    assert [h["clients_trained"] for h in record["history"]] == [3] * rounds
    for i in range(3):
        led = _ledger(work, i)
        eps = epsilon_of([tuple(h) for h in led["accountant_history"]], delta=1e-5, accountant="rdp")
        assert eps <= target + 1e-9 and led["reserved_round"] is None
        assert led["rounds_trained"] == list(range(1, rounds + 1)), (i, led["rounds_trained"])
        # one round's spend, from the ledger at the kill: its steps over the rounds it counted (a reservation too)
        spent, before = killed[i]["accountant_history"], killed[i]["rounds_trained"]
        counted = len(before) + (1 if killed[i]["reserved_round"] not in (None, *before) else 0)
        assert sum(n for _, _, n in led["accountant_history"]) * counted == sum(n for _, _, n in spent) * rounds
    replayed = sorted(int(c["partition-id"]) for c in record["client_rounds"][2]["trained"] if c["replayed"])
    assert replayed == sorted(set(range(3)) - set(mid_round))
    print(f"server killed in round 3; sites mid-round: {mid_round}, sent their released result again: {replayed}")
    time.sleep(1.0)
    assert not _pids(str(work)), "a process of the deployment outlived it"
