"""Benchmark: the pipeline's federated train stage against the floor of a minimal Flower 1.42 app. Prints figures.

Usage (from the repo root)::

    python scripts/bench_flower_floor.py --repeats 3
    python scripts/bench_flower_floor.py --repeats 3 --torch-floor
    python scripts/bench_flower_floor.py --repeats 2 --rounds 3 --n-clients 5 federated.partitioner=iid

Runs, interleaved (A, B, A, B, ...):

A. the floor: a minimal Flower app written into a temp folder (a ClientApp whose train handler returns
   the arrays it received with a ``num-examples`` metric; a ServerApp running Flower's own
   ``flwr.serverapp.strategy.FedAvg`` over numpy arrays of the CNN's state-dict shapes), launched
   through the pipeline's own launch path (:func:`federated.launch.simulation.run_simulation`: private
   FLWR_HOME and port, own SuperLink, ``client-resources-num-cpus=1``) with Flower and Ray as they come
   (``fast_start=False``: none of the start-up tuning B gets). Its ServerApp writes ``time.time()`` at
   import, at ``main``, and after each round's (server-side) evaluation.
A'. with ``--torch-floor``: the same minimal app whose clients import torch and take one Adam step on the
   arrays (what any client that trains a torch model pays on its first message: torch, and torch._dynamo,
   which ``torch.optim.Optimizer.step`` imports on every step, eager mode included).
A''. with ``--fast-floor``: the minimal app with the launch path's start-up tuning (``fast_start=True``:
   Ray's pre-started workers serve the clients, SuperExec polls every 0.1 s; not the shorter message polls,
   which live in our ServerApp, ``federated/patches/fast_poll.py``): what the same tuning buys an app without torch.
B. the pipeline's train stage, federated (``pipeline.train.run``, the path ``python -m pipeline
   train.mode=federated --stages data,train`` takes after the data stage): every model in one federation.
   Times come from each model's federation record (``first_round_started_unix``, ``seconds_per_round``).

"Launch" is the call into the launch path (A: ``run_simulation``; B: the train stage, so B also pays the
Ridge baseline, the model specs, the pre-flight checks and writing each dataset into the work folder).
"First round done" is the end of round 1's server-side evaluation, in both. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from auditml_core import data as core_data  # noqa: E402
from auditml_core import models, seeds  # noqa: E402
from auditml_core.config import load_config  # noqa: E402
from auditml_core.teacher import model_specs  # noqa: E402
from federated.launch import simulation  # noqa: E402
from pipeline import train as train_stage  # noqa: E402

PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "floorapp"
version = "1.0.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["floorapp"]

[tool.flwr.app]
publisher = "bench"

[tool.flwr.app.components]
serverapp = "floorapp.server_app:app"
clientapp = "floorapp.client_app:app"

[tool.flwr.app.config]
num-rounds = 3
n-clients = 5
shapes = "[]"
out = ""
torch = 0
"""

SERVER_APP = """\
import json
import time

IMPORTED = time.time()

import numpy as np
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    times = {"imported": IMPORTED, "main": time.time(), "rounds": {}}
    rc = context.run_config
    out, n = str(rc["out"]), int(rc["n-clients"])
    rng = np.random.default_rng(0)
    arrays = ArrayRecord([rng.standard_normal(s).astype(np.float32) for s in json.loads(str(rc["shapes"]))])

    def evaluate_fn(server_round, round_arrays):
        times["rounds"][str(server_round)] = time.time()
        with open(out, "w") as f:
            json.dump(times, f)
        return MetricRecord({"round": server_round})

    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n)
    strategy.start(grid=grid, initial_arrays=arrays, num_rounds=int(rc["num-rounds"]), evaluate_fn=evaluate_fn)
"""

CLIENT_APP = """\
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    arrays = msg.content["arrays"]
    if int(context.run_config["torch"]):  # the torch floor: one Adam step, what any torch client pays at first
        import torch
        from flwr.app import ArrayRecord

        torch.set_num_threads(1)
        state = arrays.to_torch_state_dict()
        params = [torch.nn.Parameter(v.clone()) for v in state.values()]
        opt = torch.optim.Adam(params, lr=1e-3)
        sum((p**2).sum() for p in params).backward()
        opt.step()
        arrays = ArrayRecord({k: p.detach() for k, p in zip(state, params)})
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 1, "loss": 0.0})})
    return Message(content=content, reply_to=msg)
"""


def run_floor(
    root: Path, shapes: list[list[int]], *, rounds: int, n_clients: int, torch: bool = False, fast_start: bool = False
) -> dict:
    """A: the minimal app through the pipeline's launch path; seconds from launch to each event."""
    work = Path(tempfile.mkdtemp(prefix="floor-", dir=root))
    app = work / "app"
    (app / "floorapp").mkdir(parents=True)
    (app / "pyproject.toml").write_text(PYPROJECT)
    (app / "floorapp" / "__init__.py").write_text("")
    (app / "floorapp" / "server_app.py").write_text(SERVER_APP)
    (app / "floorapp" / "client_app.py").write_text(CLIENT_APP)
    out = work / "times.json"
    rc = work / "run_config.toml"
    rc.write_text(
        f"num-rounds = {rounds}\nn-clients = {n_clients}\nshapes = {json.dumps(json.dumps(shapes))}\nout = {json.dumps(str(out))}\ntorch = {int(torch)}\n"
    )
    t0 = time.time()
    procs = simulation.run_simulation(work, rc, n_supernodes=n_clients, app=app, fast_start=fast_start)
    wall = time.time() - t0
    if not out.is_file():
        raise RuntimeError(f"the minimal app wrote no times:\n{procs.log_tail('flwr-run', 40)}")
    times = json.loads(out.read_text())
    r = {int(k): v for k, v in times["rounds"].items()}
    if max(r) != rounds:
        raise RuntimeError(f"the minimal app ran {max(r)} of {rounds} rounds:\n{procs.log_tail('flwr-run', 40)}")
    return {
        "serverapp_imported": times["imported"] - t0,
        "serverapp_main": times["main"] - t0,
        "round0": r[0] - t0,
        "first_round_done": r[1] - t0,
        "later_rounds": [r[i] - r[i - 1] for i in range(2, rounds + 1)],
        "wall": wall,
    }


def run_ours(cfg, datasets) -> dict:
    """B: the pipeline's train stage (every model, one federation); seconds from the call to each event per model."""
    t0 = time.time()
    trained = train_stage.run(cfg, {"data": datasets}, seed=seeds.stage_seed(cfg.seed, "train")).models
    wall = time.time() - t0
    out: dict = {"wall": wall}
    for name, model in trained.items():
        rec = model.training
        spr = rec["seconds_per_round"]
        out[name] = {
            "server_started": rec["server_started_unix"] - t0,
            "round0": rec["first_round_started_unix"] - t0,
            "first_round_done": rec["first_round_started_unix"] + spr[0] - t0,
            "first_round_seconds": spr[0],
            # Inside the ClientApp's train handler (task load + fit), per client, round 1: the rest of round 1 is
            # Flower's (Ray actors, app loading, messages) and the ClientApp module's import.
            "client_handler_round1": [float(c.get("seconds", 0.0)) for c in rec["client_rounds"][0]["trained"]],
            "later_rounds": spr[1:],
            "finished": rec["finished_unix"] - t0,
        }
    return out


def _ours_processes(root: Path) -> list[int]:
    """Live processes whose environment or command line mentions ``root`` (every Flower/Ray process we started)."""
    found, mark = [], str(root).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if mark in (entry / "environ").read_bytes() or mark in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _fmt(xs: list[float]) -> str:
    if not xs:
        return "-"
    return f"{statistics.median(xs):6.2f} [{min(xs):.2f}-{max(xs):.2f}]"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="pipeline config overrides KEY=VALUE")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--n-clients", type=int, default=5)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--only", choices=["floor", "ours"], help="run one side only (profiling)")
    p.add_argument(
        "--torch-floor",
        action="store_true",
        help="also run A' (interleaved): the minimal app whose clients import torch and take one Adam step",
    )
    p.add_argument(
        "--fast-floor",
        action="store_true",
        help="also run A'' (interleaved): the minimal app with the launch path's start-up tuning (fast_start)",
    )
    p.add_argument("--json", type=Path, help="also write every measurement here")
    args = p.parse_args()
    overrides = [
        "train.mode=federated",
        f"federated.rounds={args.rounds}",
        f"federated.local_epochs={args.local_epochs}",
        f"federated.n_clients={args.n_clients}",
        *args.overrides,
    ]
    cfg = load_config(None, overrides)
    datasets = core_data.prepare(cfg, seed=seeds.stage_seed(cfg.seed, "data"))
    shapes = [list(v.shape) for v in models.build(model_specs(cfg, datasets)["cnn"]).state_dict().values()]
    print(f"uptime before: {os.popen('uptime').read().strip()}", flush=True)
    root = Path(tempfile.mkdtemp(prefix="bff-"))
    tempfile.tempdir = str(root)  # the train stage's work folders too: every process we start mentions root
    floors: list[dict] = []
    ours: list[dict] = []
    torch_floors: list[dict] = []
    fast_floors: list[dict] = []
    # A'' loads federated.launch.ray_start in Flower's simulation process, which sees the environment, not sys.path.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(simulation.launcher.REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    try:
        for i in range(args.repeats):
            if args.only != "ours":
                variants: list[tuple[str, list[dict], dict]] = [("A floor", floors, {})]
                if args.torch_floor:
                    variants.append(("A' torch floor", torch_floors, {"torch": True}))
                if args.fast_floor:
                    variants.append(("A'' fast floor", fast_floors, {"fast_start": True}))
                for label, runs, kwargs in variants:
                    runs.append(run_floor(root, shapes, rounds=args.rounds, n_clients=args.n_clients, **kwargs))
                    print(f"[{i}] {label}: {json.dumps(runs[-1], default=lambda x: round(x, 2))}", flush=True)
            if args.only != "floor":
                ours.append(run_ours(cfg, datasets))
                print(f"[{i}] B ours : {json.dumps(ours[-1], default=lambda x: round(x, 2))}", flush=True)
    finally:
        left = _ours_processes(root)
        print(f"processes left mentioning {root}: {left}")
        shutil.rmtree(root, ignore_errors=True)
    print(f"uptime after: {os.popen('uptime').read().strip()}")
    print(
        f"\n{args.n_clients} clients, {args.rounds} rounds, CNN-sized arrays ({len(shapes)} tensors); "
        "seconds from launch, median [min-max] over repeats"
    )
    rows = []
    if floors:
        rows.append(("floor: ServerApp imported", [f["serverapp_imported"] for f in floors]))
        rows.append(("floor: ServerApp main", [f["serverapp_main"] for f in floors]))
        rows.append(("floor: round 0 (before training)", [f["round0"] for f in floors]))
        rows.append(("floor: first round done", [f["first_round_done"] for f in floors]))
        rows.append(("floor: later round", [x for f in floors for x in f["later_rounds"]]))
    names = [k for k in (ours[0] if ours else {}) if k != "wall"]
    for name in names:
        rows.append((f"ours {name}: server started", [o[name]["server_started"] for o in ours]))
        rows.append((f"ours {name}: round 0 (before training)", [o[name]["round0"] for o in ours]))
        rows.append((f"ours {name}: first round done", [o[name]["first_round_done"] for o in ours]))
        rows.append((f"ours {name}: first round seconds", [o[name]["first_round_seconds"] for o in ours]))
        rows.append(
            (f"ours {name}: round-1 client handler (each)", [x for o in ours for x in o[name]["client_handler_round1"]])
        )
        rows.append((f"ours {name}: later round", [x for o in ours for x in o[name]["later_rounds"]]))
    if ours:
        rows.append(
            ("ours: every model's first round done", [max(o[n]["first_round_done"] for n in names) for o in ours])
        )
        rows.append(("ours: wall (train stage)", [o["wall"] for o in ours]))
    if floors:
        rows.append(("floor: wall", [f["wall"] for f in floors]))
    if torch_floors:
        rows.append(("torch floor: ServerApp main", [f["serverapp_main"] for f in torch_floors]))
        rows.append(("torch floor: first round done", [f["first_round_done"] for f in torch_floors]))
        rows.append(("torch floor: later round", [x for f in torch_floors for x in f["later_rounds"]]))
    if fast_floors:
        rows.append(("fast floor: first round done", [f["first_round_done"] for f in fast_floors]))
        rows.append(("fast floor: later round", [x for f in fast_floors for x in f["later_rounds"]]))
    for label, xs in rows:
        print(f"  {label:44s} {_fmt(xs)}")
    if floors and ours and len(floors) == len(ours):
        # Paired ratios (A_i, B_i ran back to back): the load of the moment cancels more than in the medians.
        pairs = [max(o[n]["first_round_done"] for n in names) / f["first_round_done"] for f, o in zip(floors, ours)]
        print(f"  {'ratio every-model first round / floor':44s} {_fmt(pairs)}  (paired per repeat)")
        for n in names:
            rn = [o[n]["first_round_done"] / f["first_round_done"] for f, o in zip(floors, ours)]
            print(f"  {'ratio ' + n + ' first round / floor':44s} {_fmt(rn)}")
    if torch_floors and ours and len(torch_floors) == len(ours):
        pairs = [
            max(o[n]["first_round_done"] for n in names) / f["first_round_done"] for f, o in zip(torch_floors, ours)
        ]
        print(f"  {'ratio every-model first round / torch floor':44s} {_fmt(pairs)}  (paired per repeat)")
    if fast_floors and ours and len(fast_floors) == len(ours):
        pairs = [
            max(o[n]["first_round_done"] for n in names) / f["first_round_done"] for f, o in zip(fast_floors, ours)
        ]
        print(f"  {'ratio every-model first round / fast floor':44s} {_fmt(pairs)}  (paired per repeat)")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "floor": floors,
                    "torch_floor": torch_floors,
                    "fast_floor": fast_floors,
                    "ours": ours,
                    "overrides": overrides,
                },
                indent=1,
            )
        )
    print(textwrap.dedent(f"  overrides: {overrides}"))


if __name__ == "__main__":
    main()
