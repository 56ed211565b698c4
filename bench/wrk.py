"""Driving the server with wrk (a compiled load generator) and bench.lua, and reading its numbers."""

import itertools
import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from bench.prefill import Fill

LUA: Final = Path(__file__).resolve().parent / "bench.lua"
_RUN_IDS: Final = itertools.count(1)


@dataclass(frozen=True)
class Measure:
    """One timed run of a load generator: throughput, latency percentiles and errors."""

    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int  # wrk: responses >= 400 and socket errors (connect, read, write, timeout); pgbench: failed
    p999_ms: float = 0.0
    max_ms: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)  # answers by status, when counted (count_statuses)

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def ensure_wrk() -> str:
    """The wrk binary; installed from Debian when missing and running as root."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("bench: wrk is missing; installing it with apt-get install -y wrk", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], env=env).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, check=True)
            subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], env=env, check=True)
        found = shutil.which("wrk")
        if found:
            return found
    raise SystemExit(
        "bench: needs the load generator wrk (Debian/Ubuntu package `wrk`, Homebrew `wrk`): "
        "install it, e.g. `sudo apt-get install -y wrk`, or run the bench as root to let it install wrk"
    )


def run_wrk(
    wrk: str,
    base_url: str,
    mode: str,
    connections: int,
    seconds: float,
    fill: Fill,
    *,
    hot: bool = False,
    items: int = 0,
    path: str = "/",
    threads: int = 1,
    first_desk: int | None = None,
    count_statuses: bool = False,
) -> Measure:
    """Run wrk once against the server with bench.lua in `mode` (create, batch, read or plain); with
    first_desk, on that one desk only; with count_statuses, the answers counted by status."""
    run_id = f"r{os.getpid()}x{next(_RUN_IDS)}x{os.urandom(3).hex()}"
    desks = 1 if hot or first_desk is not None else fill.desks
    first = first_desk if first_desk is not None else fill.last_desk - fill.desks + 1
    command = [
        wrk, f"-t{min(threads, connections)}", f"-c{connections}", f"-d{max(1, round(seconds))}s",
        "--timeout", "10s", "-s", str(LUA), base_url + path,
        "--", mode, run_id, str(first), str(desks), str(fill.tickets_per_desk), str(items),
    ]
    env = {**os.environ, "BENCH_SECRET_PREFIX": fill.secret_prefix}
    if count_statuses:
        env["BENCH_STATUSES"] = "1"
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=seconds + 60)
    statuses: dict[str, int] = {}
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_STATUS "):
            statuses = {k: v for k, v in json.loads(line.removeprefix("BENCH_STATUS ")).items() if v}
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            r = json.loads(line.removeprefix("BENCH_RESULT "))
            errors = sum(int(r[k]) for k in ("connect", "read", "write", "status", "timeout"))
            return Measure(
                int(r["requests"]), r["duration_us"] / 1e6, r["p50_us"] / 1e3, r["p99_us"] / 1e3, errors,
                r["p999_us"] / 1e3, r["max_us"] / 1e3, statuses,
            )
    raise RuntimeError(f"wrk gave no result (exit {done.returncode}): {done.stderr.strip()[-500:]}")
