"""CPU per request: `python -m bench.cpu` (docs/benchmark.md, "Where a create's cost goes").

On a fresh database of the embedded PostgreSQL (./.headoni-bench), pre-filled like the bench's, one
`headoni serve` worker is driven by wrk for `--seconds` per kind of request; the server's CPU time
(user + system) and PostgreSQL's (the postmaster and every backend, the WAL writer and checkpointer
included) are read before and after, and divided by the requests (for a batch, by its tickets).
"""

import argparse
import asyncio
import os
import time
from pathlib import Path

import psutil  # type: ignore[import-untyped]

from app import db
from bench import cluster, prefill, server, wrk

# label, wrk mode, path, connections, items per request, one hot desk
KINDS = [
    ("GET /healthz, 32 connections", "plain", "/healthz", 32, 0, True),
    ("A: create, 100 desks, 32 connections", "create", "/", 32, 0, False),
    ("A: create, 100 desks, 8 connections", "create", "/", 8, 0, False),
    ("B: create, 1 hot desk, 32 connections", "create", "/", 32, 0, True),
    ("C: batch of 100, 8 connections", "batch", "/", 8, 100, False),
]


def cpu_seconds(processes: list[psutil.Process]) -> float:
    """The processes' CPU time, user and system; a process gone meanwhile counts nothing."""
    total = 0.0
    for p in processes:
        try:
            times = p.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def _postgres(data_dir: Path) -> list[psutil.Process]:
    postmaster = psutil.Process(int((data_dir / "pg" / "postmaster.pid").read_text().split()[0]))
    return [postmaster, *postmaster.children(recursive=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds of load per kind (5)")
    parser.add_argument("--data-dir", type=Path, default=Path(".headoni-bench"), help="embedded PostgreSQL's home")
    args = parser.parse_args()
    data_dir = args.data_dir.resolve()
    server_url = db.embedded_url(data_dir)
    name = f"headoni_cpu_{os.getpid()}"
    url = asyncio.run(cluster.create_database(server_url, name, migrated=True))
    try:
        fill = asyncio.run(prefill.fill(url, 100, 20_000))
        results = Path(__file__).resolve().parent / "results"
        results.mkdir(exist_ok=True)
        srv = server.start(url, results / "cpu-serve.log", workers=1)
        try:
            binary = wrk.ensure_wrk()
            worker = srv.workers()
            for label, mode, path, connections, items, hot in KINDS:
                postgres = _postgres(data_dir)
                s0, p0, t0 = cpu_seconds(worker), cpu_seconds(postgres), time.monotonic()
                m = wrk.run_wrk(binary, srv.base_url, mode, connections, args.seconds, fill, items=items, path=path,
                                hot=hot)
                s1, p1 = cpu_seconds(worker), cpu_seconds(_postgres(data_dir))
                units = m.requests * (items or 1)
                print(f"{label:40s} {units / (time.monotonic() - t0):9,.0f}/s  server {1e6 * (s1 - s0) / units:6.1f} us"
                      f"  postgres {1e6 * (p1 - p0) / units:6.1f} us  per {'ticket' if items else 'request'}"
                      f"  errors {m.errors}", flush=True)
        finally:
            server.stop(srv)
    finally:
        asyncio.run(cluster.drop_database(server_url, name))


if __name__ == "__main__":
    main()
