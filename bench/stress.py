"""The stress harness: `python -m bench.stress` (README, "Stress harness"; docs/locking.md).

For each statement scope: a fresh database, desks made through the admin code (a few hot ones that
everything contends on, and many quiet ones), a real `headoni serve` driven over HTTP by clients that
contend by design (bench/stress_load.py) while the CLI changes blocklists, departments, ticket types and
defaults, all under CPU contention from busy processes. Then it asserts (bench/stress_checks.py):
- no 5xx and no request without an answer; no deadlock (pg_stat_database, the server's metrics and log);
- numbers per desk gapless, and in commit order as clients see it;
- every acknowledged ticket stored with its message and event, and nothing stored that was not;
- no requester stored twice; an Idempotency-Key's requests answered alike and written once.
Exit status 1 when anything failed. Bounded in time (--seconds, 60 by default, per scope).
"""

import argparse
import asyncio
import multiprocessing
import os
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from app import admin, db
from app.ids import Snowflake, WorkerLease
from bench import cluster, server
from bench.stress_checks import answers, stored
from bench.stress_load import Clients, Desk, Load

SCOPES = ("any-desks", "one-desk")


@dataclass
class Report:
    scope: str
    seconds: float
    load: Load
    facts: dict[str, Any]
    failures: list[str]

    def lines(self) -> list[str]:
        load, f = self.load, self.facts
        kinds: dict[str, int] = {}
        for call in load.calls:
            kinds[call.kind] = kinds.get(call.kind, 0) + 1
        statuses: dict[int, int] = {}
        for call in load.calls:
            statuses[call.status] = statuses.get(call.status, 0) + 1
        latency = sorted((c.received - c.sent) * 1000 for c in load.calls if c.status)
        admin_runs = ", ".join(f"{k} {v}" for k, v in sorted(load.admin.items()))
        return [
            f"stress {self.scope}: {self.seconds:.0f} s, {f['desks']} desks ({f['hot']} hot), {f['clients']} clients,"
            f" {f['busy']} busy processes; load average {f['load']:.1f}",
            f"  requests {len(load.calls):,}: " + ", ".join(f"{k} {v:,}" for k, v in sorted(kinds.items()))
            + "; statuses " + ", ".join(f"{k or 'none'}: {v:,}" for k, v in sorted(statuses.items())),
            f"  tickets stored {f['tickets']:,} (acknowledged {f['acknowledged']:,}) in {f['statements']:,}"
            f" transactions; requesters {f['users']:,}; commit order checked over {f['ordered_pairs']:,} pairs",
            f"  deadlocks {f['deadlocks']} (pg_stat_database); statements aborted {f['aborted']:g}, split"
            f" {f['splits']:g} (/metrics); 5xx or no answer {f['fivexx']}",
            f"  latency ms (client side, every request): p50 {_pct(latency, 50):.1f}  p99 {_pct(latency, 99):.1f}"
            f"  p99.9 {_pct(latency, 99.9):.1f}  max {latency[-1] if latency else 0:.1f}",
            f"  admin commands {sum(load.admin.values())} ({admin_runs}); failed {len(load.admin_failures)}",
            *(f"  FAILED: {failure}" for failure in self.failures[:20]),
            f"  {'OK' if not self.failures else f'{len(self.failures)} FAILURES'}",
        ]


def _pct(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    return values[min(len(values) - 1, int(len(values) * p / 100))]


def _burn() -> None:
    while True:
        pass


async def _make_desks(url: str, count: int, hot: int) -> list[Desk]:
    conn = await asyncpg.connect(url)
    lease = await WorkerLease.acquire(url)
    try:
        ids = Snowflake(lease.worker)
        desks = []
        for i in range(count):
            subdomain = f"{'hot' if i < hot else 'desk'}{i}-{uuid.uuid4().hex[:6]}"
            made = await admin.create_desk(conn, ids, subdomain, None)
            token = await admin.create_token(conn, ids, subdomain, f"Stress {i}", ["tickets:create"])
            assert token.secret is not None
            desks.append(Desk(subdomain, int(made.id), token.secret, int(token.id), f"Stress {i}", i < hot))
        return desks
    finally:
        await lease.close()
        await conn.close()


async def _deadlocks(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        return int(await conn.fetchval("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"))
    finally:
        await conn.close()


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


async def run(
    server_url: str, scope: str, seconds: float, *, clients: int = 16, busy: int = 2, desks: int = 30, hot: int = 3,
    seed: int | None = None, log_dir: Path = Path("."), keep: bool = False, pool: int = 8,
    most: int = 1_000_000,
) -> Report:
    """One stress run under one statement scope, on a fresh database of the server at server_url."""
    name = f"headoni_stress_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    url = await cluster.create_database(server_url, name, migrated=True)
    burners: list[multiprocessing.Process] = []
    try:
        made = await _make_desks(url, desks, hot)
        deadlocks_before = await _deadlocks(url)
        burners = [multiprocessing.Process(target=_burn, daemon=True) for _ in range(busy)]
        for b in burners:
            b.start()
        log = log_dir / f"stress-{scope}-serve.log"
        # Two single-create statements of the one process racing each other, as those of two processes
        # do in a deployment of several (the default is 1 per process with any-desks statements).
        env = {"HEADONI_STATEMENT_SCOPE": scope, "HEADONI_POOL_MAX_SIZE": str(pool), "HEADONI_CREATE_STATEMENTS": "2"}
        access = log_dir / f"stress-{scope}-access.log"  # a line per request, by X-Request-Id (failures name theirs)
        srv = server.start(url, log, workers=1, env=env, access_log=access)
        try:
            clients_ = Clients(srv.base_url, url, made, seed if seed is not None else int(time.time()))
            load = await clients_.run(clients, seconds, most)
            with urllib.request.urlopen(srv.base_url + "/metrics", timeout=10) as response:
                metrics = response.read().decode()
            load_average = os.getloadavg()[0]
        finally:
            server.stop(srv)
        for b in burners:
            b.kill()
        conn = await asyncpg.connect(url)
        try:
            facts = await stored(conn, load, made)
        finally:
            await conn.close()
        failures: list[str] = answers(load) + facts.pop("failures") + load.admin_failures
        deadlocks = await _deadlocks(url) - deadlocks_before
        if deadlocks:
            failures.append(f"{deadlocks} deadlocks detected by the database")
        server_log = log.read_text(errors="replace")
        failures += [f"server log: {line[:200]}" for line in server_log.splitlines() if "Traceback" in line
                     or "deadlock" in line.lower()][:5]
        facts.update(
            desks=desks, hot=hot, clients=clients, busy=busy, load=load_average, deadlocks=deadlocks,
            aborted=_metric(metrics, "headoni_create_statements_aborted_total"),
            splits=_metric(metrics, "headoni_create_statements_split_total"),
            fivexx=sum(1 for c in load.calls if c.status == 0 or c.status >= 500),
        )
        if facts["aborted"]:
            failures.append(f"{facts['aborted']:g} create statements were aborted by the database and run again")
        return Report(scope, seconds, load, facts, failures)
    finally:
        for b in burners:
            b.kill()
        if not keep:
            await cluster.drop_database(server_url, name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.stress", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60.0, help="seconds of load per scope (60)")
    p.add_argument("--scopes", default=",".join(SCOPES), help="HEADONI_STATEMENT_SCOPE values to run (both)")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (16)")
    p.add_argument("--busy", type=int, default=os.cpu_count() or 2, help="busy processes for CPU contention (cores)")
    p.add_argument("--max-requests", type=int, default=1_000_000, help="stop after this many requests (1000000)")
    p.add_argument("--desks", type=int, default=30, help="desks (30)")
    p.add_argument("--hot", type=int, default=3, help="of which hot: half the load and all the admin changes (3)")
    p.add_argument("--seed", type=int, default=None, help="random seed (the time)")
    p.add_argument("--data-dir", type=Path, default=Path(".headoni-bench"), help="embedded PostgreSQL's home")
    p.add_argument("--keep-database", action="store_true", help="keep each run's database afterwards")
    args = p.parse_args(argv)
    server_url = os.environ.get("DATABASE_URL") or db.embedded_url(args.data_dir.resolve())
    log_dir = Path(__file__).resolve().parent / "results"
    log_dir.mkdir(parents=True, exist_ok=True)
    failed = False
    for scope in [s.strip() for s in args.scopes.split(",") if s.strip()]:
        report = asyncio.run(run(
            server_url, scope, args.seconds, clients=args.clients, busy=args.busy, desks=args.desks, hot=args.hot,
            seed=args.seed, log_dir=log_dir, keep=args.keep_database, most=args.max_requests,
        ))
        print("\n".join(report.lines()), flush=True)
        failed = failed or bool(report.failures)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
