"""Load figures for ``python -m pipeline serve``: a real HTTP load generator (async httpx) against server processes.

For each server configuration (student/teacher x onnx/torch x 1/2 workers) a fresh
``python -m pipeline serve RUN`` process is started on a free port and, per model (regressor, CNN):

- batch 1, open loop: requests are sent at a fixed ``--rate`` for ``--duration`` seconds whatever
  the server does; latency is counted from each request's *scheduled* send time, so a server (or
  a client) that falls behind is charged for it (no coordinated omission);
- batch 256, closed loop: ``--concurrency`` connections each send the next request as soon as the
  previous answered, for ``--batch-duration`` seconds: rows/s.

Every response is checked (status 200 and one prediction per row); anything else is an error.
``--client httpx`` (default) is httpx's ``AsyncClient``; on a 2-core machine it spends more CPU per
request than the server does (~2.5 ms against ~1.5 ms measured), and that CPU is taken from the server.
``--client raw`` sends the same pre-encoded HTTP/1.1 requests over keep-alive asyncio streams (a few
tens of microseconds per request), to measure the server rather than the client.
Rows are the run's own test split in raw units (JSON ``{"rows": ...}`` / ``{"images": ...}``).
The load average is printed beside each figure: the client shares the machine with the server.

    python scripts/bench_serve.py runs/RUN                       # the full matrix (~13 min)
    python scripts/bench_serve.py runs/RUN --which student --engine onnx --workers 1 --duration 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from federated.launch.processes import descendants, free_port, stop_trees  # noqa: E402


def raw_test(run: Path) -> dict[str, np.ndarray | list[str]]:
    """The run's test split in raw units: regressor rows and CNN images."""
    tab, img = np.load(run / "data" / "tabular.npz"), np.load(run / "data" / "images.npz")
    tmeta = json.loads((run / "data" / "tabular.json").read_text())
    imeta = json.loads((run / "data" / "images.json").read_text())["preprocessing"]
    p = tmeta["preprocessing"]
    rows = tab["x_test"].astype(np.float64) * np.asarray(p["x_std"]) + np.asarray(p["x_mean"])
    std = np.asarray(imeta["channel_std"])[None, :, None, None]
    images = img["x_test"].astype(np.float64) * std + np.asarray(imeta["channel_mean"])[None, :, None, None]
    images = images.round(4)  # the pixel values a client has (digits: integers 0-16), not float noise around them
    return {"rows": rows, "images": images, "features": tmeta["feature_names"]}


def bodies(data: dict, model: str, batch: int) -> list[bytes]:
    """A few distinct pre-encoded request bodies of ``batch`` rows (the client does not pay for encoding)."""
    out = []
    key = "rows" if model == "regressor" else "images"
    x = data[key]
    for start in range(0, 8):
        idx = (np.arange(batch) + start * batch) % len(x)
        if model == "regressor":
            payload = {"rows": [dict(zip(data["features"], map(float, x[i]))) for i in idx]}
        else:
            payload = {"images": x[idx].tolist()}
        out.append(json.dumps(payload).encode())
    return out


def percentiles(lat: list[float]) -> dict[str, float]:
    if not lat:
        return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan")}
    a = np.asarray(lat) * 1000
    return {f"p{q}": float(np.percentile(a, q)) for q in (50, 95, 99)}


class RawClient:
    """Keep-alive HTTP/1.1 POSTs over asyncio streams: a pool of connections, pre-encoded requests.

    A connection idle for longer than ``IDLE_S`` is closed rather than reused (uvicorn closes idle
    keep-alive connections after 5 s), so no request is sent into a connection the server is closing.
    """

    IDLE_S = 3.0

    def __init__(self, url: str, *, max_connections: int):
        parsed = httpx.URL(url)
        self.host, self.port, self.max = parsed.host, parsed.port, max_connections
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []
        self.open = 0
        self.freed = asyncio.Condition()

    async def __aenter__(self) -> "RawClient":
        return self

    async def __aexit__(self, *exc) -> None:
        for _, writer, _ in self.idle:
            writer.close()

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The most recently used idle connection still within ``IDLE_S``, or a new one (at most ``max`` open)."""
        async with self.freed:
            while True:
                while self.idle and time.monotonic() - self.idle[-1][2] > self.IDLE_S:
                    self.idle.pop()[1].close()
                    self.open -= 1
                if self.idle or self.open < self.max:
                    break
                await self.freed.wait()
            if self.idle:
                reader, writer, _ = self.idle.pop()
                return reader, writer
            self.open += 1
        try:
            return await asyncio.open_connection(self.host, self.port)
        except OSError:
            await self._closed(None)
            raise

    async def _closed(self, writer: asyncio.StreamWriter | None) -> None:
        if writer is not None:
            writer.close()
        async with self.freed:
            self.open -= 1
            self.freed.notify()

    async def post(self, url: str, *, content: bytes, headers: dict) -> tuple[int, bytes]:
        path = httpx.URL(url).raw_path
        head = b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n" % (
            path,
            self.host.encode(),
            headers["content-type"].encode(),
            len(content),
        )
        reader, writer = await self._connection()
        try:
            writer.write(head + content)
            status = int((await reader.readline()).split()[1])
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            body = await reader.readexactly(length)
        except (OSError, ValueError, IndexError, asyncio.IncompleteReadError) as exc:
            await self._closed(writer)
            raise httpx.TransportError(f"{type(exc).__name__}: {exc}") from None
        async with self.freed:
            self.idle.append((reader, writer, time.monotonic()))
            self.freed.notify()
        return status, body


def make_client(kind: str, url: str, *, connections: int, timeout: float):
    if kind == "raw":
        return RawClient(url, max_connections=connections)
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(limits=limits, timeout=timeout)


async def _send(client, url: str, body: bytes, n: int) -> bool:
    if isinstance(client, RawClient):
        status, content = await client.post(url, content=body, headers={"content-type": "application/json"})
    else:
        r = await client.post(url, content=body, headers={"content-type": "application/json"})
        status, content = r.status_code, r.content
    return status == 200 and len(json.loads(content)["predictions"]) == n


IN_FLIGHT = 32  # open loop: requests inside the client at once (and its connections)


async def open_loop(url: str, payloads: list[bytes], *, rate: float, duration: float, client_kind: str) -> dict:
    """Batch-1 requests at a fixed rate; latency from each request's scheduled time."""
    lat: list[float] = []
    errors = 0
    kinds: dict[str, int] = {}  # exceptions by type (the rest of the errors: a wrong answer)
    # At most IN_FLIGHT requests inside the client at once: httpx's pool slows down with the number of requests
    # waiting in it (a client that fell behind then never caught up: 27 req/s measured). A request that waits
    # here is still charged from its scheduled time.
    in_flight = asyncio.Semaphore(IN_FLIGHT)
    async with make_client(client_kind, url, connections=IN_FLIGHT, timeout=30) as client:
        for b in payloads[:4]:  # warm-up: connections, first-call costs
            await _send(client, url, b, 1)

        async def one(i: int, due: float) -> None:
            nonlocal errors
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            try:
                async with in_flight:
                    ok = await _send(client, url, payloads[i % len(payloads)], 1)
            except (httpx.HTTPError, OSError) as exc:
                ok, why = False, str(exc)[:80] or type(exc).__name__
                kinds[why] = kinds.get(why, 0) + 1
            if ok:
                lat.append(time.perf_counter() - due)
            else:
                errors += 1

        n = int(rate * duration)
        t0 = time.perf_counter() + 0.2
        t_start = time.perf_counter()
        await asyncio.gather(*(one(i, t0 + i / rate) for i in range(n)))
        wall = time.perf_counter() - t_start
    return {"requests": n, "errors": errors, "kinds": kinds, "req_per_s": (n - errors) / wall, **percentiles(lat)}


async def closed_loop(
    url: str, payloads: list[bytes], *, batch: int, concurrency: int, duration: float, client_kind: str
) -> dict:
    """``concurrency`` connections, each sending its next request when the last one answered."""
    lat: list[float] = []
    errors = 0
    kinds: dict[str, int] = {}  # exceptions by type (the rest of the errors: a wrong answer)
    async with make_client(client_kind, url, connections=concurrency, timeout=60) as client:
        for b in payloads[:2]:
            await _send(client, url, b, batch)
        end = time.perf_counter() + duration

        async def worker(k: int) -> None:
            nonlocal errors
            i = k
            while time.perf_counter() < end:
                t = time.perf_counter()
                try:
                    ok = await _send(client, url, payloads[i % len(payloads)], batch)
                except (httpx.HTTPError, OSError) as exc:
                    ok, why = False, str(exc)[:80] or type(exc).__name__
                    kinds[why] = kinds.get(why, 0) + 1
                if ok:
                    lat.append(time.perf_counter() - t)
                else:
                    errors += 1
                i += concurrency

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        wall = time.perf_counter() - t0
    return {
        "requests": len(lat) + errors,
        "errors": errors,
        "kinds": kinds,
        "req_per_s": len(lat) / wall,
        "rows_per_s": len(lat) * batch / wall,
        **percentiles(lat),
    }


def start_server(run: Path, *, which: str, engine: str, workers: int, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    argv = [sys.executable, "-m", "pipeline", "serve", str(run), "--port", str(port), "--model", which]
    argv += ["--engine", engine, "--workers", str(workers)]  # not --quiet: uvicorn logs worker restarts
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with log.open("wb") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline, seen = time.monotonic() + 120, set()
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            ready = httpx.get(f"{url}/readyz", timeout=1)  # a new connection each time: any worker may answer
            if ready.status_code == 200:
                seen.add(ready.json()["pid"])
                if len(seen) == workers:  # every worker has loaded its models
                    return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1 if seen else 0.3)
    stop_server(proc)
    raise RuntimeError("server did not become ready in 120 s")


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM to the server first (uvicorn's supervisor stops its workers; stopped first, it restarts them)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    stop_trees([proc.pid])


def server_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by the server process and every process below it (its workers)."""
    total = 0.0
    for p in [pid, *descendants(pid)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def load() -> str:
    return "load %.2f %.2f %.2f" % os.getloadavg()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--which", nargs="+", default=["student", "teacher"])
    p.add_argument("--engine", nargs="+", default=["onnx", "torch"])
    p.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    p.add_argument("--models", nargs="+", default=["regressor", "cnn"])
    p.add_argument("--rate", type=float, default=200.0, help="batch-1 requests/s (open loop)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of each batch-1 run")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--batch-duration", type=float, default=10.0, help="seconds of each batch-256 run")
    p.add_argument("--concurrency", type=int, default=4, help="connections of the batch-256 closed loop")
    p.add_argument("--log-dir", default="/tmp/bench_serve", help="server logs (access log) go here")
    p.add_argument("--client", choices=["httpx", "raw"], default="httpx", help="load generator (see above)")
    args = p.parse_args(argv)
    run = Path(args.run_dir)
    data = raw_test(run)
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    print(
        f"run {run.name}; {os.cpu_count()} CPUs; client {args.client}; batch-1 at {args.rate:g} req/s for {args.duration:g} s (open loop), "
        f"batch {args.batch} closed loop x{args.concurrency} for {args.batch_duration:g} s; latencies in ms"
    )
    header = (
        f"{'which':<8}{'engine':<7}{'wkr':>4} {'model':<10}{'batch':>6}{'req/s':>9}{'rows/s':>10}{'p50':>8}{'p95':>8}"
        f"{'p99':>8}{'errors':>8}{'srvCPU':>8}{'rows/CPUs':>10}  load (1/5/15 min)"
    )
    print("srvCPU: the server's CPU ms per answered request (all its processes); rows/CPUs: rows per server CPU-second")
    print(header)
    for which in args.which:
        for engine in args.engine:
            for workers in args.workers:
                log = log_dir / f"{which}-{engine}-{workers}.log"
                proc, url = start_server(run, which=which, engine=engine, workers=workers, log=log)
                try:
                    for model in args.models:
                        for batch in (1, args.batch):
                            payloads = bodies(data, model, batch)
                            target = f"{url}/predict/{model}"
                            cpu0 = server_cpu_s(proc.pid)
                            if batch == 1:
                                r = asyncio.run(
                                    open_loop(
                                        target,
                                        payloads,
                                        rate=args.rate,
                                        duration=args.duration,
                                        client_kind=args.client,
                                    )
                                )
                                r["rows_per_s"] = r["req_per_s"]
                            else:
                                r = asyncio.run(
                                    closed_loop(
                                        target,
                                        payloads,
                                        batch=batch,
                                        concurrency=args.concurrency,
                                        duration=args.batch_duration,
                                        client_kind=args.client,
                                    )
                                )
                            cpu = server_cpu_s(proc.pid) - cpu0
                            answered = r["requests"] - r["errors"]
                            per_req = cpu / max(answered, 1) * 1000
                            per_cpu = answered * batch / cpu if cpu > 0 else float("nan")
                            print(
                                f"{which:<8}{engine:<7}{workers:>4} {model:<10}{batch:>6}{r['req_per_s']:>9.1f}{r['rows_per_s']:>10.0f}"
                                f"{r['p50']:>8.2f}{r['p95']:>8.2f}{r['p99']:>8.2f}{r['errors']:>8}{per_req:>8.2f}{per_cpu:>10.0f}"
                                f"  {load()}",
                                flush=True,
                            )
                            if r["kinds"]:
                                print(f"    errors by kind: {r['kinds']}", flush=True)
                finally:
                    stop_server(proc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
