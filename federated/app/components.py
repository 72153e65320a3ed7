"""The Flower components ``pyproject.toml`` names: thin handlers that import the real apps on first use.

Flower's simulation process loads the ServerApp and then the ClientApp (to check that it loads) under one
import lock, and only then starts Ray (``flwr.supercore.object_ref.load_app``,
``flwr.server.superlink.fleet.vce.vce_api.start_vce``). :mod:`federated.app.server_app` and
:mod:`federated.app.client_app` import torch (~1 s warm on 2 cores): loaded there, they held Ray's start
back by that much, and every simulated client waited for it (issue 12). Loading these components costs
Flower's import only. The server imports :mod:`federated.app.server_app` when its ``main`` starts (in a
simulation: while Ray starts, in the process's other thread); each client imports
:mod:`federated.app.client_app` with its first message, as it did before. The handlers are the real apps'
handlers, with the same mods: only the moment of the import moves (``tests/federated/test_import_cost.py``
checks that loading them imports no torch).
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from federated.patches import fast_poll

server = ServerApp()
client = ClientApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    """:func:`federated.app.server_app.main`."""
    fast_poll.patch_simulation_pickup()  # a simulation: before its engine starts its message thread (after Ray's start)
    from federated.app.server_app import main as server_main  # torch: after Flower's import lock, while Ray starts

    server_main(grid, context)


def secagg_mod(msg: Message, ctxt: Context, call_next) -> Message:
    """:func:`federated.app.secagg_client.secagg_mod` (the client's SecAgg+ gate on ``train``)."""
    from federated.app.secagg_client import secagg_mod as gate

    return gate(msg, ctxt, call_next)


@client.query("schema")  # per-site mode: the server's question before training (federated/app/site.py)
def schema(msg: Message, context: Context) -> Message:
    """:func:`federated.app.client_app.schema`."""
    from federated.app.client_app import schema as handler

    return handler(msg, context)


@client.train(mods=[secagg_mod])  # SecAgg+ only when federated.secure_aggregation=true (federated/app/secagg.py)
def train(msg: Message, context: Context) -> Message:
    """:func:`federated.app.client_app.train`."""
    from federated.app.client_app import train as handler

    return handler(msg, context)


@client.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """:func:`federated.app.client_app.evaluate`."""
    from federated.app.client_app import evaluate as handler

    return handler(msg, context)
