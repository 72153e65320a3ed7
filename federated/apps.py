"""The Flower components ``pyproject.toml`` names: thin handlers that import the real apps on first use.

Flower's simulation process loads the ServerApp and then the ClientApp (to check that it loads) under one
import lock, and only then starts Ray (``flwr.supercore.object_ref.load_app``,
``flwr.server.superlink.fleet.vce.vce_api.start_vce``). :mod:`federated.server_app` and
:mod:`federated.client_app` import torch (~1 s warm on 2 cores): loaded there, they held Ray's start
back by that much, and every simulated client waited for it (issue 12). Loading these components costs
Flower's import only. The server imports :mod:`federated.server_app` once Ray has started
(:func:`wait_for_ray_start`); each client imports :mod:`federated.client_app` with its first message,
as it did before. The handlers are the real apps' handlers, with the same mods: only the moment of the
import moves (``tests/federated/test_import_cost.py`` checks that loading them imports no torch).
"""

from __future__ import annotations

import sys
import time

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from federated import fast_poll

server = ServerApp()
client = ClientApp()
RAY_START_WAIT_S = 30.0  # wait at most this long for Ray (then go on regardless); its start took 2-5 s here


@server.main()
def main(grid: Grid, context: Context) -> None:
    """:func:`federated.server_app.main`; in a simulation, once Ray has started (:func:`wait_for_ray_start`)."""
    fast_poll.patch_simulation_pickup()  # before the engine starts its message thread, which is after Ray's start
    wait_for_ray_start(grid)
    from federated.server_app import main as server_main  # torch: after Flower's import lock and Ray's start

    server_main(grid, context)


def wait_for_ray_start(grid: Grid, *, timeout_s: float = RAY_START_WAIT_S) -> None:
    """In a simulation, wait until ``ray.init`` has returned in this process; elsewhere return at once.

    Flower runs the ServerApp in a thread of the process whose main thread starts Ray. Importing torch
    in this thread meanwhile held the GIL that ``ray.init`` needs between its many short waits, and Ray's
    workers came up later. No client can train before they are up; the server's torch import, initial
    weights and round-0 evaluation (~1.2 s) overlap their start instead.
    """
    # Flower's simulation grid (flwr.superlink.grid.InMemoryGrid), by name: importing its module pulls in the
    # SuperLink's database code, which every client would then import too.
    if not any(c.__name__ == "InMemoryGrid" for c in type(grid).__mro__):  # a deployment: no Ray in this process
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ray = sys.modules.get("ray")
        if ray is not None and getattr(ray, "is_initialized", lambda: False)():
            return
        time.sleep(0.05)


def secagg_mod(msg: Message, ctxt: Context, call_next) -> Message:
    """:func:`federated.secagg.secagg_mod` (the client's SecAgg+ gate on ``train``)."""
    from federated.secagg import secagg_mod as gate

    return gate(msg, ctxt, call_next)


@client.query("schema")  # per-site mode: the server's question before training (federated/site.py)
def schema(msg: Message, context: Context) -> Message:
    """:func:`federated.client_app.schema`."""
    from federated.client_app import schema as handler

    return handler(msg, context)


@client.train(mods=[secagg_mod])  # SecAgg+ only when federated.secure_aggregation=true (federated/secagg.py)
def train(msg: Message, context: Context) -> Message:
    """:func:`federated.client_app.train`."""
    from federated.client_app import train as handler

    return handler(msg, context)


@client.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """:func:`federated.client_app.evaluate`."""
    from federated.client_app import evaluate as handler

    return handler(msg, context)
