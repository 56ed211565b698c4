"""Variants of the create statement, straight on PostgreSQL: `python -m bench.variants` (docs/benchmark.md,
"Levers weighed").

Each variant writes the same items as the service's statement (sql/queries.sql, create_for_any_desks)
does, another way: `--connections` connections each run statements of `--items` new tickets (of one
desk, or with `--spread` of every desk) for `--seconds`, the variants taking turns in each of `--rounds`
rounds (in reverse order every other round). It prints each run and the medians: tickets a second, the
CPU of the connections' own PostgreSQL backends per ticket (which needs the server on this machine), and
this process's own (asyncpg, and making the items). No HTTP and no service: what one statement costs
against another.
"""

import argparse
import asyncio
import itertools
import os
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import asyncpg
import psutil  # type: ignore[import-untyped]

from app import db, statement
from app.auth import Token
from app.statement import Entry
from app.validation import NewTicket
from bench import cluster, prefill
from bench.bulk import BODY
from bench.cpu import cpu_seconds

_IDS: Final = itertools.count((1 << 61) + os.getpid() * 10_000_000)  # past anything the service mints soon
_SESSION: Final = {"plan_cache_mode": "force_generic_plan", "timezone": "UTC"}  # as app/db.py's pool
_ITEM_COLUMNS: Final = ("desk_id", "token_id", "channel", "email", "domain", "name", "subject", "body", "priority",
                        "department_id", "ticket_type_id", "user_id", "ticket_id", "message_id", "event_id", "ord")
_ITEM_TABLE: Final = (
    "CREATE TEMP TABLE IF NOT EXISTS create_item (desk_id bigint, token_id bigint, channel text, email text, "
    "domain text, name text, subject text, body text, priority text, department_id bigint, ticket_type_id bigint, "
    "user_id bigint, ticket_id bigint, message_id bigint, event_id bigint, ord bigint) ON COMMIT DELETE ROWS"
)


def _swap(text: str, old: str, new: str) -> str:
    """text with its one `old` replaced: a variant no longer made when the statement changes shape."""
    if text.count(old) != 1:
        raise ValueError(f"the create statement no longer has one {old[:40]!r}")
    return text.replace(old, new)


def _section(text: str, start: str, end: str) -> str:
    """The part of text from `start` up to `end`."""
    return start + _swap(text, start, "\0").split("\0")[1].split(end)[0]


STATEMENT: Final = statement.CREATE_FOR_ANY_DESKS
INLINE_COUNT: Final = _swap(STATEMENT, "users_written AS MATERIALIZED (", "users_written AS (")
JOINS: Final = _swap(STATEMENT, _section(STATEMENT, "), resolved AS (", "), accepted AS ("), """), resolved AS (
    SELECT i.*, d.department_id AS found_department, y.ticket_type_id AS found_type,
           EXISTS (SELECT 1 FROM blocklist_entries b
                   WHERE b.desk_id = i.desk_id AND b.entry IN (i.email, i.domain)) AS blocked
    FROM item i
    LEFT JOIN departments dd ON i.department_id IS NULL AND dd.desk_id = i.desk_id AND dd.is_default
    LEFT JOIN departments d ON d.desk_id = i.desk_id AND d.deleted_at IS NULL
                           AND d.department_id = coalesce(i.department_id, dd.department_id)
    LEFT JOIN ticket_types yy ON i.ticket_type_id IS NULL AND yy.desk_id = i.desk_id AND yy.is_default
    LEFT JOIN ticket_types y ON y.desk_id = i.desk_id AND y.archived_at IS NULL
                           AND y.ticket_type_id = coalesce(i.ticket_type_id, yy.ticket_type_id)
""")
SET_LOCK: Final = _swap(STATEMENT, _section(STATEMENT, "), counter AS (", "), ticket AS ("), """), locked AS (
    SELECT c.desk_id FROM desk_counters c
    WHERE c.desk_id = ANY ((SELECT array_agg(desk_id) FROM taken)::bigint[])
    ORDER BY c.desk_id FOR NO KEY UPDATE
), counter AS (
    UPDATE desk_counters c SET last_number = c.last_number + t.n
    FROM taken t WHERE c.desk_id = t.desk_id AND (SELECT count(*) FROM locked) = (SELECT count(*) FROM taken)
    RETURNING c.desk_id, c.last_number - t.n AS base
""")
TEMP_COPY: Final = _swap(STATEMENT, _section(STATEMENT, "), item AS (", "), resolved AS ("), """), item AS (
    SELECT * FROM create_item i WHERE NOT EXISTS (SELECT 1 FROM existing)
""")
# Everything up to the counters, then the numbers, requesters, departments and types of the created items
# in item order, for the client to COPY their tickets, messages and events.
NUMBERING: Final = STATEMENT.split("), ticket AS (")[0] + """), made AS (
    SELECT coalesce(array_agg(c.base + r.seq ORDER BY r.ord), '{}') AS numbers,
           coalesce(array_agg(r.requester_id ORDER BY r.ord), '{}') AS requesters,
           coalesce(array_agg(r.found_department ORDER BY r.ord), '{}') AS departments,
           coalesce(array_agg(r.found_type ORDER BY r.ord), '{}') AS types,
           coalesce(array_agg(r.ord ORDER BY r.ord), '{}') AS ords
    FROM ready r JOIN counter c USING (desk_id)
)
SELECT numbers, requesters, departments, types, ords, $4::text AS route, $5::text AS fingerprint FROM made
"""

Run = Callable[[asyncpg.Connection, list[Entry], tuple[Any, ...]], Awaitable[list[int]]]


async def _plain(text: str, conn: asyncpg.Connection, entries: list[Entry], args: tuple[Any, ...]) -> list[int]:
    numbers: list[int] = (await conn.fetchrow(text, *args))["numbers"]
    return numbers


async def _temp_copy(conn: asyncpg.Connection, entries: list[Entry], args: tuple[Any, ...]) -> list[int]:
    async with conn.transaction():
        await conn.copy_records_to_table("create_item", columns=_ITEM_COLUMNS,
                                         records=list(zip(*args[5:], range(1, len(entries) + 1), strict=True)))
        return await _plain(TEMP_COPY, conn, entries, args[:5])


async def _copy_rows(conn: asyncpg.Connection, entries: list[Entry], args: tuple[Any, ...]) -> list[int]:
    async with conn.transaction():
        row = await conn.fetchrow(NUMBERING, *args)
        tickets, messages, events = [], [], []
        for number, requester, department, ticket_type, ord_ in zip(
            row["numbers"], row["requesters"], row["departments"], row["types"], row["ords"], strict=True
        ):
            (token, item), at = entries[ord_ - 1], ord_ - 1
            ticket_id, message_id, event_id = args[17][at], args[18][at], args[19][at]
            tickets.append((token.desk_id, ticket_id, number, item.subject, item.priority, "api", requester,
                            department, ticket_type))
            messages.append((token.desk_id, message_id, ticket_id, requester, item.body, True))
            events.append((token.desk_id, event_id, ticket_id, "ticket.created", token.channel, token.token_id))
        await conn.copy_records_to_table("tickets", columns=["desk_id", "ticket_id", "number", "subject", "priority",
                                         "channel", "requester_id", "department_id", "ticket_type_id"], records=tickets)
        await conn.copy_records_to_table("messages", records=messages, columns=[
            "desk_id", "message_id", "ticket_id", "author_id", "body", "public"])
        await conn.copy_records_to_table("ticket_events", records=events, columns=[
            "desk_id", "event_id", "ticket_id", "kind", "channel", "token_id"])
    numbers: list[int] = row["numbers"]
    return numbers


def _text(text: str) -> Run:
    async def run(conn: asyncpg.Connection, entries: list[Entry], args: tuple[Any, ...]) -> list[int]:
        return await _plain(text, conn, entries, args)
    return run


VARIANTS: Final[dict[str, Run]] = {
    "statement": _text(STATEMENT),  # the service's
    "inline-count": _text(INLINE_COUNT),  # the statement before: users_written inlined, counted per row of ready
    "joins": _text(JOINS),  # departments and ticket types resolved by joins, not scalar subqueries
    "set-lock": _text(SET_LOCK),  # counters locked by one ordered SELECT FOR NO KEY UPDATE, bumped by one UPDATE
    "temp-copy": _temp_copy,  # the items COPYed into a temporary table, then the statement reading it
    "copy-rows": _copy_rows,  # the statement numbers the items; their tickets, messages and events by COPY
}


async def prepare(conn: asyncpg.Connection) -> None:
    """Ready conn for every variant: the temporary table temp-copy writes its items to."""
    await conn.execute(_ITEM_TABLE)


def entries(count: int, desks: list[int], tag: str) -> list[Entry]:
    """count new tickets of new requesters, each of a desk drawn from desks (bench/prefill.py's)."""
    drawn = []
    for i in range(count):
        desk = random.choice(desks)
        token = Token(desk, desk, f"d{desk}", prefill.TOKEN_NAME, frozenset(), f"API Via {prefill.TOKEN_NAME}")
        drawn.append((token, NewTicket(f"{tag}i{i}@bench.example", "bench.example", "Bench Requester",
                                       f"Bench ticket {tag}i{i}", BODY, "normal", None, None)))
    return drawn


async def write(conn: asyncpg.Connection, variant: str, batch: list[Entry]) -> list[int]:
    """Write batch with variant; the created tickets' numbers."""
    new_ids = [next(_IDS) for _ in range(statement.IDS_PER_ITEM * len(batch))]
    _, args = statement.build(batch, None, None, new_ids, one_desk=False)
    return await VARIANTS[variant](conn, batch, args)


@dataclass
class Measured:
    rate: float  # tickets a second
    backend_us: float | None  # the connections' backends' CPU per ticket, if the server is on this machine
    client_us: float  # this process's CPU per ticket


def _cpu(pids: list[int]) -> float | None:
    """The backends' CPU time (bench/cpu.py's measure), or None when they are not on this machine."""
    try:
        backends = [psutil.Process(pid) for pid in pids]
    except psutil.Error:
        return None
    return cpu_seconds(backends)


async def measure(url: str, variant: str, fill: prefill.Fill, items: int, spread: bool, seconds: float,
                  connections: int) -> Measured:
    conns = [await asyncpg.connect(url, server_settings=_SESSION) for _ in range(connections)]
    try:
        pids = [await c.fetchval("SELECT pg_backend_pid()") for c in conns]
        every = list(range(prefill.FIRST_DESK, fill.last_desk + 1))
        run = f"{os.getpid()}{variant}{random.randrange(10**9)}"
        for n, conn in enumerate(conns):
            await prepare(conn)
            for warm in range(3):  # the plan made, the functions and foreign-key checks of the session ready
                await write(conn, variant, entries(items, every[:1], f"{run}c{n}w{warm}"))
        written = 0

        async def drive(n: int, conn: asyncpg.Connection, until: float) -> None:
            nonlocal written
            for k in itertools.count():
                if time.monotonic() >= until:
                    return
                desks = every if spread else [random.choice(every)]
                numbers = await write(conn, variant, entries(items, desks, f"{run}c{n}k{k}"))
                written += len(numbers)  # not `written += len(await ...)`: that reads written before the await

        cpu0, own0, started = _cpu(pids), time.process_time(), time.monotonic()
        await asyncio.gather(*(drive(n, c, started + seconds) for n, c in enumerate(conns)))
        elapsed, cpu1, own = time.monotonic() - started, _cpu(pids), time.process_time() - own0
        backend = None if cpu0 is None or cpu1 is None or not written else 1e6 * (cpu1 - cpu0) / written
        return Measured(written / elapsed, backend, 1e6 * own / max(written, 1))
    finally:
        for conn in conns:
            await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="*", metavar="VARIANT",
                        help=f"of {', '.join(VARIANTS)} (all, in that order)")
    parser.add_argument("--items", type=int, default=100, help="tickets per statement (100)")
    parser.add_argument("--spread", action="store_true", help="each statement's tickets over every desk")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per variant and round (5)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds (4)")
    parser.add_argument("--connections", type=int, default=2, help="connections writing at once (2)")
    parser.add_argument("--data-dir", type=Path, default=Path(".headoni-bench"), help="embedded PostgreSQL's home")
    args = parser.parse_args()
    if unknown := set(args.variants) - set(VARIANTS):
        parser.error(f"no variant {', '.join(sorted(unknown))}")
    args.variants = args.variants or list(VARIANTS)
    server_url = os.environ.get("DATABASE_URL") or db.embedded_url(args.data_dir.resolve())
    name = f"headoni_variants_{os.getpid()}"
    url = asyncio.run(cluster.create_database(server_url, name, migrated=True))
    try:
        fill = asyncio.run(prefill.fill(url, 100, 20_000))
        runs: dict[str, list[Measured]] = {v: [] for v in args.variants}
        for r in range(args.rounds):
            for variant in args.variants if r % 2 == 0 else args.variants[::-1]:
                m = asyncio.run(measure(url, variant, fill, args.items, args.spread, args.seconds, args.connections))
                runs[variant].append(m)
                cpu = "-" if m.backend_us is None else f"{m.backend_us:.1f}"
                print(f"round {r + 1} {variant:13s} {m.rate:9,.0f} tickets/s  backends {cpu} us per ticket  "
                      f"client {m.client_us:.1f} us  load average {os.getloadavg()[0]:.1f}", flush=True)
        for variant, measured in runs.items():
            cpus = [m.backend_us for m in measured if m.backend_us is not None]
            cpu = f"{statistics.median(cpus):.1f}" if cpus else "-"
            print(f"median  {variant:13s} {statistics.median(m.rate for m in measured):9,.0f} tickets/s  "
                  f"backends {cpu} us per ticket  client {statistics.median(m.client_us for m in measured):.1f} us")
    finally:
        asyncio.run(cluster.drop_database(server_url, name))


if __name__ == "__main__":
    main()
