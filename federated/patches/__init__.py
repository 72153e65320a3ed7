"""Every patch of Flower's internals, in one place (imported by the app and the launchers, importing neither).

:mod:`.fast_poll` shortens Flower's poll intervals and heartbeats. It depends on private Flower calls of the
pinned version (see federated/README.md); drop it when Flower ships the equivalent. The long-lived ClientApp
worker, the other place that calls a private Flower RPC, is a launcher (:mod:`federated.launch.clientapp_worker`).
"""
