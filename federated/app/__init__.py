"""The Flower app: what ``flwr run`` loads (components, ServerApp, ClientApp) and what they stand on.

Task (data and model per client), strategies, partitioners, checkpoints, per-client privacy ledgers,
SecAgg+, user-level DP and the site schema. It imports nothing from :mod:`federated.launch`.
"""
