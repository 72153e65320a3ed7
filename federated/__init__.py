"""Federated training with Flower: ``app/`` (what ``flwr run`` loads), ``launch/`` (how it is started), ``patches/``
(Flower internals). See README.md."""
