"""A long-lived ClientApp process for a SuperNode started with ``--isolation process``.

With Flower 1.42's default ``--isolation subprocess`` the SuperNode starts ``flower-superexec``,
which starts a fresh ``flwr-clientapp`` process for every message: each one re-imports torch,
opacus and the pipeline and rebuilds the task (4-20 s per message here, more than a small
model's training). Flower 1.42 keeps no ClientApp process alive between messages outside
Kubernetes (its warm executor pools), so this module is the equivalent for a site: one process
per SuperNode that imports everything once, then loops like ``flower-superexec`` does
(``AcquireTask`` on the SuperNode's Runtime API) and runs each ClientApp task in-process, as
``flwr-clientapp`` would (pull the message and context, run the app, push the reply and the
updated context). The task (config and data) is cached per process by
:func:`federated.app.task.task_for`.

The ClientApp run is the one of the pipeline installed at the site (this repository), after
checking that the submitted app's FAB id and version are its own (Flower's own check when an
app directory is given); a mismatch fails the task with a message naming both.

Usage (what :mod:`federated.launch.deploy` starts next to each SuperNode)::

    flower-supernode --isolation process --port 9094 ...
    python -m federated.launch.clientapp_worker --runtime-api-address 127.0.0.1:9094 --insecure --parent-pid <supernode>
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
import time
from pathlib import Path
from typing import Sequence

import federated.app.client_app  # noqa: F401  torch, opacus, the pipeline: imported once, before any task
from federated.patches import fast_poll, flower_api

log = logging.getLogger("federated.launch.clientapp_worker")
REPO_ROOT = Path(__file__).resolve().parents[2]  # the app directory (pyproject.toml with [tool.flwr.app])
# Seconds between two AcquireTask polls; flower-superexec's default is 1 s, which a round pays once per message.
POLL_INTERVAL_S = 0.05
IDLE_POLL_S = 1.0  # the poll interval an idle worker backs off to (flower-superexec's own)
PARENT_CHECK_S = 0.2  # how often the worker checks that its SuperNode still runs
EXIT_PARENT_GONE = 3  # exit code of a worker whose SuperNode is gone


def _client(
    address: str, *, insecure: bool, certificates: bytes | None, token: str | None = None, secret: bytes | None = None
):
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
        SuperExecAuthHttpInterceptor,
    )
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    interceptors = [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp" if token else "SuperExec")]
    if token:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    if secret:  # AcquireTask signed with the SuperNode's shared secret, as flower-superexec signs it
        interceptors.append(
            SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods={"/flwr.proto.Runtime/AcquireTask"})
        )
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=insecure,
        root_certificates=certificates,
        interceptors=interceptors,
        retry_invoker=make_simple_http_retry_invoker(),
    )


def run_task(address: str, token: str, *, insecure: bool, certificates: bytes | None, load_app) -> bool:
    """Run one ClientApp task in this process, as ``flwr-clientapp --token`` would; True when it completed."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.clientapp.client_app import LoadClientAppError
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    client = _client(address, insecure=insecure, certificates=certificates, token=token)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    message = context = reply = None
    status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
    marks = [("start", time.perf_counter())]
    try:
        heartbeat.start()
        message, context, run, _fab = pull_task_input(client)
        marks.append(("pull", time.perf_counter()))
        reply = load_app(run.fab_id, run.fab_version)(message=message, context=context)
        marks.append(("app", time.perf_counter()))
        status, details = SubStatus.COMPLETED, ""
    except Exception as exc:  # the task fails, the worker goes on (as Flower's per-task process would end)
        code = (
            ErrorCode.LOAD_CLIENT_APP_EXCEPTION
            if isinstance(exc, LoadClientAppError)
            else ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        )
        reason = f"{type(exc)}:<'{exc}'>"
        log.error("ClientApp raised an exception", exc_info=exc)
        details = reason
        if message is not None:
            reply = Message(Error(code=code, reason=reason), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
            marks.append(("push", time.perf_counter()))
            push_task_output(client=client, context=context, sub_status=status, details=details)
            marks.append(("output", time.perf_counter()))
        finally:
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()
            marks.append(("closed", time.perf_counter()))
            log.info("task phases (s): %s", {b[0]: round(b[1] - a[1], 3) for a, b in zip(marks, marks[1:])})
    return status == SubStatus.COMPLETED


def _app_loader():
    """``(fab_id, fab_version) -> ClientApp`` of this repository, refusing another app (loaded once)."""
    from flwr.clientapp.utils import get_load_client_app_fn

    load = get_load_client_app_fn(default_app_ref="", app_path=str(REPO_ROOT), multi_app=True)
    cache: dict[tuple[str, str], object] = {}

    def loader(fab_id: str, fab_version: str):
        key = (fab_id, fab_version)
        if key not in cache:
            cache[key] = load(fab_id, fab_version, "")
        return cache[key]

    return loader


def _start_ticks(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot, ``/proc``), or None when it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


def watch_parent(parent_pid: int, *, interval_s: float = PARENT_CHECK_S) -> threading.Thread:
    """End this process as soon as ``parent_pid`` (its SuperNode) is gone: this worker's own check.

    Beside the parent-death signal its launcher sets (``PR_SET_PDEATHSIG``, where the SuperNode is its
    parent), every ``interval_s`` s: re-parented (the parent died), or ``parent_pid`` gone, a zombie or
    another process under a reused id. Flower's own monitor (``start_parent_process_monitor``) counts a
    zombie as alive and only raises SIGINT, which a retrying call can swallow: this exits with ``os._exit``.
    """
    child = os.getppid() == parent_pid
    started = _start_ticks(parent_pid)

    def gone() -> bool:
        if child:
            return os.getppid() != parent_pid
        return started is None or _start_ticks(parent_pid) != started

    def loop() -> None:
        while not gone():
            time.sleep(interval_s)
        log.error("the SuperNode (pid %d) is gone: this ClientApp worker exits with it", parent_pid)
        logging.shutdown()
        os._exit(EXIT_PARENT_GONE)

    thread = threading.Thread(target=loop, name="parent-watch", daemon=True)
    thread.start()
    return thread


def serve(
    address: str,
    *,
    insecure: bool,
    certificates: bytes | None,
    poll_interval_s: float = POLL_INTERVAL_S,
    max_tasks: int | None = None,
    secret: bytes | None = None,
) -> None:
    """Poll the SuperNode's Runtime API for ClientApp tasks and run them here until stopped."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore.constant import TaskType

    # The worker can acquire a task before its SuperNode holds all of the message's objects: retry after
    # 0.05 s, not Flower's 1 s (fast_poll.patch_object_pulls; Flower's own pull_task_input then uses it).
    fast_poll.patch_object_pulls()
    load_app = _app_loader()
    client = _client(address, insecure=insecure, certificates=certificates, secret=secret)
    done, last_task = 0, time.monotonic()
    log.info("serving the ClientApp tasks of the SuperNode at %s", address)
    try:
        while max_tasks is None or done < max_tasks:
            res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value]))
            if res.HasField("task") and res.token:
                t0 = time.perf_counter()
                ok = run_task(address, res.token, insecure=insecure, certificates=certificates, load_app=load_app)
                log.info("task %d %s in %.2f s", res.task.task_id, "done" if ok else "failed", time.perf_counter() - t0)
                done, last_task = done + 1, time.monotonic()
                continue
            # Short polls right after a task (the next message of the run follows soon), backing off to
            # flower-superexec's 1 s while the site idles (fast_poll.backoff_interval).
            idle = time.monotonic() - last_task
            time.sleep(fast_poll.backoff_interval(idle, fast_s=poll_interval_s, slow_s=IDLE_POLL_S))
    finally:
        client.close()


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point."""
    p = argparse.ArgumentParser(
        prog="python -m federated.launch.clientapp_worker", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API (its --port)")
    p.add_argument("--insecure", action="store_true", help="plain HTTP to the Runtime API (loopback only)")
    p.add_argument("--root-certificates", help="CA of the Runtime API's TLS certificate")
    p.add_argument("--parent-pid", type=int, help="exit when this process (the SuperNode) exits")
    p.add_argument(
        "--superexec-auth-secret-file",
        help="the SuperNode's --superexec-auth-secret-file: only holders of the secret may take its tasks",
    )
    p.add_argument("--poll-interval", type=float, default=POLL_INTERVAL_S, help="seconds between task polls")
    args = p.parse_args(argv)
    why = flower_api.unsupported(flower_api.WORKER_CALLS)
    if why is not None:  # the launchers fall back to --isolation subprocess instead of starting this
        raise SystemExit(
            f"error: the ClientApp worker cannot run on this Flower ({why}); start the SuperNode with "
            "--isolation subprocess"
        )
    # force: opacus calls logging.basicConfig (WARNING) when imported, which silenced this worker's INFO lines
    # (its per-task phase timings) until now.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    if args.parent_pid is not None:
        watch_parent(args.parent_pid)
    certificates = Path(args.root_certificates).read_bytes() if args.root_certificates else None
    serve(
        args.runtime_api_address,
        insecure=args.insecure or certificates is None,
        certificates=certificates,
        poll_interval_s=args.poll_interval,
        secret=Path(args.superexec_auth_secret_file).read_bytes() if args.superexec_auth_secret_file else None,
    )


if __name__ == "__main__":
    main()
