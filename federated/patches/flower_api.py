"""The private Flower calls this project depends on, and the one check that they are still there.

Flower 1.42 has no setting for its poll intervals or heartbeat and no long-lived ClientApp process
outside Kubernetes, so two places reach past its public API:

- :mod:`federated.patches.fast_poll` replaces module attributes of the SuperNode's message loop, the
  heartbeat, the object pulls and the simulation engine (``FAST_POLL_CALLS``);
- :mod:`federated.launch.clientapp_worker` talks to a SuperNode's Runtime API as ``flower-superexec``
  and ``flwr-clientapp`` do, with their private client, interceptors and task helpers (``WORKER_CALLS``).

Both were read against ``CHECKED_FLWR`` (``pyproject.toml`` pins ``flwr>=1.42,<1.43`` to match). On any
other version, or when a call below is missing or has other parameters, each falls back to Flower's stock
behaviour with one warning (:func:`unsupported`). ``tests/federated/test_flower_api.py`` fails, naming every
difference, when the installed Flower no longer has them. What to drop when Flower ships a persistent
ClientApp or poll settings: federated/README.md ("Flower internals").
"""

from __future__ import annotations

import importlib
import inspect
import logging
from dataclasses import dataclass
from typing import Iterable

log = logging.getLogger(__name__)
CHECKED_FLWR = ("1.42.",)  # Flower versions these calls were read against (pyproject.toml pins flwr>=1.42,<1.43)


@dataclass(frozen=True)
class Call:
    """One private name of Flower's: ``module.qualname``, with the parameters we pass or rely on (None: any)."""

    module: str
    qualname: str
    params: tuple[str, ...] | None = None  # parameter names that must exist (by name; order is not relied on)

    def problem(self) -> str | None:
        """What is wrong with this call in the installed Flower, or None."""
        where = f"{self.module}.{self.qualname}"
        try:
            obj = importlib.import_module(self.module)
            for part in self.qualname.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as exc:
            return f"{where} is gone ({type(exc).__name__}: {exc})"
        if self.params is None:
            return None
        try:
            have = set(inspect.signature(obj).parameters)
        except (TypeError, ValueError):
            return f"{where} has no readable signature"
        lacking = [p for p in self.params if p not in have]
        return f"{where} lacks parameter(s) {lacking} (has {sorted(have)})" if lacking else None


FAST_POLL_CALLS = (
    # patch_supernode: the message loop's `time` name and its 3 s sleep; patch_idle_backoff wraps _push_messages
    Call("flwr.supernode.start_client_internal", "time"),
    Call("flwr.supernode.start_client_internal", "_push_messages", ("state", "object_store", "send", "push_object")),
    Call("flwr.supernode.cli", "flower_supernode", ()),
    # patch_heartbeat: the interval read at call time in two modules, and the SuperLink's accepted range
    Call("flwr.supernode.fleet_http_connection", "HEARTBEAT_DEFAULT_INTERVAL"),
    Call("flwr.supercore.heartbeat", "HEARTBEAT_DEFAULT_INTERVAL"),
    Call("flwr.common.constant", "HEARTBEAT_MIN_INTERVAL"),
    Call("flwr.common.constant", "HEARTBEAT_MAX_INTERVAL"),
    # patch_object_pulls: keyword defaults of the two pull functions
    Call(
        "flwr.supercore.inflatable.inflatable_utils",
        "pull_objects",
        ("initial_backoff", "backoff_cap", "max_tries_per_object"),
    ),
    Call(
        "flwr.supercore.inflatable.inflatable_utils",
        "pull_and_inflate_object_from_tree",
        ("initial_backoff", "backoff_cap", "max_tries_per_object"),
    ),
    # patch_simulation_pickup: the engine's queue-filling loop
    Call(
        "flwr.server.superlink.fleet.vce.vce_api",
        "add_messages_to_queue",
        ("state", "queue", "nodes_mapping", "f_stop"),
    ),
)

WORKER_CALLS = (
    Call(
        "flwr.supercore.runtime",
        "RuntimeHttpClient.from_server_address",
        ("server_address", "insecure", "root_certificates", "interceptors", "retry_invoker"),
    ),
    Call("flwr.supercore.runtime", "RuntimeHttpClient.AcquireTask"),
    Call("flwr.supercore.interceptors", "RuntimeVersionHttpInterceptor", ("component_name",)),
    Call("flwr.supercore.interceptors", "RuntimeTokenHttpInterceptor", ("token",)),
    Call("flwr.supercore.interceptors", "SuperExecAuthHttpInterceptor", ("master_secret", "protected_methods")),
    Call("flwr.supercore.retry", "make_simple_http_retry_invoker", ()),
    Call("flwr.supercore.heartbeat", "HeartbeatSender", ("heartbeat_fn",)),
    Call("flwr.supercore.heartbeat", "make_task_heartbeat_fn_http", ("client",)),
    Call("flwr.supernode.runtime.run_clientapp", "pull_task_input", ("client",)),
    Call("flwr.supernode.runtime.run_clientapp", "push_message", ("client", "message", "context")),
    Call("flwr.supernode.runtime.run_clientapp", "push_task_output", ("client", "context", "sub_status", "details")),
    Call("flwr.clientapp.utils", "get_load_client_app_fn", ("default_app_ref", "app_path", "multi_app")),
    Call("flwr.clientapp.client_app", "LoadClientAppError"),
    Call("flwr.proto.runtime_pb2", "AcquireTaskRequest"),
    Call("flwr.supercore.constant", "TaskType.CLIENT_APP"),
    Call("flwr.common.constant", "SubStatus.COMPLETED"),
    Call("flwr.common.constant", "ErrorCode.CLIENT_APP_RAISED_EXCEPTION"),
    Call("flwr.common.constant", "ErrorCode.LOAD_CLIENT_APP_EXCEPTION"),
)


def flower_version() -> str:
    """The installed Flower's version."""
    from importlib import metadata

    return metadata.version("flwr")


def problems(calls: Iterable[Call]) -> list[str]:
    """One line per call of ``calls`` that the installed Flower lacks or changed."""
    return [p for p in (c.problem() for c in calls) if p is not None]


def unsupported(calls: Iterable[Call]) -> str | None:
    """Why ``calls`` cannot be relied on here (an unchecked Flower version or a changed call), or None."""
    version = flower_version()
    if not version.startswith(CHECKED_FLWR):
        return f"flwr {version} is not a version these calls were checked against ({', '.join(CHECKED_FLWR)}x)"
    found = problems(calls)
    return f"flwr {version}: " + "; ".join(found) if found else None


_warned: set[str] = set()


def clientapp_isolation(requested: str) -> str:
    """The SuperNode isolation to use: ``requested``, except that ``"process"`` (our long-lived ClientApp worker,
    :mod:`federated.launch.clientapp_worker`) falls back to Flower's stock ``"subprocess"`` (a fresh ClientApp
    process per message: slower, but public behaviour) when ``WORKER_CALLS`` cannot be relied on; warned once
    per process."""
    if requested != "process":
        return requested
    why = unsupported(WORKER_CALLS)
    if why is None:
        return "process"
    if why not in _warned:
        _warned.add(why)
        log.warning(
            "the long-lived ClientApp worker is off, SuperNodes run Flower's --isolation subprocess "
            "(one ClientApp process per message, slower): %s",
            why,
        )
    return "subprocess"
