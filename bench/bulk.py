"""The bulk-load ceiling of the batch route: the rows a batch of 100 writes, loaded by COPY.

Each transaction takes one desk's counter (as the batch's statement does) and COPYs the same rows a
batch of 100 bench tickets makes: 100 new requesters, 100 tickets, their first messages and their
created events, every foreign key and index in place. `connections` clients do this for `seconds`; the
rate is tickets per second. What the service's batch route adds on top of this is its own cost.
"""

import asyncio
import itertools
import os
import time
from typing import Any, Final

import asyncpg

from bench.prefill import FIRST_DESK, TOKEN_NAME, Fill
from bench.wrk import Measure

BODY: Final = (  # bench.lua's ticket body
    "I loop back to /sign-in after typing my email. Steps: open the app, type the address, "
    "press continue, and the page reloads to the start. Seen on Firefox and Chrome since this morning."
)
_IDS: Final = itertools.count((1 << 61) + os.getpid() * 10_000_000)  # past anything the service mints soon


def _percentiles(latencies: list[float]) -> tuple[float, float, float, float]:
    if not latencies:
        return 0.0, 0.0, 0.0, 0.0
    ordered = sorted(latencies)

    def at(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(len(ordered) * p))] * 1000

    return at(0.5), at(0.99), at(0.999), ordered[-1] * 1000


async def _load(conn: asyncpg.Connection, desk: int, run: str, n: int, items: int) -> None:
    """One batch's rows, in one transaction."""
    ids = [next(_IDS) for _ in range(4 * items)]
    async with conn.transaction():
        last = await conn.fetchval(
            "UPDATE desk_counters SET last_number = last_number + $2 WHERE desk_id = $1 RETURNING last_number",
            desk, items,
        )
        base = last - items
        await conn.copy_records_to_table(
            "users", columns=["desk_id", "user_id", "email", "name"],
            records=[(desk, ids[i], f"{run}n{n}i{i}@bench.example", "Bench Requester") for i in range(items)],
        )
        await conn.copy_records_to_table(
            "tickets",
            columns=["desk_id", "ticket_id", "number", "subject", "priority", "channel", "requester_id",
                     "department_id", "ticket_type_id"],
            records=[(desk, ids[items + i], base + i + 1, f"Bench ticket {run}n{n}i{i}", "normal", "api", ids[i],
                      desk, desk) for i in range(items)],
        )
        await conn.copy_records_to_table(
            "messages", columns=["desk_id", "message_id", "ticket_id", "author_id", "body", "public"],
            records=[(desk, ids[2 * items + i], ids[items + i], ids[i], BODY, True) for i in range(items)],
        )
        await conn.copy_records_to_table(
            "ticket_events", columns=["desk_id", "event_id", "ticket_id", "kind", "channel", "token_id"],
            records=[(desk, ids[3 * items + i], ids[items + i], "ticket.created", f"API Via {TOKEN_NAME}", desk)
                     for i in range(items)],
        )


async def run_copy(url: str, connections: int, seconds: float, fill: Fill, items: int = 100) -> Measure:
    """`connections` clients loading batches of `items` tickets by COPY, over the bench's desks, for `seconds`."""
    deadline = time.monotonic() + seconds
    latencies: list[float] = []
    errors = 0
    run = f"L{os.getpid()}x{os.urandom(3).hex()}"

    async def client(k: int, conn: asyncpg.Connection) -> None:
        nonlocal errors
        for n in itertools.count():
            if time.monotonic() >= deadline:
                return
            desk = FIRST_DESK + (k * 7919 + n) % fill.desks
            started = time.monotonic()
            try:
                await _load(conn, desk, f"{run}c{k}", n, items)
            except asyncpg.PostgresError:
                errors += 1
                continue
            latencies.append(time.monotonic() - started)

    conns: list[Any] = [await asyncpg.connect(url) for _ in range(connections)]
    started = time.monotonic()
    try:
        await asyncio.gather(*(client(k, c) for k, c in enumerate(conns)))
    finally:
        for c in conns:
            await c.close()
    elapsed = time.monotonic() - started
    p50, p99, p999, most = _percentiles(latencies)
    return Measure(len(latencies), elapsed, p50, p99, errors, p999, most)
