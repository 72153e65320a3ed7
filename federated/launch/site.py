"""``python -m federated.site``: one site of a federation, in one command, on its own host.

::

    python -m federated.site --superlink superlink.example.org:9092 --data /data/site0.csv --target y \\
        --partition-id 0 --num-partitions 3 --ledger /data/ledger \\
        --root-certificates certs/ca.pem --auth-supernode-private-key certs/site0.key

This process *is* the site's SuperNode: it runs Flower's ``flower-supernode`` in-process with the poll and
heartbeat patches of :mod:`federated.patches.fast_poll` (short polls while a run is active, backing off to
Flower's 3 s when idle), and starts the site's long-lived ClientApp worker
(:mod:`federated.launch.clientapp_worker`) as its child, so a round does not pay Flower's fresh ClientApp
process per message (39-52 s rounds before, per site). Process hygiene, as in the one-machine launchers:

- the worker dies with this process: the kernel kills it when this process dies, ``kill -9`` included
  (``PR_SET_PDEATHSIG``), and the worker checks its parent itself every 0.2 s (``--parent-pid``), so it
  also goes where the parent-death signal is unavailable;
- SIGTERM and Ctrl-C stop the SuperNode (Flower's handlers) and then the worker; a worker that dies on
  its own takes the site down with a non-zero exit, rather than leave a SuperNode that accepts rounds
  nobody runs;
- the worker takes tasks only with a fresh per-site secret (Flower's SuperExec auth on the Runtime API, a
  loopback port). It is never on disk: an anonymous in-memory file (``memfd_create``) that both read by its
  ``/proc/self/fd`` path (the worker inherits the descriptor), gone with the site, ``kill -9`` included. (It
  was an owner-only temporary folder, left behind, secret and all, by every site killed with ``-9``.)

On a Flower version the worker was not checked against (:mod:`federated.patches.flower_api`) the site
runs Flower's stock ``--isolation subprocess`` instead, with one warning. :mod:`federated.launch.deploy`
starts every site of a one-machine deployment with this same command.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Sequence

from auditml_core.errors import UserError
from federated.launch import processes as launcher
from federated.patches import fast_poll, flower_api

log = logging.getLogger("federated.launch.site")
ENTRY = "federated.site"  # the documented `python -m` entry point (federated/site.py runs this module's main)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python -m {ENTRY}",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the SuperLink's Fleet API address")
    p.add_argument("--data", metavar="FILE", help="this site's CSV, .npz or image folder (never leaves the site)")
    p.add_argument("--target", default="", metavar="COL", help="the CSV's target column (default data.target)")
    p.add_argument(
        "--ledger", metavar="DIR", help="folder of this site's privacy ledger (default <data folder>/privacy-ledger)"
    )
    p.add_argument(
        "--partition-id",
        type=int,
        required=True,
        metavar="I",
        help="this site's number in [0, N): its seeds and its key in the record (agreed with the operator)",
    )
    p.add_argument(
        "--num-partitions", type=int, required=True, metavar="N", help="the federation's sites (federated.n_clients)"
    )
    p.add_argument("--root-certificates", metavar="CA.pem", help="CA of the SuperLink's TLS certificate")
    p.add_argument("--insecure", action="store_true", help="plain HTTP to the SuperLink (loopback tests only)")
    p.add_argument(
        "--auth-supernode-private-key", metavar="KEY", help="this site's key, registered with the SuperLink (--auth)"
    )
    p.add_argument(
        "--isolation",
        choices=["process", "subprocess"],
        default="process",
        help="process: one long-lived ClientApp worker (default); subprocess: Flower's, a process per message",
    )
    p.add_argument("--runtime-port", type=int, default=0, help="loopback port of the Runtime API (default: free)")
    return p


def node_config(
    *, partition_id: int, num_partitions: int, data: Path | None, target: str = "", ledger: Path | None = None
) -> str:
    """The SuperNode's ``--node-config``: the site's number and, with per-site data, its file, target and ledger."""
    if not 0 <= partition_id < num_partitions:
        raise UserError(f"--partition-id {partition_id} is outside [0, --num-partitions {num_partitions})")
    values: dict[str, str] = {}
    if data is not None:
        if not data.exists():
            raise UserError(f"--data {data} does not exist; give this site's CSV, .npz or image folder")
        values["data-path"] = str(data.resolve())
        if ledger is not None:
            values["ledger-path"] = str(ledger.resolve())
        if target:
            values["target"] = target
    elif ledger is not None or target:
        raise UserError("--ledger and --target describe a site's own data: give --data too")
    if any('"' in v for v in values.values()):
        raise UserError("a path or column name holding '\"' cannot travel in --node-config; rename it")
    parts = [f"partition-id={partition_id}", f"num-partitions={num_partitions}"]
    return " ".join([*parts, *(f"{k}={json.dumps(v)}" for k, v in values.items())])


def supernode_args(args: argparse.Namespace, *, isolation: str, runtime_port: int, secret: Path | None) -> list[str]:
    """``flower-supernode``'s arguments for this site (without the program name)."""
    if args.insecure == bool(args.root_certificates):
        raise UserError("give --root-certificates CA.pem (TLS to the SuperLink) or --insecure (loopback tests)")
    if args.auth_supernode_private_key and not args.root_certificates:
        raise UserError("--auth-supernode-private-key needs --root-certificates: Flower authenticates over TLS only")
    out = ["--insecure"] if args.insecure else ["--root-certificates", str(args.root_certificates)]
    if args.auth_supernode_private_key:
        out += ["--auth-supernode-private-key", str(args.auth_supernode_private_key)]
    out += ["--superlink", args.superlink, "--isolation", isolation, "--host", "127.0.0.1", "--port", str(runtime_port)]
    if secret is not None:
        out += ["--superexec-auth-secret-file", str(secret)]
    out += [
        "--node-config",
        node_config(
            partition_id=args.partition_id,
            num_partitions=args.num_partitions,
            data=Path(args.data) if args.data else None,
            target=args.target,
            ledger=Path(args.ledger) if args.ledger else None,
        ),
    ]
    return out


def start_worker(*, runtime_port: int, secret_fd: int, log_path: Path | None = None) -> subprocess.Popen:
    """This site's ClientApp worker, as a child that the kernel kills when this process dies; it reads the
    secret from the descriptor ``secret_fd`` (see :func:`superexec_secret`), which it inherits."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(launcher.REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    out = log_path.open("ab") if log_path is not None else None
    try:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "federated.launch.clientapp_worker",
                "--runtime-api-address",
                f"127.0.0.1:{runtime_port}",
                "--insecure",  # loopback only, as Flower's own SuperExec talks to the Runtime API
                "--parent-pid",
                str(os.getpid()),
                "--superexec-auth-secret-file",
                _fd_path(secret_fd),
            ],
            pass_fds=(secret_fd,),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT if out is not None else None,
            preexec_fn=launcher.DIE_WITH_PARENT,
        )
    finally:
        if out is not None:
            out.close()


def _watch_worker(worker: subprocess.Popen, died: threading.Event) -> None:
    """Take the site down (SIGTERM to this process: Flower's handler stops the SuperNode) if the worker dies."""
    worker.wait()
    if not died.is_set():
        died.set()
        log.error("the ClientApp worker exited with code %s: stopping the site", worker.returncode)
        os.kill(os.getpid(), signal.SIGTERM)


def superexec_secret() -> int:
    """A fresh 32-byte secret in an anonymous in-memory file (never on disk; gone with this process); its fd."""
    fd = os.memfd_create("superexec-secret", os.MFD_CLOEXEC)
    os.write(fd, os.urandom(32))
    return fd


def _fd_path(fd: int) -> str:
    """The path by which this process (or a child that inherited ``fd``) reads the file behind ``fd``."""
    return f"/proc/self/fd/{fd}"


def run(args: argparse.Namespace) -> int:
    """Run the site until it is stopped; the exit code (non-zero when the worker died under it)."""
    isolation = flower_api.clientapp_isolation(args.isolation)
    secret_fd = superexec_secret() if isolation == "process" else None
    worker: subprocess.Popen | None = None
    died = threading.Event()
    try:
        runtime_port = args.runtime_port or launcher.free_port()
        secret = Path(_fd_path(secret_fd)) if secret_fd is not None else None
        argv = supernode_args(args, isolation=isolation, runtime_port=runtime_port, secret=secret)
        fast_poll.patch_supernode()
        fast_poll.patch_object_pulls()
        fast_poll.patch_heartbeat()
        if secret_fd is not None:
            worker = start_worker(runtime_port=runtime_port, secret_fd=secret_fd)
            threading.Thread(target=_watch_worker, args=(worker, died), name="worker-watch", daemon=True).start()
        from flwr.supernode.cli import flower_supernode

        sys.argv = ["flower-supernode", *argv]
        try:
            flower_supernode()
        except SystemExit as exc:  # Flower's signal handlers exit through sys.exit
            if not died.is_set() and exc.code not in (None, 0):
                raise
        return 1 if died.is_set() else 0
    finally:
        if worker is not None and worker.poll() is None:
            died.set()  # our own stop, not the worker's death
            launcher.stop_trees([worker.pid], timeout_s=5.0, reap=worker.poll)
        if secret_fd is not None:
            os.close(secret_fd)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
