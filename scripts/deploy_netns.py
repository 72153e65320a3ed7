"""A per-site deployment beyond loopback on one machine: each site in its own network namespace. Prints figures.

Needs root (network namespaces). Builds a private network (:class:`federated.launch.netns.SiteNetwork`:
a bridge on this host at 10.231.X.1, one namespace per site with its own veth and address),
writes one CSV per site (slices of the embedded diabetes table, or ``--site-data`` files),
and runs ``python -m federated.launch.deploy`` with TLS and SuperNode authentication: the SuperLink
bound to the bridge address, every site's SuperNode and ClientApp process started with
``--site-prefix "ip netns exec <its namespace>"``. Then it removes the network. The same
command line is what to run by hand (printed with ``--print-command``)::

    sudo .venv/bin/python scripts/deploy_netns.py                      # 3 sites, 2 rounds, tiny regressor
    sudo .venv/bin/python scripts/deploy_netns.py --repeats 2 --loopback   # interleaved with loopback runs

Figures per run: wall time of the deploy command, its own count from starting the SuperLink to
the result, the ServerApp's time, the server's seconds per round and the rest (start-up, schema
agreement, stop), and the bytes each site's veth carried (its only link to the server).
Extra ``KEY=VALUE`` arguments are pipeline config overrides.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from federated.launch.netns import SiteNetwork  # noqa: E402

SIZES = (150, 120, 172)  # rows per site: three slices of the 442-row diabetes table
TINY = ["regressor.hidden_sizes=[8]", "federated.rounds=2", "federated.local_epochs=1"]


def write_sites(folder: Path, sizes: tuple[int, ...] = SIZES) -> list[Path]:
    """One CSV per site (target column ``y``), consecutive slices of sklearn's diabetes table."""
    from sklearn.datasets import load_diabetes

    frame = load_diabetes(as_frame=True).frame.rename(columns={"target": "y"})
    if sum(sizes) > len(frame):
        raise SystemExit(f"sizes {sizes} need {sum(sizes)} rows; the table has {len(frame)}")
    out, start = [], 0
    for i, n in enumerate(sizes):
        path = folder / f"site{i}" / "data.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.iloc[start : start + n].to_csv(path, index=False)
        start += n
        out.append(path)
    return out


def deploy_command(
    work: Path,
    files: list[Path],
    overrides: list[str],
    *,
    host: str | None = None,
    prefixes: list[list[str]] = (),
    auth: bool = True,
) -> list[str]:
    """``python -m federated.launch.deploy`` for per-site CSVs, with TLS (and auth); beyond loopback when ``host`` is given."""
    cmd = [sys.executable, "-m", "federated.launch.deploy", "--work-dir", str(work), "--site-target", "y", "--tls"]
    cmd += ["--auth"] if auth else []
    cmd += [f"--site-data={f}" for f in files]
    if host is not None:
        cmd += ["--superlink-host", host, *(f"--site-prefix={shlex.join(p)}" for p in prefixes)]
    return [*cmd, *overrides]


def _run(cmd: list[str], work: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.monotonic()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    wall = time.monotonic() - t0
    if done.returncode != 0:
        raise SystemExit(f"deploy failed ({done.returncode}):\n{done.stderr[-4000:]}")
    record = json.loads((work / "result" / "regressor.json").read_text())
    deployment = json.loads(done.stdout)["deployment"]  # what the deploy command printed
    return {
        "wall_s": round(wall, 2),
        "deploy_s": round(deployment["seconds"], 2),
        "server_s": round(record["server_seconds"], 2),  # the ServerApp: schema agreement, rounds, evaluation
        "outside_rounds_s": round(deployment["seconds"] - sum(record["seconds_per_round"]), 2),
        "seconds_per_round": [round(s, 3) for s in record["seconds_per_round"]],
        "rounds": record["completed_rounds"],
        "clients_trained": [h["clients_trained"] for h in record["history"]],
        "superlink_address": deployment["superlink_address"],
        "tls": deployment["tls"],
        "supernode_auth": deployment["supernode_auth"],
        "last_val_r2": record["history"][-1].get("val_r2"),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the namespace deployment (and, with ``--loopback``, the same on loopback), print one JSON line per run."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=f"config overrides (default {' '.join(TINY)})")
    p.add_argument("--site-data", action="append", metavar="FILE", help="a site's CSV with target y (repeat)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each kind, interleaved (default 1)")
    p.add_argument("--loopback", action="store_true", help="also run the same deployment on loopback (A/B)")
    p.add_argument("--no-auth", action="store_true", help="TLS only, no SuperNode authentication")
    p.add_argument("--print-command", action="store_true", help="print the deploy command lines")
    p.add_argument("--keep", metavar="DIR", help="keep the runs' work folders (logs, certificates, records) in DIR")
    args = p.parse_args(argv)
    overrides = args.overrides or TINY
    with tempfile.TemporaryDirectory(prefix="deploy-netns-") as scratch:
        tmp = args.keep or scratch
        files = [Path(f).resolve() for f in args.site_data] if args.site_data else write_sites(Path(tmp) / "sites")
        for r in range(args.repeats):
            kinds = ["netns", "loopback"] if args.loopback else ["netns"]
            for kind in kinds if r % 2 == 0 else kinds[::-1]:
                work = Path(tmp) / f"{kind}-{r}"
                if kind == "loopback":
                    cmd = deploy_command(work, files, overrides, auth=not args.no_auth)
                    figures = _run(cmd, work)
                else:
                    with SiteNetwork(len(files)) as net:
                        prefixes = [net.prefix(i) for i in range(len(files))]
                        cmd = deploy_command(
                            work, files, overrides, host=net.host_address, prefixes=prefixes, auth=not args.no_auth
                        )
                        before = [net.link_bytes(i) for i in range(len(files))]
                        figures = _run(cmd, work)
                        after = [net.link_bytes(i) for i in range(len(files))]
                        figures["veth_bytes"] = [
                            {k: a[k] - b[k] for k in ("rx", "tx")} for a, b in zip(after, before, strict=True)
                        ]
                if args.print_command:
                    print(shlex.join(cmd), file=sys.stderr)
                print(json.dumps({"kind": kind, "repeat": r, **figures}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
