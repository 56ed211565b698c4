"""Limits and fairness, measured: `python -m bench.fair` (docs/limits.md has the latest results).

F: desk X floods POST /api/v1/tickets with 64 connections while desk Y sends at 1 connection. Each
run measures, one after the other on one server: Y alone; Y beside X's flood with X unlimited (the
service without its limits: no token has one); Y beside X's flood with X limited (its token's rate,
--x-rate). X's answers are counted by status, with their latency: fast 429s or fast 503s, never timeouts.
A (cost): scenario A (POST over 100 desks, 32 connections) with every token limited high enough never
to trigger (--cost-rate) and with no limits, alternately on one server.
L (accuracy): `headoni serve --workers 2`, a client at 3x its token's limit for --accuracy-seconds
on 8 connections; it should get burst + rate x time within 10%.
Medians of --runs runs; the load average is printed with each phase, as the machine may be shared.
"""

import argparse
import asyncio
import json
import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from app import db
from app.rates import Limit, parse_rate
from bench import cluster, prefill, server, wrk
from bench.prefill import FIRST_DESK, Fill

RESULTS = Path(__file__).resolve().parent / "results"
X, Y, Z = FIRST_DESK, FIRST_DESK + 1, FIRST_DESK + 2  # the flooding desk, the other desk, the accuracy desk


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.fair", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3, help="runs of each phase; medians are shown (3)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of each phase (10)")
    p.add_argument("--only", default="F,A,L", help="which of F, A, L to run (F,A,L)")
    p.add_argument("--x-rate", default="600/min", help="X's token limit in F (600/min, burst 100)")
    p.add_argument("--cost-rate", default="6000/min", help="every token's limit in A's limited runs (6000/min)")
    p.add_argument("--accuracy-rate", default="600/min", help="the token limit in L (600/min, burst 100)")
    p.add_argument("--accuracy-seconds", type=float, default=60.0, help="seconds of L (60)")
    p.add_argument("--desks", type=int, default=100)
    p.add_argument("--tickets", type=int, default=20_000, help="tickets pre-filled over the desks (20000)")
    p.add_argument("--data-dir", type=Path, default=Path(".headoni-bench"))
    p.add_argument("--smoke", action="store_true", help="seconds of everything: proves the bench works")
    args = p.parse_args(argv)
    if args.smoke:
        args.runs, args.duration, args.accuracy_seconds, args.tickets = 1, 2.0, 5.0, 1000
    return args


def load() -> str:
    return "load " + "/".join(f"{x:.1f}" for x in os.getloadavg())


def fmt(m: wrk.Measure) -> str:
    return (f"{m.rate:8,.0f} req/s  p50 {m.p50_ms:7.2f}  p99 {m.p99_ms:7.2f}  p99.9 {m.p999_ms:7.2f}"
            f"  max {m.max_ms:7.1f} ms  errors {m.errors}")


async def set_limits(url: str, desks: list[int], limit: Limit | None) -> None:
    """Give the desks' bench tokens (token id = desk id) a limit, or none; the servers' token caches
    (1 s) pick it up."""
    conn = await asyncpg.connect(url)
    try:
        units, seconds, burst = (limit.units, limit.seconds, limit.burst) if limit else (None, None, None)
        await conn.execute(
            "UPDATE api_tokens SET rate_units = $2, rate_seconds = $3, rate_burst = $4 WHERE desk_id = ANY($1)",
            desks, units, seconds, burst,
        )
    finally:
        await conn.close()
    time.sleep(1.5)


async def leases(url: str) -> int:
    """Rate-limit leases so far: updates of bucket rows (the statistics lag by up to half a second)."""
    conn = await asyncpg.connect(url)
    try:
        await asyncio.sleep(0.6)
        found = await conn.fetchval("SELECT n_tup_upd FROM pg_stat_user_tables WHERE relname = 'rate_limit_buckets'")
        return int(found or 0)
    finally:
        await conn.close()


def median_measure(runs: list[wrk.Measure]) -> wrk.Measure:
    def med(get: Callable[[wrk.Measure], float]) -> float:
        return statistics.median(get(m) for m in runs)

    statuses: dict[str, int] = {}
    for m in runs:
        for k, v in m.statuses.items():
            statuses[k] = statuses.get(k, 0) + v
    return wrk.Measure(
        int(med(lambda m: m.requests)), med(lambda m: m.seconds), med(lambda m: m.p50_ms), med(lambda m: m.p99_ms),
        int(med(lambda m: m.errors)), med(lambda m: m.p999_ms), med(lambda m: m.max_ms), statuses,
    )


def scenario_f(args: argparse.Namespace, ctx: dict[str, Any]) -> dict[str, Any]:
    fill: Fill = ctx["fill"]
    base = ctx["server"].base_url
    x_limit = parse_rate(args.x_rate)

    def y_run(seconds: float) -> wrk.Measure:
        return wrk.run_wrk(ctx["wrk"], base, "create", 1, seconds, fill, first_desk=Y)

    def x_run(seconds: float) -> wrk.Measure:
        return wrk.run_wrk(ctx["wrk"], base, "create", 64, seconds, fill, first_desk=X, count_statuses=True)

    def beside_flood() -> tuple[wrk.Measure, wrk.Measure]:
        with ThreadPoolExecutor(2) as pool:
            flood = pool.submit(x_run, args.duration + 2)
            time.sleep(1.0)  # X's flood is under way before Y is measured
            measured = y_run(args.duration)
            return measured, flood.result()

    phases: dict[str, list[wrk.Measure]] = {"alone": [], "flood_unlimited": [], "flood_limited": []}
    floods: dict[str, list[wrk.Measure]] = {"flood_unlimited": [], "flood_limited": []}
    for run in range(1, args.runs + 1):
        asyncio.run(set_limits(ctx["url"], [X], None))
        m = y_run(args.duration)
        phases["alone"].append(m)
        print(f"  F run {run}: Y alone                 {fmt(m)}  ({load()})", flush=True)
        for phase, limit in (("flood_unlimited", None), ("flood_limited", x_limit)):
            asyncio.run(set_limits(ctx["url"], [X], limit))
            y, x = beside_flood()
            phases[phase].append(y)
            floods[phase].append(x)
            which = "limited  " if limit else "unlimited"
            print(f"  F run {run}: Y beside X, X {which} {fmt(y)}  ({load()})", flush=True)
            print(f"           X (64 conns)             {fmt(x)}  statuses {x.statuses}", flush=True)
    asyncio.run(set_limits(ctx["url"], [X], None))
    result = {k: median_measure(v) for k, v in phases.items()}
    flood = {k: median_measure(v) for k, v in floods.items()}
    alone = result["alone"].p99_ms
    print(f"\nF (medians of {args.runs}): Y's p99 alone {alone:.2f} ms; beside X's flood with X unlimited "
          f"{result['flood_unlimited'].p99_ms:.2f} ms ({result['flood_unlimited'].p99_ms / alone:.1f}x), with X "
          f"limited to {args.x_rate} {result['flood_limited'].p99_ms:.2f} ms "
          f"({result['flood_limited'].p99_ms / alone:.1f}x; target <= 2x); Y's errors "
          f"{result['flood_limited'].errors}")
    paired = {k: statistics.median(f.p99_ms / a.p99_ms for f, a in zip(phases[k], phases["alone"], strict=True))
              for k in ("flood_unlimited", "flood_limited")}
    print(f"  each run's Y p99 beside the flood / alone, median: X unlimited {paired['flood_unlimited']:.1f}x, "
          f"X limited {paired['flood_limited']:.1f}x")
    x = flood["flood_limited"]
    print(f"  X limited: p50 {x.p50_ms:.2f} ms, p99 {x.p99_ms:.2f} ms, max {x.max_ms:.1f} ms, statuses over all "
          f"runs {x.statuses}; X unlimited: p99 {flood['flood_unlimited'].p99_ms:.2f} ms, statuses "
          f"{flood['flood_unlimited'].statuses}")
    return {"y": {k: vars(v) for k, v in result.items()}, "x": {k: vars(v) for k, v in flood.items()}}


def scenario_a(args: argparse.Namespace, ctx: dict[str, Any]) -> dict[str, Any]:
    fill: Fill = ctx["fill"]
    limit = parse_rate(args.cost_rate)
    desks = list(range(FIRST_DESK, fill.last_desk + 1))
    runs: dict[str, list[wrk.Measure]] = {"off": [], "on": []}
    for run in range(1, args.runs + 1):
        for phase in ("off", "on") if run % 2 else ("on", "off"):
            asyncio.run(set_limits(ctx["url"], desks, limit if phase == "on" else None))
            before = asyncio.run(leases(ctx["url"]))
            m = wrk.run_wrk(ctx["wrk"], ctx["server"].base_url, "create", 32, args.duration, fill,
                            count_statuses=True)
            runs[phase].append(m)
            leased = (asyncio.run(leases(ctx["url"])) - before) / m.seconds
            print(f"  A run {run}: limits {phase:<3}  {fmt(m)}  statuses {m.statuses}  leases {leased:.0f}/s"
                  f"  ({load()})", flush=True)
    asyncio.run(set_limits(ctx["url"], desks, None))
    off, on = (statistics.median(m.rate for m in runs[k]) for k in ("off", "on"))
    limited = sum(m.statuses.get("429", 0) for m in runs["on"])
    # Each run's two phases ran back to back: their ratio is the least exposed to the machine's load swings.
    paired = statistics.median(a.rate / b.rate for a, b in zip(runs["on"], runs["off"], strict=True))
    print(f"\nA (medians of {args.runs}): limits off {off:,.0f} req/s, on ({args.cost_rate} per token, never "
          f"reached: {limited} answers 429) {on:,.0f} req/s: {on / off:.3f}x; median of each run's on/off "
          f"{paired:.3f}x (target >= 0.95x)")
    return {"off": [vars(m) for m in runs["off"]], "on": [vars(m) for m in runs["on"]], "ratio": on / off,
            "paired_ratio": paired}


async def _paced(base: str, fill: Fill, per_second: float, seconds: float) -> tuple[list[int], float]:
    """Send at per_second for seconds; the statuses, and the seconds from the first send to the last answer."""
    clients = [httpx.AsyncClient(base_url=base, timeout=10) for _ in range(8)]
    headers = {"Host": fill.host(Z), "Authorization": f"Bearer {fill.secret(Z)}"}
    start = time.monotonic()

    async def send(i: int) -> int:
        await asyncio.sleep(max(0.0, start + i / per_second - time.monotonic()))
        body = {"email": f"acc{i}x{os.getpid()}@bench.example", "subject": "Accuracy", "body": "Paced."}
        try:
            response = await clients[i % len(clients)].post("/api/v1/tickets", json=body, headers=headers)
        except httpx.HTTPError:
            return 0
        return response.status_code

    try:
        statuses = list(await asyncio.gather(*(send(i) for i in range(int(per_second * seconds)))))
        return statuses, time.monotonic() - start
    finally:
        for client in clients:
            await client.aclose()


def scenario_l(args: argparse.Namespace, ctx: dict[str, Any]) -> dict[str, Any]:
    fill: Fill = ctx["fill"]
    limit = parse_rate(args.accuracy_rate)
    asyncio.run(set_limits(ctx["url"], [Z], limit))
    srv = server.start(ctx["url"], RESULTS / f"fair-{ctx['stamp']}-workers2.log", workers=2)
    try:
        per_second = 3 * limit.units / limit.seconds
        print(f"  L: 2 workers, a client at {per_second:g}/s (3x {args.accuracy_rate}) for "
              f"{args.accuracy_seconds:g} s ({load()})", flush=True)
        statuses, span = asyncio.run(_paced(srv.base_url, fill, per_second, args.accuracy_seconds))
    finally:
        server.stop(srv)
    asyncio.run(set_limits(ctx["url"], [Z], None))
    got = statuses.count(201)
    expected = limit.burst + limit.units / limit.seconds * span
    other = {s: statuses.count(s) for s in set(statuses) if s not in (201, 429)}
    print(f"\nL: {got} created of {len(statuses)} sent over {span:.1f} s; expected burst + rate x time = "
          f"{expected:.0f}: "
          f"{(got - expected) / expected:+.1%} (target within 10%); answers other than 201/429: {other} ({load()})")
    return {"created": got, "sent": len(statuses), "seconds": span, "expected": expected, "other": other}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    only = {s.strip().upper() for s in args.only.split(",")}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    server_url = os.environ.get("DATABASE_URL") or db.embedded_url(args.data_dir.resolve())
    name = f"headoni_fair_{os.getpid()}"
    ctx: dict[str, Any] = {"wrk": wrk.ensure_wrk(), "stamp": stamp}
    print(f"bench.fair: fresh database {name}; {args.tickets:,} tickets over {args.desks} desks ({load()})", flush=True)
    ctx["url"] = url = asyncio.run(cluster.create_database(server_url, name, migrated=True))
    results: dict[str, Any] = {}
    try:
        ctx["fill"] = asyncio.run(prefill.fill(url, args.desks, args.tickets))
        if only & {"F", "A"}:
            ctx["server"] = srv = server.start(url, RESULTS / f"fair-{stamp}.log", workers=1)
            try:
                if "F" in only:
                    results["F"] = scenario_f(args, ctx)
                if "A" in only:
                    results["A"] = scenario_a(args, ctx)
            finally:
                server.stop(srv)
        if "L" in only:
            results["L"] = scenario_l(args, ctx)
    finally:
        asyncio.run(cluster.drop_database(server_url, name))
    saved = RESULTS / f"fair-{stamp}.json"
    saved.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2))
    print(f"\nbench.fair: done ({load()}); saved {saved}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
