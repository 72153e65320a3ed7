"""Federated training with Flower: the ServerApp/ClientApp, strategies, partitioners, launchers (see README.md)."""
