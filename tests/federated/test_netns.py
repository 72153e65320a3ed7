"""A per-site deployment beyond loopback: each site's processes in their own network namespace.

The slow test builds a private network (federated.launch.netns.SiteNetwork: a bridge on the host, one
namespace per site with its own veth and address), starts the SuperLink on the bridge address
with TLS and SuperNode authentication and each site under ``ip netns exec`` (deploy's
``site_prefixes``), so the veth is the only way from a site to the server. It needs root; where
namespaces cannot be created (unprivileged CI) it is skipped and says why. The fast tests check
the deploy CLI's hooks and the module's refusals without privileges.
"""

from __future__ import annotations

import json
import re
import shlex
import socket
from pathlib import Path

import pytest
from test_sites import SIZES, _pids, _site_files

from auditml_core.errors import UserError
from federated.launch import deploy as deploy_mod
from federated.launch import netns


def test_deploy_cli_passes_the_superlink_host_and_one_prefix_per_site(monkeypatch, tmp_path):
    seen = {}

    def fake_deploy(cfg, **kwargs):
        seen.update(kwargs)
        raise UserError("stop here")

    monkeypatch.setattr(deploy_mod, "deploy", fake_deploy)
    files = [str(tmp_path / f"s{i}.csv") for i in range(2)]
    argv = [*(f"--site-data={f}" for f in files), "--superlink-host", "10.9.8.7", "--work-dir", str(tmp_path)]
    argv += ["--site-prefix", "ip netns exec 'site a'", "--site-prefix=ip netns exec b"]
    assert deploy_mod.main(argv) == UserError.exit_code
    assert seen["superlink_host"] == "10.9.8.7" and seen["n_supernodes"] == 2
    assert seen["site_prefixes"] == [["ip", "netns", "exec", "site a"], ["ip", "netns", "exec", "b"]]


def test_deploy_refuses_an_undialable_host_and_a_wrong_number_of_prefixes(tmp_path):
    from auditml_core.config import load_config

    assert deploy_mod._dial_address("10.0.0.5", 9) == "10.0.0.5:9"
    assert deploy_mod._dial_address("fd00::1", 9) == "[fd00::1]:9"
    assert deploy_mod._dial_address("superlink.example.org", 9) == "superlink.example.org:9"
    with pytest.raises(UserError, match="listens everywhere but cannot be dialled"):
        deploy_mod._dial_address("0.0.0.0", 9)
    cfg = load_config(None, ["federated.n_clients=2"])
    with pytest.raises(UserError, match="1 --site-prefix value\\(s\\) for 2 sites"):
        deploy_mod.deploy(cfg, model="regressor", work=tmp_path, n_supernodes=2, site_prefixes=[["env"]])
    assert not any(tmp_path.iterdir())  # refused before anything was written or started


def test_site_network_says_why_it_cannot_be_built(monkeypatch):
    monkeypatch.setattr(netns.shutil, "which", lambda name: None)
    with pytest.raises(netns.NetnsUnavailable, match="`ip` is not on PATH"):
        netns.SiteNetwork(3)
    with pytest.raises(UserError, match="give 1 to 200 sites"):
        netns.SiteNetwork(0)


@pytest.fixture
def site_network():
    """Three site namespaces; skipped where they cannot be created; always removed."""
    try:
        net = netns.SiteNetwork(3)
    except netns.NetnsUnavailable as exc:
        pytest.skip(f"needs network namespaces (root): {exc}")
    try:
        yield net
    finally:
        net.close()


def _listener(host: str) -> tuple[socket.socket, int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((host, 0))
    sock.listen()
    return sock, sock.getsockname()[1]


@pytest.mark.slow
def test_three_sites_in_their_own_network_namespaces_train_over_tls_on_the_veth_only(tmp_path, site_network):
    """3 sites, each in its own namespace with its own file; 2 rounds of the tiny regressor; TLS and auth."""
    from auditml_core.config import load_config
    from federated.launch.deploy import SiteFiles, deploy

    net = site_network
    # The network itself: from every site the host's bridge address answers and the host's loopback does not.
    bridge, bridge_port = _listener(net.host_address)
    loopback, loopback_port = _listener("127.0.0.1")
    with bridge, loopback:
        reach = [net.reachable(i, [(net.host_address, bridge_port), ("127.0.0.1", loopback_port)]) for i in range(3)]
    assert reach == [[True, False]] * 3

    files = _site_files(tmp_path / "sites")
    tiny = ["regressor.hidden_sizes=[8]", "federated.rounds=2", "federated.local_epochs=1"]
    cfg = load_config(None, [*tiny, "federated.n_clients=3", "federated.min_clients=3"])
    work = tmp_path / "run"
    before = [net.link_bytes(i) for i in range(3)]
    record = deploy(
        cfg,
        model="regressor",
        work=work,
        n_supernodes=3,
        sites=SiteFiles(data=tuple(files), target="y"),
        tls=True,
        auth=True,
        superlink_host=net.host_address,
        site_prefixes=[net.prefix(i) for i in range(3)],
    )
    after = [net.link_bytes(i) for i in range(3)]

    # The run completed with all three sites, every site's schema agreed (the agreement names each site).
    assert record["completed_rounds"] == 2 and [h["clients_trained"] for h in record["history"]] == [3, 3]
    assert record["failures"] == []
    agreed = record["sites"]
    assert [s["partition_id"] for s in agreed["sites"]] == [0, 1, 2] and [s["rows"] for s in agreed["sites"]] == list(
        SIZES
    )
    assert agreed["schema"]["feature_names"] == ["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"]
    assert all(len(s["dtypes"]) == len(agreed["schema"]["feature_names"]) for s in agreed["sites"])
    # Site i's SuperNode (the one started in namespace i) is the node that reported partition i.
    for i, site in enumerate(agreed["sites"]):
        log = (work / "logs" / f"supernode-{i}.log").read_text(errors="replace")
        assert f"SuperNode ID: {site['node_id']}" in log
        # ... started with the per-site command (python -m federated.site, issue 25), whose long-lived ClientApp
        # worker (its child, in the same namespace) ran the site's tasks: no ClientApp process per message.
        assert "serving the ClientApp tasks" in log and "federated.launch.clientapp_worker: task" in log
        assert "flwr-clientapp" not in log

    # Every site dialled the bridge address over TLS, and the SuperLink listened there only.
    dep = record["deployment"]
    assert dep["superlink_address"].rsplit(":", 1)[0] == net.host_address
    assert dep["tls"] and dep["supernode_auth"]
    assert dep["site_prefixes"] == [shlex.join(net.prefix(i)) for i in range(3)]
    superlink_log = (work / "logs" / "superlink.log").read_text(errors="replace")
    assert f"Uvicorn running on https://{dep['superlink_address']} " in superlink_log
    fleet_peers = re.findall(r"(\d+\.\d+\.\d+\.\d+):\d+ - \"POST /v1/fleet/", superlink_log)
    assert set(fleet_peers) == set(net.site_addresses)  # every Fleet request came from a site's veth address
    activated = re.findall(r"(\d+\.\d+\.\d+\.\d+):\d+ - \"POST /v1/fleet/activate-node", superlink_log)
    assert sorted(activated) == sorted(net.site_addresses)  # each site's node joined from its own namespace
    assert len(re.findall(r"POST /v1/control/register-node HTTP/1.1\" 200", superlink_log)) == 3  # auth: 3 keys
    # Each veth carried the site's traffic both ways: more than the schema, the two rounds and the evaluations.
    moved = [{k: a[k] - b[k] for k in ("rx", "tx")} for a, b in zip(after, before, strict=True)]
    assert all(m["rx"] > 20_000 and m["tx"] > 20_000 for m in moved), moved
    print("veth bytes per site:", json.dumps(moved), "deployment seconds:", round(dep["seconds"], 1))

    # Nothing outlives the run: no process of it anywhere, none in the namespaces; then no namespace either.
    assert not _pids(str(work)), "a process of the deployment outlived it"
    assert [net.pids(i) for i in range(3)] == [[], [], []]
    assert net.close() == []
    assert net.token not in netns.leftover_networks()
    assert not any(Path("/run/netns", ns).exists() for ns in net.namespaces)
