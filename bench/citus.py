"""The service on one PostgreSQL and on a Citus cluster, in one run: `python -m bench.citus`.

Each target gets a fresh database, pre-filled (bench/prefill.py) and served by `headoni serve`; wrk drives
creates spread over 100 desks (A) and on one hot desk (B), in alternating runs. Printed for each: req/s,
p50 and p99 (medians of the runs), how many tickets one create statement carried on the hot desk (its
tickets per transaction), and, on Citus, how the desks and their load spread over the workers
(citus_shards, citus_stat_tenants). DATABASE_URL names the Citus coordinator's database (`--citus`); the
one PostgreSQL is the bench's embedded one. See docs/scaling.md.
"""

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import asyncpg

from app import db
from bench import cluster, prefill, server, wrk

RESULTS = Path(__file__).resolve().parent / "results"

_SHARED = """
SELECT count(*) AS tickets, count(DISTINCT xmin::text) AS statements FROM tickets
WHERE desk_id = $1 AND number > $2
"""
_DESKS_PER_NODE = """
SELECT s.nodename || ':' || s.nodeport AS node, count(*) AS desks FROM desks d
JOIN citus_shards s ON s.table_name = 'desk_counters'::regclass
 AND s.shardid = get_shard_id_for_distribution_column('desk_counters', d.desk_id)
GROUP BY 1 ORDER BY 1
"""
_SHARDS_PER_NODE = """
SELECT nodename || ':' || nodeport AS node, count(*) AS shards, pg_size_pretty(sum(shard_size)) AS size
FROM citus_shards WHERE table_name = 'tickets'::regclass GROUP BY 1 ORDER BY 1
"""
_TENANTS_PER_NODE = """
SELECT n.nodename || ':' || n.nodeport AS node, count(*) AS busy_desks,
       sum(t.query_count_in_this_period + t.query_count_in_last_period) AS queries
FROM citus_stat_tenants t JOIN pg_dist_node n USING (nodeid) GROUP BY 1 ORDER BY 1
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.citus", description=__doc__.split("\n\n")[0])
    p.add_argument("--citus", default=os.environ.get("DATABASE_URL"), help="a database of the coordinator")
    p.add_argument("--runs", type=int, default=3, help="runs of each scenario, alternating targets (3)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds of each run (5)")
    p.add_argument("--connections", type=int, default=32, help="wrk connections (32)")
    p.add_argument("--statements", default="2,8", help="HEADONI_CREATE_STATEMENTS values to run Citus with (2,8)")
    p.add_argument("--tickets", type=int, default=20_000, help="tickets pre-filled over 100 desks (20000)")
    args = p.parse_args(argv)
    if not args.citus:
        p.error("name the Citus coordinator's database with --citus or DATABASE_URL")
    return args


async def _one(url: str, query: str, *args: Any) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(url)
    try:
        return [dict(r) for r in await conn.fetch(query, *args)]
    finally:
        await conn.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    wrk_bin = wrk.ensure_wrk()
    plain_server = db.embedded_url(Path(".headoni-bench").resolve())
    name = f"headoni_bench_citus_{os.getpid()}"
    # (label, server, HEADONI_CREATE_STATEMENTS, HEADONI_STATEMENT_SCOPE); on Citus the scope is left
    # unset, as a reader would (the service then writes one desk per statement, app/citus.py).
    targets = [("one PostgreSQL, any-desks, 2", plain_server, "2", "any-desks"),
               ("one PostgreSQL, one-desk, 2", plain_server, "2", "one-desk")]
    targets += [(f"Citus, {n} statements", args.citus, n, "") for n in args.statements.split(",")]
    prepared: dict[str, tuple[str, prefill.Fill]] = {}
    try:
        for _, server_url, _, _ in targets:
            if server_url not in prepared:
                url = asyncio.run(cluster.create_database(server_url, name, migrated=True))
                prepared[server_url] = (url, asyncio.run(prefill.fill(url, 100, args.tickets)))
        results: dict[str, dict[str, Any]] = {label: {"A": [], "B": []} for label, *_ in targets}
        citus_url = prepared[args.citus][0]
        # Citus counts queries per tenant (desk) only when asked to; the servers' sessions start after this.
        asyncio.run(_one(citus_url, f"ALTER DATABASE {name} SET citus.stat_tenants_track = 'all'"))
        asyncio.run(_one(citus_url, "SELECT citus_stat_tenants_reset()"))
        for run in range(args.runs):
            for label, server_url, statements, scope in targets:
                url, fill = prepared[server_url]
                log = RESULTS / f"citus-serve-{stamp}.log"
                srv = server.start(url, log, workers=1, env={"HEADONI_CREATE_STATEMENTS": statements,
                                                               "HEADONI_STATEMENT_SCOPE": scope})
                try:
                    for kind, hot in (("A", False), ("B", True)):
                        before = asyncio.run(_one(url, "SELECT last_number FROM desk_counters WHERE desk_id = $1",
                                                  prefill.FIRST_DESK))[0]["last_number"]
                        m = wrk.run_wrk(wrk_bin, srv.base_url, "create", args.connections, args.duration, fill, hot=hot)
                        entry: dict[str, Any] = {"rate": m.rate, "p50_ms": m.p50_ms, "p99_ms": m.p99_ms,
                                                 "errors": m.errors}
                        if hot:
                            entry.update(asyncio.run(_one(url, _SHARED, prefill.FIRST_DESK, before))[0])
                        results[label][kind].append(entry)
                        print(f"  run {run + 1}/{args.runs} {label:30} {kind} {m.rate:8,.0f} req/s p50 {m.p50_ms:6.2f}"
                              f" ms p99 {m.p99_ms:7.2f} ms errors {m.errors}", flush=True)
                finally:
                    server.stop(srv)
        spread = {name: asyncio.run(_one(citus_url, query))
                  for name, query in (("desks", _DESKS_PER_NODE), ("tickets shards", _SHARDS_PER_NODE),
                                      ("tenants", _TENANTS_PER_NODE))}
    finally:
        for server_url in prepared:
            asyncio.run(cluster.drop_database(server_url, name))
    summary = _summary(results)
    _print(args, summary, spread)
    saved = RESULTS / f"citus-{stamp}.json"
    facts = {"args": vars(args) | {"citus": db.redacted(args.citus)}, "load_average": os.getloadavg()}
    saved.write_text(json.dumps({**facts, "runs": results, "summary": summary, "spread": spread},
                                indent=2, default=str) + "\n")
    print(f"\nsaved {saved}")
    return 0


def _summary(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for label, kinds in results.items():
        for kind, runs in kinds.items():
            row = {k: statistics.median(r[k] for r in runs) for k in ("rate", "p50_ms", "p99_ms")}
            row["errors"] = sum(r["errors"] for r in runs)
            if kind == "B":
                statements = sum(r["statements"] for r in runs)
                row["tickets_per_statement"] = sum(r["tickets"] for r in runs) / max(1, statements)
            out[f"{label} / {kind}"] = row
    return out


def _print(args: argparse.Namespace, summary: dict[str, dict[str, Any]], spread: dict[str, Any]) -> None:
    print(f"\nmedians of {args.runs} runs of {args.duration:g} s, {args.connections} connections,"
          f" load average {os.getloadavg()[0]:.1f}")
    print(f"{'target / scenario':44} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'tickets/stmt':>13}")
    for key, row in summary.items():
        shared = f"{row['tickets_per_statement']:.2f}" if "tickets_per_statement" in row else ""
        print(f"{key:44} {row['rate']:8,.0f} {row['p50_ms']:8.2f} {row['p99_ms']:8.2f} {row['errors']:7}"
              f" {shared:>13}")
    for name, rows in spread.items():
        print(f"\nCitus, {name} per node: " + "; ".join(", ".join(f"{k} {v}" for k, v in r.items()) for r in rows))


if __name__ == "__main__":
    raise SystemExit(main())
