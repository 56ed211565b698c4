"""The Headoni benchmark: `python -m bench` (see README, "Benchmark").

Starts PostgreSQL (embedded in ./.headoni-bench, or the server of DATABASE_URL), makes a fresh
database, migrates and pre-fills it, starts `headoni serve`, drives it with wrk, measures the ceilings
(pgbench on the service's own statement, and wrk on /healthz) in the same run, and prints one table
of medians. Results are saved as JSON in bench/results/.
"""

import argparse
import asyncio
import functools
import json
import os
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import asyncpg
import psutil  # type: ignore[import-untyped]

from app import db
from bench import bulk, cluster, diagnose, pgbench, prefill, profile, report, server, wrk
from bench.report import Row, Scenario

RESULTS = Path(__file__).resolve().parent / "results"
# Measured on the 2-core machine of the issue (README, "Benchmark"): 1 worker matched or beat 2 in
# paired runs, A and B alike; load generator and database need the other core, and coalescing of
# concurrent creates per desk happens within one process.
DEFAULT_WORKERS = 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3, help="runs of each scenario; the table shows medians (3)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds of each run (5)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load before the first run (2)")
    p.add_argument("--soak", type=float, default=60.0, help="seconds of the RSS soak at 32 connections; 0 skips (60)")
    p.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help=f"headoni serve --workers ({DEFAULT_WORKERS})")
    p.add_argument("--connections", default="8,32", help="connections of A, B and the ceilings (8,32)")
    p.add_argument("--batch-connections", type=int, default=8, help="connections of C, the batch route (8)")
    p.add_argument("--read-connections", type=int, default=32, help="connections of D, GET a ticket (32)")
    p.add_argument("--desks", type=int, default=100, help="desks pre-filled and spread over (100)")
    p.add_argument("--tickets", type=int, default=100_000, help="tickets pre-filled over the desks (100000)")
    p.add_argument("--only", default="", help="comma-separated scenario letters to run, e.g. A,B (all)")
    p.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (1: leave the cores to the server)")
    p.add_argument("--profile", type=float, default=0.0, help="py-spy the workers for this many seconds under A")
    p.add_argument("--diagnose", action="store_true", help="sample what the database waits for during A, E and B")
    p.add_argument("--data-dir", type=Path, default=Path(".headoni-bench"), help="embedded PostgreSQL's home")
    p.add_argument("--keep-database", action="store_true", help="keep the bench database afterwards")
    p.add_argument("--smoke", action="store_true", help="a few seconds of everything: proves the bench works")
    args = p.parse_args(argv)
    if args.smoke:
        args.runs, args.duration, args.warmup, args.soak = 1, 1.0, 0.0, 0.0
        args.tickets = min(args.tickets, 100 * args.desks)
    return args


def scenarios(args: argparse.Namespace, batch_items: int) -> list[Scenario]:
    conns = [int(c) for c in args.connections.split(",") if c.strip()]
    # The ceilings that bound the work (issue 16): a single create against the same server's trivial
    # request (H, GET /healthz), a batch against a bulk load of the same rows by COPY (L).
    out = [Scenario(f"A{c}", "A: POST /tickets, 100 desks", c, ceiling=f"H{c}") for c in conns]
    out += [Scenario(f"E{c}", "E: A on a new, empty database", c, ceiling=f"H{c}") for c in conns]
    out += [Scenario(f"B{c}", "B: POST /tickets, 1 hot desk", c, ceiling=f"H{c}") for c in conns]
    c = args.batch_connections
    out.append(Scenario(f"C{c}", f"C: POST /tickets/batch x{batch_items}", c, "tkt/s", f"L{c}", batch_items))
    out.append(Scenario(f"D{args.read_connections}", "D: GET /tickets/{number}", args.read_connections))
    out += [Scenario(f"H{c}", "H: HTTP ceiling, GET /healthz", c) for c in conns]
    out.append(Scenario(f"L{c}", f"L: bulk-load ceiling, COPY x{batch_items}", c, "tkt/s", None, batch_items))
    # pgbench running the service's own statement, one ticket a transaction: only when asked for (--only PA,PB).
    optional = [Scenario(f"PA{c}", "PA: pgbench statement, 100 desks", c, "tkt/s") for c in conns]
    optional += [Scenario(f"PB{c}", "PB: pgbench statement, 1 hot desk", c, "tkt/s") for c in conns]
    only = {s.strip().upper() for s in args.only.split(",") if s.strip()}
    out += [s for s in optional if s.key.rstrip("0123456789") in only]
    chosen = [s for s in out if not only or s.key.rstrip("0123456789") in only]
    ceilings = {s.ceiling for s in chosen}
    return [s for s in out if s in chosen or s.key in ceilings]


async def _database_facts(url: str) -> dict[str, str]:
    conn = await asyncpg.connect(url)
    try:
        names = ["server_version", "synchronous_commit", "fsync", "shared_buffers", "max_connections"]
        return {name: str(await conn.fetchval(f"SHOW {name}")) for name in names}
    finally:
        await conn.close()


async def _numbers_taken(url: str, checkpoint: bool = False) -> int:
    """The ticket numbers the desks have taken so far, to check that every success was written.
    With checkpoint, first write the dirty pages, so that each run starts from the same state."""
    conn = await asyncpg.connect(url)
    try:
        if checkpoint:
            try:
                await conn.execute("CHECKPOINT")
            except asyncpg.PostgresError:
                pass  # needs superuser or pg_checkpoint on a DATABASE_URL server; runs go on without it
        return int(await conn.fetchval("SELECT sum(last_number) FROM desk_counters"))
    finally:
        await conn.close()


def measure(s: Scenario, args: argparse.Namespace, ctx: dict[str, Any], seconds: float) -> wrk.Measure:
    fill: prefill.Fill = ctx["fill"]
    kind = s.key.rstrip("0123456789")
    if kind in ("PA", "PB"):
        hot = prefill.FIRST_DESK if kind == "PB" else None
        return pgbench.run_pgbench(pgbench.find_pgbench(), ctx["url"], s.connections, seconds, fill, hot)
    if kind == "E":
        return asyncio.run(_on_a_new_database(s, args, ctx, seconds))
    if kind == "L":
        return asyncio.run(bulk.run_copy(ctx["url"], s.connections, seconds, fill, s.per_request))
    if args.diagnose and kind in ("A", "B"):
        with diagnose.Sampler(ctx["url"]) as window:
            measured = _wrk(s, args, ctx, seconds)
        ctx["windows"].setdefault(s.key, []).append(window)
        return measured
    return _wrk(s, args, ctx, seconds)


def _wrk(s: Scenario, args: argparse.Namespace, ctx: dict[str, Any], seconds: float) -> wrk.Measure:
    fill: prefill.Fill = ctx["fill"]
    base: str = ctx["server"].base_url
    kind = s.key.rstrip("0123456789")
    mode, hot, path, items = {
        "A": ("create", False, "/", 0),
        "B": ("create", True, "/", 0),
        "C": ("batch", False, "/", s.per_request),
        "D": ("read", False, "/", 0),
        "H": ("plain", True, "/healthz", 0),  # one desk: its token is known to the server since the probe
    }[kind]
    return wrk.run_wrk(
        ctx["wrk"], base, mode, s.connections, seconds, fill, hot=hot, items=items, path=path, threads=args.wrk_threads
    )


async def _on_a_new_database(s: Scenario, args: argparse.Namespace, ctx: dict[str, Any], seconds: float) -> wrk.Measure:
    """Scenario A as a new deployment meets it: a freshly migrated database holding only the desks (their
    tables tiny, no statistics gathered yet), and a server just started on it. A new one for every run."""
    fill: prefill.Fill = ctx["fill"]
    name = f"{ctx['database']}_new"
    url = await cluster.create_database(ctx["server_url"], name, migrated=True)
    try:
        await prefill.fill(url, fill.desks, 0, fill.secret_prefix)
        srv = server.start(url, RESULTS / f"serve-{ctx['stamp']}-new.log", workers=args.workers)
        try:
            run = functools.partial(
                wrk.run_wrk, ctx["wrk"], srv.base_url, "create", s.connections, seconds, fill, threads=args.wrk_threads
            )
            if not args.diagnose:
                return await asyncio.to_thread(run)
            with diagnose.Sampler(url) as window:
                measured = await asyncio.to_thread(run)
            ctx["windows"].setdefault(s.key, []).append(window)
            return measured
        finally:
            server.stop(srv)
    finally:
        await cluster.drop_database(ctx["server_url"], name)


def probe(ctx: dict[str, Any], items: int) -> str | None:
    """Check one request of each kind; return why the batch scenario is skipped, or None."""
    fill: prefill.Fill = ctx["fill"]
    base: str = ctx["server"].base_url
    desk = prefill.FIRST_DESK
    headers = {"Host": fill.host(desk), "Authorization": f"Bearer {fill.secret(desk)}"}
    one = {"email": "probe@bench.example", "subject": "Probe", "body": "Probe ticket."}
    status, body = server.post(base + "/api/v1/tickets", json.dumps(one).encode(), headers)
    if status != 201:
        raise SystemExit(f"bench: a probe POST /api/v1/tickets answered {status}: {body[:300]!r}")
    batch = {"tickets": [{**one, "email": f"probe{i}@bench.example"} for i in range(items)]}
    status, body = server.post(base + "/api/v1/tickets/batch", json.dumps(batch).encode(), headers)
    if status in (404, 405):
        return f"the batch route answers {status} (not built yet)"
    if status != 200:
        return f"a probe batch answered {status}: {body[:200]!r}"
    statuses = [r.get("status") for r in json.loads(body).get("results", [])]
    if statuses != [201] * items:
        return f"a probe batch of {items} answered item statuses {sorted(set(map(str, statuses)))}"
    return None


def soak(args: argparse.Namespace, ctx: dict[str, Any], watch: server.MemoryWatch) -> dict[str, Any]:
    """A32 for args.soak seconds; RSS of each worker in the first and last fifth of it."""
    start = time.monotonic()
    measure(Scenario("A32", "soak", 32), args, ctx, args.soak)
    workers = {p.pid for p in ctx["server"].workers()}
    result: dict[str, Any] = {"seconds": args.soak, "workers": {}}
    grew = False
    span = time.monotonic() - start
    for pid, series in watch.series.items():
        points = [(t - start, rss) for t, rss in series if t >= start]
        if pid not in workers or len(points) < 10:
            continue
        first = statistics.median(r for t, r in points if t <= span / 5)
        last = statistics.median(r for t, r in points if t >= span * 4 / 5)
        growth = last - first
        # Allocator noise is a few MB; growth beyond 4 MB and 3% over one minute is a leak to look at.
        worker_grew = growth > max(4 * 2**20, 0.03 * first)
        grew = grew or worker_grew
        result["workers"][pid] = {"first_fifth_mb": first / 2**20, "last_fifth_mb": last / 2**20, "grew": worker_grew}
    result["grew"] = grew
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    ctx: dict[str, Any] = {"wrk": wrk.ensure_wrk(), "windows": {}}
    server_url = os.environ.get("DATABASE_URL") or db.embedded_url(args.data_dir.resolve())
    name = f"headoni_bench_{os.getpid()}"
    print(f"bench: fresh database {name}; pre-filling {args.tickets:,} tickets over {args.desks} desks", flush=True)
    asyncio.run(_drop_stale(server_url))
    ctx["url"] = url = asyncio.run(cluster.create_database(server_url, name, migrated=True))
    ctx.update(server_url=server_url, database=name, stamp=stamp)
    try:
        ctx["fill"] = asyncio.run(prefill.fill(url, args.desks, args.tickets))
        facts = report.machine(asyncio.run(_database_facts(url)))
        print(f"bench: pre-filled in {time.monotonic() - started:.1f} s; starting headoni serve --workers "
              f"{args.workers}", flush=True)
        ctx["server"] = srv = server.start(url, RESULTS / f"serve-{stamp}.log", workers=args.workers)
        try:
            with server.MemoryWatch(srv) as watch:
                outcome = _measure_all(args, ctx, watch, stamp)
        finally:
            server.stop(srv)
    finally:
        if not args.keep_database:
            asyncio.run(cluster.drop_database(server_url, name))
    rows: dict[str, Row] = outcome["rows"]
    facts["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    _print(args, facts, outcome, watch)
    saved = RESULTS / f"bench-{stamp}.json"
    saved.write_text(json.dumps(_json(args, facts, outcome, watch), indent=2) + "\n")
    print(f"\nsaved {saved.relative_to(Path.cwd()) if saved.is_relative_to(Path.cwd()) else saved}"
          f" ({time.monotonic() - started:.0f} s in all)")
    return 1 if any(r.errors for r in rows.values() if r.runs) and args.smoke else 0


def _measure_all(args: argparse.Namespace, ctx: dict[str, Any], watch: server.MemoryWatch, stamp: str) -> Any:
    items = 100
    plan = scenarios(args, items)
    rows = {s.key: Row(s) for s in plan}
    skip_batch = probe(ctx, items)
    if args.warmup:
        measure(Scenario("A32", "warm-up", 32), args, ctx, args.warmup)
    for run in range(1, args.runs + 1):
        for s in plan:
            if s.key.startswith("C") and skip_batch:
                rows[s.key].note = skip_batch
                continue
            before = asyncio.run(_numbers_taken(ctx["url"], checkpoint=True))
            m = measure(s, args, ctx, args.duration)
            written = asyncio.run(_numbers_taken(ctx["url"])) - before
            rows[s.key].runs.append(m)
            if s.key[0] in "ABCLP" and written < (m.requests - m.errors) * s.per_request:  # E's is dropped
                print(f"bench: WARNING: {s.key} answered {m.requests - m.errors} requests without error but the"
                      f" desks' counters moved by only {written}", flush=True)
            print(f"  run {run}/{args.runs} {s.key:<5} {m.rate * s.per_request:>9,.0f} {s.unit:<5}"
                  f" p50 {m.p50_ms:6.2f}  p99 {m.p99_ms:7.2f}  p99.9 {m.p999_ms:7.2f}  max {m.max_ms:7.1f} ms"
                  f"  errors {m.errors}", flush=True)
    profile_lines: list[str] = []
    if args.profile:
        conns = max(int(c) for c in args.connections.split(","))
        print(f"bench: py-spy on the workers for {args.profile:.0f} s under A at {conns} connections", flush=True)
        spies = profile.start(ctx["server"], args.profile, RESULTS, stamp)
        measure(Scenario(f"A{conns}", "profile", conns), args, ctx, args.profile)
        profile_lines = profile.summarize(profile.finish(spies, args.profile))
    soaked = soak(args, ctx, watch) if args.soak else None
    return {"rows": rows, "soak": soaked, "profile": profile_lines, "windows": ctx["windows"]}


def _print(args: argparse.Namespace, facts: dict[str, Any], outcome: dict[str, Any], watch: server.MemoryWatch) -> None:
    rows: dict[str, Row] = outcome["rows"]
    print(f"\nHeadoni bench: medians of {args.runs} run(s) of {args.duration:g} s; headoni serve --workers "
          f"{args.workers}; wrk -t{args.wrk_threads}; {args.tickets:,} tickets pre-filled over {args.desks} desks")
    print(f"machine: {facts['cores']} cores ({facts['cpu']}), PostgreSQL {facts['server_version']}, "
          f"synchronous_commit={facts['synchronous_commit']}, fsync={facts['fsync']}, "
          f"load average {facts['load_average_at_start'][0]} at start, {facts['load_average_at_end'][0]} at end")
    print("rates: req/s, or tickets/s (tkt/s); errors: responses >= 400 and socket errors (wrk), failed (pgbench)\n")
    print("\n".join(report.table(rows)))
    print("\npeak RSS: " + ", ".join(f"{role} {pid} {rss / 2**20:.0f} MB" for pid, (role, rss) in watch.peak.items()))
    soaked = outcome["soak"]
    if soaked:
        per = ", ".join(f"worker {pid} {w['first_fifth_mb']:.0f} -> {w['last_fifth_mb']:.0f} MB"
                        for pid, w in soaked["workers"].items())
        print(f"soak {soaked['seconds']:.0f} s at 32 connections: {'GREW' if soaked['grew'] else 'flat'} ({per})")
    if outcome["profile"]:
        print("\npy-spy profile of the workers under A:\n" + "\n".join(outcome["profile"]))
    if outcome["windows"]:
        print("\nwhat the database did during each run (--diagnose):")
        for key, windows in outcome["windows"].items():
            for n, window in enumerate(windows, 1):
                print(f"  {key} run {n}:")
                print("\n".join(window.lines()))
    print("\ntargets (issues 10 and 16):")
    print("\n".join(report.targets(rows, soaked["grew"] if soaked else None)))


def _json(args: argparse.Namespace, facts: dict[str, Any], outcome: dict[str, Any], watch: server.MemoryWatch) -> Any:
    rows: dict[str, Row] = outcome["rows"]
    return {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": facts,
        "scenarios": [
            {
                **asdict(r.scenario), "rate": r.rate, "p50_ms": r.p50, "p99_ms": r.p99, "p999_ms": r.p999,
                "max_ms": r.max, "errors": r.errors,
                "ratio_to_db_ceiling": report.ratio(r, rows), "note": r.note,
                "runs": [{**asdict(m), "rate": m.rate} for m in r.runs],
            }
            for r in rows.values()
        ],
        "peak_rss_mb": {str(pid): {"role": role, "mb": rss / 2**20} for pid, (role, rss) in watch.peak.items()},
        "soak": outcome["soak"],
        "profile": outcome["profile"],
    }


async def _drop_stale(server_url: str) -> None:
    """Drop bench databases left by runs that were killed (their process is gone)."""
    conn = await asyncpg.connect(server_url)
    try:
        names = await conn.fetch("SELECT datname FROM pg_database WHERE datname LIKE 'headoni_bench_%'")
        for (dbname,) in names:
            pid = dbname.rsplit("_", 1)[-1]
            if pid.isdigit() and not psutil.pid_exists(int(pid)):
                await conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
    finally:
        await conn.close()
