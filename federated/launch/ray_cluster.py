"""Where the simulation's clients run: a private Ray of this process, or an existing Ray cluster.

Flower's simulation engine is Ray: ``flwr-simulation`` (started by the SuperLink) calls ``ray.init()``
and runs every ClientApp in a pool of Ray actors sized by the cluster's resources and the resources
each client reserves (``client-resources-num-cpus`` / ``-num-gpus`` of the federation config). With
``federated.ray_address`` empty, ``ray.init()`` starts a private Ray node inside that process, with its
session folder in the run's work folder, and it ends with the run. With ``federated.ray_address =
"HOST:PORT"`` the SuperLink and everything it starts get ``RAY_ADDRESS`` in their environment, so
``ray.init()`` joins that running cluster as one more driver (a job): the actors spread over its
nodes, and when the run ends the job's actors end with it while the cluster, which this run did not
start, keeps running (:mod:`federated.launch.processes` stops only the processes it started and the
processes carrying the run's own markers; a cluster's GCS, raylets and agents carry none of them).

On a cluster of several hosts every node must be able to import this project (the same
environment, at the same path, as Flower's docs require for multi-node simulations) and read
the run's work folder and run directory (a shared filesystem: ``TMPDIR`` and ``--out`` on it).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from auditml_core.config import Config
from auditml_core.errors import ConfigError

CONNECT_TIMEOUT_S = 5.0  # how long the cluster's GCS port gets to accept a connection before the run is refused


@dataclass(frozen=True)
class RayPlacement:
    """The Ray the simulation uses and what each client reserves in it."""

    address: str = ""  # HOST:PORT of a running cluster's GCS; "" = a private Ray started by the simulation
    client_cpus: int = 1  # CPUs reserved per client (Flower's default, 2, runs one client at a time on 2 cores)
    client_gpus: float = 0.0  # GPUs reserved per client (a fraction shares one GPU between clients)

    @classmethod
    def from_config(cls, cfg: Config) -> "RayPlacement":
        f = cfg.federated
        return cls(address=f.ray_address.strip(), client_cpus=f.client_cpus, client_gpus=f.client_gpus)

    @property
    def existing(self) -> bool:
        """Whether the clients run on a cluster this run did not start (and must leave running)."""
        return bool(self.address)

    def federation_config(self, n_supernodes: int) -> str:
        """``flwr run --federation-config``: the simulated SuperNodes and each client's reserved resources."""
        return (
            f"num-supernodes={n_supernodes} client-resources-num-cpus={self.client_cpus} "
            f"client-resources-num-gpus={self.client_gpus:g}"
        )

    def environment(self) -> dict[str, str]:
        """Environment for the SuperLink and its children: ``RAY_ADDRESS`` for an existing cluster, else nothing."""
        return {"RAY_ADDRESS": self.address} if self.existing else {}

    def check_reachable(self) -> None:
        """Refuse, before any process starts, an address where no cluster answers.

        Raises
        ------
        ConfigError
            Naming the address and the fix.
        """
        if not self.existing:
            return
        host, _, port = self.address.rpartition(":")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):
                return
        except OSError as exc:
            raise ConfigError(
                f"federated.ray_address={self.address!r}: no Ray cluster answers there ({exc.strerror or exc}); "
                "start one (ray start --head --port PORT) or leave federated.ray_address empty for a private Ray"
            ) from None
