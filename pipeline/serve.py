"""``python -m pipeline serve RUN``: the run's models behind HTTP (FastAPI + uvicorn), read-only.

Start-up verifies the run exactly as ``predict`` does (incomplete or edited run: exit 2) and
loads the models once; the application is :func:`pipeline.serve_app.create_app`. With
``--workers N`` uvicorn spawns N processes that each build it through :func:`app_from_env`
(the settings travel in an environment variable, and a worker refuses a run whose manifest
differs from the one the parent verified). SIGTERM stops accepting connections and lets
in-flight requests finish. Nothing is written in the run directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import uvicorn

from auditml_core import models
from auditml_core.errors import ConfigError, RunDirError, UserError
from federated.launch import processes, tls, watchdog
from pipeline import predict_model
from pipeline.serve_app import ServeSettings, create_app, load_models, read_key

log = logging.getLogger(__name__)

SETTINGS_ENV = "AUDITML_SERVE_SETTINGS"  # JSON of ServeSettings, for the worker processes
PARENT_ENV = "AUDITML_SERVE_PARENT"  # the supervisor's pid: a worker started after it died exits at once
GRACEFUL_SHUTDOWN_S = 30  # in-flight requests get this long to finish after SIGTERM
WORKER_FAILED = "worker-failed"  # written in the workers' scratch folder by a worker that cannot load the run
METRICS_PREFIX = "auditml-serve-metrics-"  # the workers' scratch folder: METRICS_PREFIX<server pid>-<random>


def metrics_scratch() -> str:
    """A fresh scratch folder for the workers' shared metrics, named after this server's pid; first removes
    those that servers killed with ``-9`` left behind (ours, named after a pid that no longer runs)."""
    for old in Path(tempfile.gettempdir()).glob(f"{METRICS_PREFIX}*"):
        pid = old.name[len(METRICS_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not old.is_symlink() and old.is_dir() and old.stat().st_uid == os.getuid():
            if not watchdog.alive(int(pid)):
                shutil.rmtree(old, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{METRICS_PREFIX}{os.getpid()}-")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline serve",
        description="Serve a run's student (or teacher) models over HTTP: predictions with provenance, SHAP "
        "explanations, Prometheus metrics. The run is verified first and never written.",
        epilog="endpoints: GET /healthz /readyz /metadata /metrics /openapi.json; POST /predict/{model} "
        f"/explain/{{model}} with model one of: {', '.join(models.MODELS)}",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument(
        "--model", choices=predict_model.WHICH, default="student", help="the distilled students (default) or teachers"
    )
    p.add_argument(
        "--engine", choices=predict_model.ENGINES, default="onnx", help="onnx (default: the run's graphs) or torch"
    )
    p.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="cpu", help="where torch/ONNX run (default cpu)"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 is refused)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--api-key-file", metavar="F", help="require this key (Authorization: Bearer / X-API-Key)")
    p.add_argument(
        "--max-rows", type=int, default=ServeSettings.max_rows, help="rows/images per request (default %(default)s)"
    )
    p.add_argument(
        "--max-body-bytes", type=int, default=ServeSettings.max_body_bytes, help="body size limit (413 above)"
    )
    p.add_argument("--explain-max-rows", type=int, default=ServeSettings.explain_max_rows, help="rows per /explain")
    p.add_argument("--ssl-certfile", metavar="PEM", help="TLS certificate (with --ssl-keyfile): serve HTTPS")
    p.add_argument("--ssl-keyfile", metavar="PEM", help="TLS private key")
    p.add_argument(
        "--demo-tls",
        metavar="DIR",
        help="issue a demo CA and certificate for --host into DIR (federated.launch.tls) and serve HTTPS with it",
    )
    p.add_argument("--quiet", action="store_true", help="warnings, errors and the access log only")
    return p


def _check_args(args: argparse.Namespace) -> None:
    for flag, value in (
        ("--workers", args.workers),
        ("--max-rows", args.max_rows),
        ("--explain-max-rows", args.explain_max_rows),
    ):
        if value < 1:
            raise ConfigError(f"{flag}={value}; give a positive number")
    if args.max_body_bytes < 1024:
        raise ConfigError(f"--max-body-bytes={args.max_body_bytes}; give at least 1024")
    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port={args.port}; give a port between 1 and 65535")
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        raise ConfigError("give both --ssl-certfile and --ssl-keyfile, or neither")
    if args.demo_tls and args.ssl_certfile:
        raise ConfigError("give either --demo-tls or --ssl-certfile/--ssl-keyfile, not both")
    for flag, value in (("--ssl-certfile", args.ssl_certfile), ("--ssl-keyfile", args.ssl_keyfile)):
        if value and not Path(value).is_file():
            raise ConfigError(f"{flag} {value!r} is not a file")
    if args.api_key_file:
        read_key(args.api_key_file)  # before the models load: a bad key file fails at once


def _check_port(host: str, port: int) -> None:
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as exc:
        raise ConfigError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}); pick another --port or --host"
        ) from None


def _demo_tls(folder: str, *, host: str, run_dir: str) -> tuple[str, str]:
    out = Path(folder).resolve()
    if out == Path(run_dir).resolve() or Path(run_dir).resolve() in out.parents:
        raise ConfigError(
            f"--demo-tls {folder!r} is inside the run directory, which serving never writes; pick another folder"
        )
    existing = [n for n in ("ca.pem", "ca.key", "server.pem", "server.key") if (out / n).exists()]
    if existing:
        raise ConfigError(
            f"--demo-tls {folder!r} already holds {', '.join(existing)}; pass them with --ssl-certfile/--ssl-keyfile "
            "or choose an empty folder"
        )
    creds = tls.make_server_credentials(out, hosts=(host,) if host not in ("0.0.0.0", "::") else ())
    print(f"demo TLS: certificate {creds.server_cert}; clients trust {creds.ca_cert} (curl --cacert {creds.ca_cert})")
    return str(creds.server_cert), str(creds.server_key)


def app_from_env() -> Any:
    """uvicorn's factory in each worker process: the app for the settings the parent put in the environment."""
    settings = ServeSettings(**json.loads(os.environ[SETTINGS_ENV]))
    if processes._PRCTL is not None:  # a worker outlives a SIGKILLed parent otherwise
        processes._die_with_parent()
        if os.getppid() != int(os.environ[PARENT_ENV]):  # the parent died before we asked: no signal will come
            raise SystemExit(1)
    try:
        return create_app(settings, multiprocess_metrics=True)
    except UserError as exc:
        # uvicorn would start this worker again and again: leave a mark for cmd_serve (uvicorn's supervisor
        # takes every other signal for itself) and stop the supervisor, which stops the other workers.
        print(f"error: worker {os.getpid()}: {exc}", file=sys.stderr, flush=True)
        Path(os.environ["PROMETHEUS_MULTIPROC_DIR"], WORKER_FAILED).touch()
        os.kill(os.getppid(), signal.SIGTERM)
        raise SystemExit(2) from None


def cmd_serve(argv: list[str]) -> int:
    """``python -m pipeline serve``; returns the exit code (a damaged or incomplete run: UserError, exit 2)."""
    args = parser().parse_args(argv)
    _check_args(args)
    settings = ServeSettings(
        run_dir=args.run_dir,
        which=args.model,
        engine=args.engine,
        device=args.device,
        max_rows=args.max_rows,
        max_body_bytes=args.max_body_bytes,
        explain_max_rows=args.explain_max_rows,
        api_key_file=args.api_key_file,
    )
    loaded = load_models(settings)  # verifies the run exactly as predict does: refused here, before listening
    settings = dataclasses.replace(settings, manifest_sha256=loaded.manifest_sha256)
    app = create_app(settings, loaded=loaded)  # also checks the API key file
    _check_port(args.host, args.port)
    certfile, keyfile = args.ssl_certfile, args.ssl_keyfile
    if args.demo_tls:
        certfile, keyfile = _demo_tls(args.demo_tls, host=args.host, run_dir=args.run_dir)
    scheme = "https" if certfile else "http"
    print(
        f"serving run {loaded.run_id} ({args.model}s on {args.engine}, {args.workers} worker(s)) at "
        f"{scheme}://{args.host}:{args.port}  (GET /metadata, POST /predict/{{{'|'.join(loaded.models)}}})",
        flush=True,
    )
    common: dict[str, Any] = dict(
        host=args.host,
        port=args.port,
        ssl_certfile=certfile,
        ssl_keyfile=keyfile,
        access_log=False,  # our own access log: one structured line per request, no input values
        log_level="warning" if args.quiet else "info",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        server_header=False,
    )
    stop_signals: list[int] = []
    # uvicorn handles SIGTERM/SIGINT (stop listening, finish in-flight requests), then raises the
    # signal again once it restored the previous handlers: these record it instead of exiting.
    previous = {
        s: signal.signal(s, lambda sig, frame: stop_signals.append(sig)) for s in (signal.SIGTERM, signal.SIGINT)
    }
    metrics_dir, failed = None, False
    try:
        if args.workers == 1:
            uvicorn.run(app, **common)
        else:
            del app, loaded  # each worker loads its own copy
            metrics_dir = metrics_scratch()  # outside the run directory
            os.environ[SETTINGS_ENV] = json.dumps(dataclasses.asdict(settings))
            os.environ[PARENT_ENV] = str(os.getpid())
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
            uvicorn.run("pipeline.serve:app_from_env", factory=True, workers=args.workers, **common)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if metrics_dir:
            failed = Path(metrics_dir, WORKER_FAILED).exists()
            shutil.rmtree(metrics_dir, ignore_errors=True)
            for name in (SETTINGS_ENV, PARENT_ENV, "PROMETHEUS_MULTIPROC_DIR"):
                os.environ.pop(name, None)
    if failed:
        raise RunDirError(
            f"a worker could not load run {args.run_dir} (its error is above); the server stopped: check the run "
            "with `python -m pipeline verify` and start the server again"
        )
    print("server stopped" + (" (SIGTERM)" if signal.SIGTERM in stop_signals else ""))
    return 0
