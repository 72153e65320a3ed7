"""``python -m federated.launch.deploy``: a real Flower deployment on this machine, one process per site.

Starts ``flower-superlink`` (deployment mode) and N sites with the per-site command
(``python -m federated.site --partition-id i --num-partitions N ...``: a SuperNode with its long-lived
ClientApp worker, :mod:`federated.launch.site`), runs this repo's app on them with ``flwr run``, prints the
outcome and stops every process, also on failure and Ctrl-C.

By default everything talks over loopback. ``--superlink-host ADDRESS`` binds the SuperLink
to another address of this machine (the one the sites dial), and ``--site-prefix COMMAND``
(once per site) starts site i's processes under a command prefix, e.g. ``ip netns exec NS``
to put the site in its own network namespace, where the SuperLink's address is the only way
to the server (:mod:`federated.launch.netns` builds such a network; ``scripts/deploy_netns.py``).

``--tls`` generates a demo CA and SuperLink certificate and encrypts every connection;
``--auth`` (needs ``--tls``) gives each SuperNode a key pair, registers its public key
with ``flwr supernode register`` and starts the SuperLink with SuperNode authentication,
so only registered SuperNodes may join.

Example::

    python -m federated.launch.deploy --n-supernodes 2 --tls --auth federated.rounds=2 cnn.channels=[8]
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from auditml_core import data as core_data
from auditml_core import models, seeds
from auditml_core.config import load_config
from auditml_core.errors import USER_ERRORS, UserError
from auditml_core.teacher import model_specs
from federated.app import site as app_site
from federated.app import workdir
from federated.app.run_config import overrides_for, run_config_toml, to_run_config
from federated.app.schema import SiteMismatchError
from federated.launch import processes as launcher
from federated.launch import site as site_cmd
from federated.launch.tls import ServerCredentials, make_server_credentials, make_supernode_keys
from federated.patches import flower_api

log = logging.getLogger("federated.launch.deploy")
CONNECTION = "deployment"
START_TIMEOUT_S = 60.0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m federated.launch.deploy",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="pipeline config overrides, e.g. federated.rounds=2"
    )
    p.add_argument("--config", metavar="FILE.toml", help="pipeline TOML config")
    p.add_argument("--n-supernodes", type=int, default=2, help="sites to start; sets federated.n_clients (default 2)")
    p.add_argument(
        "--model",
        choices=list(models.MODELS),
        default=None,
        help="which pipeline model to train (default cnn; regressor for CSV --site-data)",
    )
    p.add_argument(
        "--work-dir", metavar="DIR", help="where data, logs, checkpoints and the result go (default runs/deploy-<UTC>)"
    )
    p.add_argument(
        "--site-data",
        action="append",
        metavar="FILE",
        help="per-site data: one SuperNode per FILE reads only that file (CSV -> regressor; .npz / image folder -> CNN); "
        "repeat once per site; the server never reads them",
    )
    p.add_argument(
        "--site-target", default="", metavar="COLUMN", help="the sites' CSV target column (default data.target)"
    )
    p.add_argument(
        "--site-ledger",
        action="append",
        metavar="DIR",
        help="site i's privacy-ledger folder (repeat in --site-data order; default <work>/site-<i>/privacy-ledger)",
    )
    p.add_argument(
        "--superlink-host",
        default="127.0.0.1",
        metavar="ADDRESS",
        help="the address of this machine the SuperLink listens on and the sites dial (default 127.0.0.1); "
        "--tls's certificate covers it",
    )
    p.add_argument(
        "--site-prefix",
        action="append",
        metavar="COMMAND",
        help="command prefix for site i's processes (its SuperNode and ClientApp process), repeat once per site "
        "in site order, e.g. 'ip netns exec site0' to run the site in its own network namespace; it must run the "
        "command on this machine, in place (same process, same files), as `ip netns exec` and `nsenter` do",
    )
    p.add_argument("--tls", action="store_true", help="encrypt every connection with generated demo certificates")
    p.add_argument("--auth", action="store_true", help="SuperNode authentication with generated keys (needs --tls)")
    p.add_argument(
        "--isolation",
        choices=["process", "subprocess"],
        default="process",
        help="process: one long-lived ClientApp process per site (default); subprocess: Flower's, one per message",
    )
    return p


def deploy(
    cfg,
    *,
    model: str,
    work: Path,
    n_supernodes: int,
    tls: bool = False,
    auth: bool = False,
    app_settings: dict | None = None,
    sites: SiteFiles | None = None,
    isolation: str = "process",
    superlink_host: str = "127.0.0.1",
    site_prefixes: Sequence[Sequence[str]] = (),
) -> dict:
    """Run one federated training of ``model`` on a deployment on this machine; return the server's record.

    ``app_settings`` are extra ``app.*`` run-config settings (tests: fault injection).
    ``isolation="process"`` (default) runs one long-lived ClientApp process per SuperNode
    (:mod:`federated.launch.clientapp_worker`, started by the site command as its child); ``"subprocess"`` is
    Flower's default, a fresh process per message.
    ``superlink_host`` is the address the SuperLink binds and the sites dial (the TLS certificate
    covers it); ``site_prefixes[i]`` (none, or one per site) is put before site ``i``'s commands,
    e.g. ``["ip", "netns", "exec", "site0"]``: it must exec the command in place on this machine.

    Raises
    ------
    UserError
        For impossible settings; ``FederatedRunError`` when the run fails (with the log's tail).
    """
    _refuse_impossible(cfg, n_supernodes=n_supernodes, tls=tls, auth=auth, sites=sites, site_prefixes=site_prefixes)
    isolation = flower_api.clientapp_isolation(isolation)  # Flower's stock isolation where the worker is unsupported
    port = launcher.free_port()
    address = _dial_address(superlink_host, port)
    work.mkdir(parents=True, exist_ok=True)
    rc_path = _write_run_config(
        cfg, model=model, work=work, n_supernodes=n_supernodes, sites=sites, app_settings=app_settings
    )
    creds = make_server_credentials(work / "certs", hosts=(superlink_host,)) if tls else None
    env = _flower_env(work / "flwr-home", address=address, creds=creds)
    t0 = time.time()
    with launcher.sigterm_as_exit(), launcher.Processes(work / "logs", env) as procs:
        superlink = _start_superlink(procs, host=superlink_host, port=port, creds=creds, auth=auth)
        keys = _register_all(procs, work, n_supernodes) if auth else []
        for i in range(n_supernodes):
            site_argv = ["--root-certificates", str(creds.ca_cert)] if creds else ["--insecure"]
            if auth:
                site_argv += ["--auth-supernode-private-key", str(keys[i])]
            procs.start(
                f"supernode-{i}",
                [
                    *(site_prefixes[i] if site_prefixes else []),
                    *_site_command(address, isolation=isolation, partition_id=i, n_supernodes=n_supernodes),
                    *(sites.site_args(work, i) if sites is not None else []),
                    *site_argv,
                ],
            )
        run = launcher.start_flwr_run(procs, CONNECTION, rc_path, app=launcher.stage_app(work / "app"))
        node_exits = _wait_for_run(run, superlink, procs, t0=t0)
        record = _read_record(work, model, procs)
    record = dict(record)
    record["deployment"] = {
        "supernodes": n_supernodes,
        "tls": tls,
        "supernode_auth": auth,
        "seconds": time.time() - t0,
        "supernode_exits": node_exits,
        "per_site_data": sites is not None,
        "superlink_address": address,  # what every site dialled
        "site_prefixes": [shlex.join(p) for p in site_prefixes],
    }
    return record


def _refuse_impossible(
    cfg,
    *,
    n_supernodes: int,
    tls: bool,
    auth: bool,
    sites: SiteFiles | None,
    site_prefixes: Sequence[Sequence[str]],
) -> None:
    """Refuse settings no deployment can run, before any process starts."""
    if auth and not tls:
        raise UserError("--auth needs --tls: Flower authenticates SuperNodes only over TLS")
    if sites is not None:
        app_site.refuse_unsupported(cfg)  # before any process starts (it took ~60 s of start-up to say so)
    if cfg.federated.n_clients != n_supernodes:
        raise UserError(
            f"federated.n_clients={cfg.federated.n_clients} but --n-supernodes={n_supernodes}; make them equal"
        )
    if site_prefixes and len(site_prefixes) != n_supernodes:
        raise UserError(f"{len(site_prefixes)} --site-prefix value(s) for {n_supernodes} sites; give one per site")


def _write_run_config(
    cfg, *, model: str, work: Path, n_supernodes: int, sites: SiteFiles | None, app_settings: dict | None
) -> Path:
    """Write the app's inputs (none with per-site data) and its run-config to ``work``; return the run-config's path."""
    if sites is not None:  # --- per-site data: nothing is prepared here; each SuperNode reads its own file
        sites.check(n_supernodes)
        app_settings = {**dict(app_settings or {}), "sites": True}
    else:
        datasets = core_data.prepare(cfg, seed=seeds.stage_seed(cfg.seed, "data"))
        spec = model_specs(cfg, datasets)[model]
        workdir.write_inputs(work, name=model, dataset=datasets[models.model_entry(model).dataset], spec=spec)
    # app.seed stays -1: the model seed is derived from `seed` as the train stage does.
    run_config = to_run_config(cfg, model=model, work_dir=str(work.resolve()), **dict(app_settings or {}))
    overrides = overrides_for(run_config, (launcher.REPO_ROOT / "pyproject.toml").read_text())
    rc_path = work / "run_config.toml"
    rc_path.write_text(run_config_toml(overrides))
    return rc_path


def _flower_env(flwr_home: Path, *, address: str, creds: ServerCredentials | None) -> dict[str, str]:
    """Write the ``flwr`` connection to the SuperLink into ``flwr_home``; return the environment of every process."""
    launcher.write_connection(
        flwr_home,
        CONNECTION,
        address=address,
        root_certificates=str(creds.ca_cert.resolve()) if creds else None,
    )
    env = launcher.flower_env(flwr_home)
    # federated.launch.site and its ClientApp worker run as `python -m` from any working directory
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(launcher.REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _start_superlink(
    procs: launcher.Processes, *, host: str, port: int, creds: ServerCredentials | None, auth: bool
) -> subprocess.Popen:
    """Start ``flower-superlink`` (deployment mode) on ``host:port`` and wait until it answers; return its process."""
    security = (
        [
            "--ssl-ca-certfile",
            str(creds.ca_cert),
            "--ssl-certfile",
            str(creds.server_cert),
            "--ssl-keyfile",
            str(creds.server_key),
        ]
        if creds
        else ["--insecure"]
    )
    superlink = procs.start(
        "superlink",
        [
            launcher.bin_path("flower-superlink"),
            *security,
            "--host",
            host,
            "--port",
            str(port),
            "--disable-runtime-dependency-installation",
            *(["--enable-supernode-auth"] if auth else []),
        ],
    )
    launcher.wait_until_healthy(
        superlink,
        port,
        timeout_s=START_TIMEOUT_S,
        what="flower-superlink",
        logs=procs,
        name="superlink",
        ca_file=str(creds.ca_cert) if creds else None,
        host=host,
    )
    return superlink


def _site_command(address: str, *, isolation: str, partition_id: int, n_supernodes: int) -> list[str]:
    """The per-site command of site ``partition_id`` (python -m federated.site, issue 25).

    Its SuperNode runs in that process with the fast polls; its long-lived ClientApp worker is that process's child.
    """
    return [
        *[sys.executable, "-m", "federated.site", "--superlink", address, "--isolation", isolation],
        *["--partition-id", str(partition_id), "--num-partitions", str(n_supernodes)],
    ]


def _wait_for_run(
    run: subprocess.Popen, superlink: subprocess.Popen, procs: launcher.Processes, *, t0: float
) -> list[dict]:
    """Wait for ``flwr run`` to end; return the sites that exited meanwhile (name, exit code, seconds after ``t0``).

    Raises
    ------
    FederatedRunError
        If the SuperLink exits first.
    """
    node_exits: list[dict] = []
    while run.poll() is None:
        if superlink.poll() is not None:
            raise launcher.FederatedRunError(
                f"flower-superlink exited with code {superlink.returncode}:\n{procs.log_tail('superlink')}"
            )
        for name, proc in list(procs.procs.items()):
            if (
                name.startswith("supernode-")
                and proc.poll() is not None
                and name not in {e["name"] for e in node_exits}
            ):
                # A site going away is the federation's business: the server records its missing replies
                # and goes on while federated.min_clients train (or fails the round, saying so).
                node_exits.append({"name": name, "exit_code": proc.returncode, "after_s": time.time() - t0})
                log.warning("%s exited with code %s; the run goes on without it", name, proc.returncode)
        time.sleep(0.25)
    return node_exits


def _read_record(work: Path, model: str, procs: launcher.Processes) -> dict:
    """The server's record of the run; raise the server's error (its own type where it is a user error) if it failed."""
    error = workdir.read_error(work, model)
    if error is not None:
        known = {**USER_ERRORS, "SiteMismatchError": SiteMismatchError}
        raise known.get(error.get("error_type", ""), launcher.FederatedRunError)(error["error"])
    try:
        _, record = workdir.read_result(work, model)
    except FileNotFoundError:
        raise launcher.FederatedRunError(f"the run ended without a result:\n{procs.log_tail('flwr-run')}") from None
    return record


@dataclass(frozen=True)
class SiteFiles:
    """Per-site data of a deployment: one file (and ledger folder) per SuperNode."""

    data: tuple[Path, ...]  # site i reads only data[i]
    target: str = ""  # CSV target column ("" = data.target)
    ledgers: tuple[Path, ...] = ()  # site i's privacy-ledger folder (default <work>/site-<i>/privacy-ledger)

    def check(self, n_supernodes: int) -> None:
        """Refuse a count of files or ledger folders that does not match the sites."""
        if len(self.data) != n_supernodes:
            raise UserError(f"{len(self.data)} --site-data file(s) for {n_supernodes} SuperNodes; give one per site")
        if self.ledgers and len(self.ledgers) != len(self.data):
            raise UserError(
                f"{len(self.ledgers)} --site-ledger folder(s) for {len(self.data)} sites; give one per site"
            )
        for i, path in enumerate(self.data):  # refused here, before any process, as the site command would
            site_cmd.node_config(partition_id=i, num_partitions=n_supernodes, data=path, target=self.target)

    def site_args(self, work: Path, i: int) -> list[str]:
        """Site ``i``'s data options of ``python -m federated.site``: its file, target and ledger folder."""
        ledger = self.ledgers[i] if self.ledgers else work / f"site-{i}" / "privacy-ledger"
        out = ["--data", str(self.data[i].resolve()), "--ledger", str(ledger.resolve())]
        return out + (["--target", self.target] if self.target else [])


def _dial_address(host: str, port: int) -> str:
    """``host:port`` for the SuperLink's ``host`` (``[v6]:port``); refuses addresses nobody can dial."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:  # a host name: the sites resolve it
        return f"{host}:{port}"
    if ip.is_unspecified:
        raise UserError(
            f"--superlink-host {host} listens everywhere but cannot be dialled; give the address of this machine "
            "that the sites reach (e.g. 10.0.0.5)"
        )
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def _register_all(procs: launcher.Processes, work: Path, n_supernodes: int) -> list[Path]:
    """Create a key pair per SuperNode and register the public keys with the SuperLink; return the private keys.

    One ``flwr supernode register`` per site, all at once (each is a CLI start, ~2-5 s here).
    """
    keys = [make_supernode_keys(work / "certs", f"supernode-{i}") for i in range(n_supernodes)]
    argv = [launcher.bin_path("flwr"), "supernode", "register"]
    running = [
        subprocess.Popen(
            [*argv, str(public), CONNECTION],
            env=procs.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        for _, public in keys
    ]
    failed = []
    try:
        for i, proc in enumerate(running):
            out, _ = proc.communicate(timeout=60)
            if proc.returncode != 0:
                failed.append(f"SuperNode {i}: {out[-2000:]}")
    finally:
        for proc in running:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if failed:
        raise launcher.FederatedRunError("registering SuperNodes failed:\n" + "\n".join(failed))
    return [private for private, _ in keys]


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        sites = None
        if args.site_data:  # one SuperNode per file
            sites = SiteFiles(
                data=tuple(Path(p) for p in args.site_data),
                target=args.site_target,
                ledgers=tuple(Path(p) for p in args.site_ledger or ()),
            )
            args.n_supernodes = len(args.site_data)
        model = args.model or ("regressor" if sites and sites.data[0].suffix.lower() == ".csv" else "cnn")
        forced = [f"federated.n_clients={args.n_supernodes}"]
        if not any(o.startswith("federated.min_clients=") for o in args.overrides):
            forced.append(f"federated.min_clients={min(args.n_supernodes, 2)}")
        cfg = load_config(args.config, [*args.overrides, *forced])
        work = Path(args.work_dir or f"runs/deploy-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}")
        record = deploy(
            cfg,
            model=model,
            work=work,
            n_supernodes=args.n_supernodes,
            tls=args.tls,
            auth=args.auth,
            sites=sites,
            isolation=args.isolation,
            superlink_host=args.superlink_host,
            site_prefixes=[shlex.split(p) for p in args.site_prefix or ()],
        )
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted: every Flower process was stopped", file=sys.stderr)
        return 130
    last = record["history"][-1] if record["history"] else {}
    print(
        json.dumps(
            {
                "work_dir": str(work),
                "rounds": record["completed_rounds"],
                "last_round": last,
                "final_metrics": record.get("final_metrics"),  # the test split, once, on the released model
                "failures": len(record["failures"]),
                "deployment": record["deployment"],
                "epsilon": record.get("privacy", {}).get("epsilon"),  # sample-level (dp.enabled)
                "user_level_epsilon": record.get("user_level_privacy", {}).get("epsilon"),  # client_dp.enabled
                "secure_aggregation_rounds": [
                    r["round"] for r in record.get("secure_aggregation", {}).get("rounds", []) if r.get("unmasked")
                ],
            },
            indent=1,
            default=str,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
