"""Benchmark: per-round wall time of a loopback deployment against its clients' training time. Prints figures.

Usage (from the repo root)::

    python scripts/bench_deploy_rounds.py                       # regressor, 3 sites, 6 rounds
    python scripts/bench_deploy_rounds.py --model cnn --rounds 5 cnn.channels=[8]
    python scripts/bench_deploy_rounds.py --code-root /tmp/old --code-root . --repeats 3   # interleaved A/B

Each run is ``python -m federated.launch.deploy`` (one SuperLink, one SuperNode and one long-lived
ClientApp process per site, loopback) started from ``--code-root`` (a checkout of this
repository; several are run in turn, ``--repeats`` times, so that A/B runs share the machine's
load). Per round it prints the server's wall time of the round (``seconds_per_round`` in the
record: from the end of one round's evaluation to the end of the next), the slowest client's
time in its train handler (``client_rounds[].trained[].seconds``: model build, ledger, training)
and their difference, the round overhead; and the CPU seconds all of the run's processes used in
the round (SuperLink, ServerApp, SuperNodes, ClientApp processes: sampled from /proc every 0.25 s,
so a figure that depends far less on the machine's load than wall time does). Round 1 also pays each client's one-off task load
(config and data), so the summary is over rounds 2 and later. The load average is printed
with every run: on a shared machine the figures are only comparable within one interleaved set.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def round_figures(record: dict, cpu: list[tuple[float, float]] | None = None) -> list[dict]:
    """Per round: wall seconds, the slowest client's train-handler seconds, the overhead (their difference)
    and, given ``cpu`` samples ``(unix time, CPU seconds so far)``, the CPU seconds used in the round."""
    out = []
    end = float(record["first_round_started_unix"])
    for wall, clients in zip(record["seconds_per_round"], record["client_rounds"]):
        train = max((float(c["seconds"]) for c in clients["trained"]), default=0.0)
        row = {"round": clients["round"], "wall_s": wall, "train_s": train, "overhead_s": wall - train}
        if cpu:
            row["cpu_s"] = _cpu_at(cpu, end + wall) - _cpu_at(cpu, end)
        end += wall
        out.append(row)
    return out


def _cpu_at(samples: list[tuple[float, float]], t: float) -> float:
    """CPU seconds at time ``t``, interpolated linearly between samples."""
    for (t0, c0), (t1, c1) in zip(samples, samples[1:]):
        if t0 <= t <= t1:
            return c0 + (c1 - c0) * (t - t0) / max(t1 - t0, 1e-9)
    return samples[-1][1] if t > samples[-1][0] else samples[0][1]


class TreeCpu:
    """CPU seconds (user + system) used by a process and all its descendants, sampled every ``interval_s``.

    A process that exits keeps the last CPU time seen for it, so the total never goes down.
    """

    def __init__(self, root_pid: int, interval_s: float = 0.25):
        self.root_pid, self.interval_s = root_pid, interval_s
        self.samples: list[tuple[float, float]] = []
        self._seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._tick = os.sysconf("SC_CLK_TCK")

    def _sample(self) -> None:
        parents: dict[int, int] = {}
        cpu: dict[int, float] = {}
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(proc.name)] = int(fields[1])
            cpu[int(proc.name)] = (int(fields[11]) + int(fields[12])) / self._tick
        tree, frontier = {self.root_pid}, [self.root_pid]
        children: dict[int, list[int]] = {}
        for pid, ppid in parents.items():
            children.setdefault(ppid, []).append(pid)
        while frontier:
            for child in children.get(frontier.pop(), []):
                if child not in tree:
                    tree.add(child)
                    frontier.append(child)
        for pid in tree:
            if pid in cpu:
                self._seen[pid] = max(self._seen.get(pid, 0.0), cpu[pid])
        self.samples.append((time.time(), sum(self._seen.values())))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "TreeCpu":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _leftovers(marker: str) -> list[str]:
    """Command lines of processes still running that mention ``marker`` (the run's work folder)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            env = (proc / "environ").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if marker in cmd or marker in env:
            found.append(f"{proc.name}: {cmd[:120]}")
    return found


def run_once(code_root: Path, work: Path, args: argparse.Namespace) -> tuple[dict, list[tuple[float, float]]]:
    """One deployment from ``code_root``: its record and CPU samples; raises with the deploy's output."""
    cmd = [
        sys.executable,
        "-m",
        "federated.launch.deploy",
        "--n-supernodes",
        str(args.n_supernodes),
        "--model",
        args.model,
        "--work-dir",
        str(work),
        f"federated.rounds={args.rounds}",
        *args.overrides,
    ]
    env = {**os.environ, "PYTHONPATH": str(code_root)}
    with (
        subprocess.Popen(
            cmd, cwd=code_root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        ) as proc,
        TreeCpu(proc.pid) as cpu,
    ):
        out, err = proc.communicate(timeout=args.timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"deploy from {code_root} exited {proc.returncode}:\n{out[-2000:]}{err[-3000:]}")
    return json.loads((work / "result" / f"{args.model}.json").read_text()), cpu.samples


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="pipeline config overrides")
    p.add_argument("--model", default="regressor")
    p.add_argument("--n-supernodes", type=int, default=3)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--repeats", type=int, default=1, help="runs per code root, interleaved")
    p.add_argument(
        "--code-root",
        action="append",
        type=Path,
        help="checkout to run (repeat for interleaved A/B; default this repository)",
    )
    p.add_argument("--work-root", type=Path, help="where the runs' folders go (default a temporary folder)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before a run is abandoned")
    args = p.parse_args()
    roots = [r.resolve() for r in (args.code_root or [REPO_ROOT])]
    work_root = args.work_root or Path(tempfile.mkdtemp(prefix="bench-deploy-"))
    summary: dict[str, list[dict]] = {str(r): [] for r in roots}
    for rep in range(args.repeats):
        for k, root in enumerate(roots):
            work = work_root / f"run-{rep}-{k}"
            load0, t0 = os.getloadavg()[0], time.time()
            record, cpu = run_once(root, work, args)
            rows = round_figures(record, cpu)
            print(f"\n{root} (repeat {rep + 1}/{args.repeats}, {time.time() - t0:.1f} s in all)")
            print(f"  load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end")
            print("  round   wall_s  train_s  overhead_s  cpu_s (all processes)")
            for r in rows:
                print(
                    f"  {r['round']:5d} {r['wall_s']:8.3f} {r['train_s']:8.3f} {r['overhead_s']:11.3f} {r['cpu_s']:6.2f}"
                )
            (work / "bench_rounds.json").write_text(json.dumps({"code_root": str(root), "rounds": rows}, indent=1))
            later = rows[1:]
            if later:
                summary[str(root)].extend(later)
                print(
                    f"  rounds 2-{len(rows)}: overhead median {statistics.median(r['overhead_s'] for r in later):.3f} s, "
                    f"max {max(r['overhead_s'] for r in later):.3f} s; "
                    f"CPU per round median {statistics.median(r['cpu_s'] for r in later):.2f} s"
                )
            left = _leftovers(str(work))
            if left:
                print(f"  WARNING: {len(left)} process(es) of this run still running:", *left, sep="\n    ")
    print("\nall runs, rounds 2 and later:")
    for root, later in summary.items():
        if later:
            overhead, cpu_s = [r["overhead_s"] for r in later], [r["cpu_s"] for r in later]
            print(
                f"  {root}: n={len(later)} overhead median {statistics.median(overhead):.3f} s "
                f"(min {min(overhead):.3f}, max {max(overhead):.3f}); CPU per round median "
                f"{statistics.median(cpu_s):.2f} s (min {min(cpu_s):.2f}, max {max(cpu_s):.2f})"
            )


if __name__ == "__main__":
    main()
