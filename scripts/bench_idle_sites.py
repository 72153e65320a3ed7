"""Benchmark: what N idle sites cost one SuperLink (CPU and requests per second). Prints figures.

Usage (from the repo root)::

    python scripts/bench_idle_sites.py --sites 50                      # our SuperNodes, then stock Flower's
    python scripts/bench_idle_sites.py --sites 50 --variants ours --window 30

Starts one ``flower-superlink`` (loopback, no TLS) and N SuperNodes that join it and then wait for a run
that never comes, as the sites of a federation do between runs. Variant ``ours`` starts each SuperNode
as the per-site command does (``python -m federated.patches.fast_poll supernode``: its poll and heartbeat
patches, in-process; no ClientApp worker, which talks only to its own SuperNode); ``stock`` starts plain
``flower-supernode`` (3 s polls, 30 s heartbeat). After ``--warmup`` seconds (every node connected, start-up
CPU spent) it measures, over ``--window`` seconds: the SuperLink's CPU seconds per second (``/proc``), and
its requests per second by Fleet endpoint, counted in its own access log. Every process is stopped at
the end. The machine's load average is printed with each figure: on a shared machine the SuperLink's
CPU per request is only comparable within one run of this script.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from federated.launch import processes as launcher  # noqa: E402

REQUEST = re.compile(rb'"POST (/v1/fleet/[a-z-]+) HTTP')


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(variant: str, *, sites: int, warmup_s: float, window_s: float) -> dict:
    """Start a SuperLink and ``sites`` idle SuperNodes of ``variant``; return the figures of one window."""
    with tempfile.TemporaryDirectory(prefix="idle-sites-") as tmp:
        work = Path(tmp)
        env = launcher.flower_env(work / "flwr-home")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        port = launcher.free_port()
        with launcher.Processes(work / "logs", env) as procs:
            # Flower hides successful routine requests (polls, heartbeats) from its access log below DEBUG; the
            # SuperLink alone logs at DEBUG so they can be counted (the SuperLink's CPU includes those log lines).
            procs.env["FLWR_LOG_LEVEL"] = "DEBUG"
            superlink = procs.start(
                "superlink",
                [
                    launcher.bin_path("flower-superlink"),
                    "--insecure",
                    "--port",
                    str(port),
                    "--disable-runtime-dependency-installation",
                ],
            )
            launcher.wait_until_healthy(superlink, port, timeout_s=120, what="superlink", logs=procs, name="superlink")
            procs.env.pop("FLWR_LOG_LEVEL")
            node = (
                [sys.executable, "-m", "federated.patches.fast_poll", "supernode"]
                if variant == "ours"
                else [launcher.bin_path("flower-supernode")]
            )
            for i in range(sites):
                procs.start(
                    f"supernode-{i}",
                    [
                        *node,
                        "--insecure",
                        "--superlink",
                        f"127.0.0.1:{port}",
                        "--isolation",
                        "process",  # no ClientApp process: an idle site's SuperLink traffic is its SuperNode's
                        "--port",
                        str(launcher.free_port()),
                        "--node-config",
                        f"partition-id={i} num-partitions={sites}",
                    ],
                )
            log_path = work / "logs" / "superlink.log"
            deadline = time.monotonic() + 300
            while log_path.read_bytes().count(b"/v1/fleet/activate-node") < sites:
                if time.monotonic() > deadline:
                    raise RuntimeError("not every SuperNode connected within 300 s")
                time.sleep(1)
            time.sleep(warmup_s)
            offset, cpu0, t0 = log_path.stat().st_size, _cpu_seconds(superlink.pid), time.monotonic()
            time.sleep(window_s)
            cpu1, t1 = _cpu_seconds(superlink.pid), time.monotonic()
            with log_path.open("rb") as fh:
                fh.seek(offset)
                counts = collections.Counter(m.group(1).decode() for m in REQUEST.finditer(fh.read()))
            load = os.getloadavg()
    seconds = t1 - t0
    total = sum(counts.values())
    return {
        "variant": variant,
        "sites": sites,
        "window_s": round(seconds, 1),
        "superlink_cpu_s_per_s": round((cpu1 - cpu0) / seconds, 4),
        "requests_per_s": round(total / seconds, 2),
        "requests_per_s_per_site": round(total / seconds / sites, 3),
        "superlink_cpu_ms_per_request": round(1000 * (cpu1 - cpu0) / total, 3) if total else None,
        "by_endpoint_per_s": {k: round(v / seconds, 2) for k, v in sorted(counts.items())},
        "load_average": [round(x, 2) for x in load],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sites", type=int, default=50)
    p.add_argument("--variants", nargs="+", choices=["ours", "stock"], default=["ours", "stock"])
    p.add_argument("--warmup", type=float, default=20.0, help="seconds after every node connected")
    p.add_argument("--window", type=float, default=30.0, help="seconds measured")
    args = p.parse_args()
    for variant in args.variants:
        print(json.dumps(measure(variant, sites=args.sites, warmup_s=args.warmup, window_s=args.window)), flush=True)


if __name__ == "__main__":
    main()
