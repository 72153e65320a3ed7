"""What ``python -m pipeline serve`` records about each request: Prometheus metrics and one access-log line.

The access log is one JSON object per line on stderr (request id, endpoint, model and its
weights' SHA-256, rows, status, latency): never a body, a query string or any header but the
request id, so no input value reaches a log.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import traceback
import uuid
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, multiprocess

from pipeline.serve_inputs import JSON

log = logging.getLogger(__name__)
access_log = logging.getLogger("pipeline.serve.access")

REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")  # a client's X-Request-ID is kept only if it looks like an id
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """Prometheus metrics of one process (or, with ``PROMETHEUS_MULTIPROC_DIR``, of every worker together)."""

    def __init__(self, *, several_processes: bool):
        disable_created_metrics()  # no *_created series: they double the text and no dashboard reads them
        own = CollectorRegistry()
        self.requests = Counter(
            "serve_requests",
            "HTTP requests by endpoint, model and status",
            ["endpoint", "model", "status"],
            registry=own,
        )
        self.latency = Histogram(
            "serve_request_seconds", "request latency (s)", ["endpoint", "model"], buckets=LATENCY_BUCKETS, registry=own
        )
        self.rows = Counter(
            "serve_rows", "rows (or images) predicted or explained", ["endpoint", "model"], registry=own
        )
        self.errors = Counter(
            "serve_errors", "refused or failed requests by status", ["endpoint", "status"], registry=own
        )
        if several_processes:  # every worker writes its values under PROMETHEUS_MULTIPROC_DIR; this sums them
            self.registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(self.registry)
        else:
            self.registry = own

    def observe(self, *, endpoint: str, model: str, status: int, seconds: float, rows: int) -> None:
        self.requests.labels(endpoint, model, str(status)).inc()
        self.latency.labels(endpoint, model).observe(seconds)
        if rows:
            self.rows.labels(endpoint, model).inc(rows)
        if status >= 400:
            self.errors.labels(endpoint, str(status)).inc()


class Observe:
    """ASGI middleware: a request id, one structured access-log line and the metrics for every HTTP request.

    The log line holds the request id, endpoint, model and its weights' hash, rows, status and
    latency: never a header value other than the id, never a body, never a query string.
    """

    def __init__(self, app: Any, *, metrics: Metrics, hashes: dict[str, str]):
        self.app, self.metrics, self.hashes = app, metrics, hashes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), "")
        rid = given if REQUEST_ID.match(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state.update(request_id=rid, model="-", rows=0)
        status, started = 500, False

        async def send_with_id(message: dict) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:  # a bug, not bad input: answer 500 here, so no traceback quoting inputs is logged
            where = "".join(traceback.format_tb(exc.__traceback__)[-3:]).replace("\n", " | ")
            log.error("internal error %s in request %s at: %s", type(exc).__name__, rid, where)
            if not started:
                body = json.dumps(
                    {"error": f"internal error ({type(exc).__name__}); report request id {rid}", "request_id": rid}
                )
                await send_with_id(
                    {"type": "http.response.start", "status": 500, "headers": [(b"content-type", JSON.encode())]}
                )
                await send({"type": "http.response.body", "body": body.encode()})
        finally:
            seconds = time.perf_counter() - t0
            model = state["model"]
            endpoint = getattr(scope.get("route"), "path", "other")  # the route's template, never the raw path
            self.metrics.observe(endpoint=endpoint, model=model, status=status, seconds=seconds, rows=state["rows"])
            line = {
                "event": "request",
                "request_id": rid,
                "method": scope.get("method", ""),
                "endpoint": endpoint,
                "model": model,
                "model_sha256": self.hashes.get(model, ""),
                "rows": state["rows"],
                "status": status,
                "latency_ms": round(seconds * 1000, 3),
            }
            access_log.info(json.dumps(line, separators=(",", ":")))


def setup_access_log() -> None:
    if not access_log.handlers:  # one line of JSON per request on stderr, whatever the root logger does
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access_log.addHandler(handler)
        access_log.setLevel(logging.INFO)
        access_log.propagate = False
