"""Concurrent clients over real HTTP, and the checks that what was acknowledged is stored whole."""

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import asyncpg
import httpx

from tests.support.desks import Desk, ticket_body


@dataclass
class Load:
    """What the clients saw: every 201's ticket (with the body sent) and a count of every outcome."""

    created: list[tuple[dict[str, object], str]] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)


async def run_load(
    base_url: str, desk: Desk, *, clients: int, seconds: float, stop: Callable[[], bool] = lambda: False,
    timeout: float = 10.0, load: Load | None = None,
) -> Load:
    """`clients` clients each POST tickets one after another for `seconds` (or until `stop()`), each
    ticket with its own subject and body, into `load` (a new one by default), which fills as answers
    come. A client whose connection is refused stops early."""
    load = load if load is not None else Load()
    deadline = time.monotonic() + seconds

    async def client(n: int) -> None:
        limits = httpx.Limits(max_connections=1)
        async with httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits) as http:
            i = 0
            while time.monotonic() < deadline and not stop():
                i += 1
                body = f"load {n}-{i}: the body, stored verbatim"
                try:
                    response = await http.post(
                        "/api/v1/tickets", json=ticket_body(subject=f"load {n}-{i}", body=body), headers=desk.headers()
                    )
                except httpx.ConnectError:
                    load.outcomes["refused"] += 1
                    return
                except httpx.HTTPError as exc:
                    load.outcomes[type(exc).__name__] += 1
                    continue
                load.outcomes[str(response.status_code)] += 1
                if response.status_code == 201:
                    load.created.append((response.json()["ticket"], body))

    await asyncio.gather(*(client(n) for n in range(clients)))
    return load


async def once_created(load: Load, count: int, action: Callable[[], object], timeout: float = 20.0) -> None:
    """Run `action` once `load` holds `count` acknowledged tickets (a signal sent on a timer instead could
    land before the first answer on a loaded machine); fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while len(load.created) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"only {len(load.created)} tickets acknowledged in {timeout} s: {load.outcomes}")
        await asyncio.sleep(0.01)
    action()


async def settled(pool: asyncpg.Pool, timeout: float = 15.0) -> None:
    """Return once no statement of a server is running in the database. A server killed mid-request leaves
    its statements behind it: PostgreSQL has read them from the socket already and runs them to their
    commit, so what the database holds is final only once they are done."""
    deadline = time.monotonic() + timeout
    while await pool.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'headoni'"
        " AND state <> 'idle' AND pid <> pg_backend_pid()"
    ):
        if time.monotonic() > deadline:
            raise AssertionError(f"statements of a server still ran {timeout} s after it stopped")
        await asyncio.sleep(0.05)


async def assert_acknowledged_are_stored(pool: asyncpg.Pool, desk: Desk, load: Load) -> int:
    """Every acknowledged ticket is stored with its message and its event, and the desk's numbers
    are exactly 1..N; returns N (which may exceed the acknowledged count when an answer was lost)."""
    rows = await pool.fetch(
        """SELECT t.ticket_id, t.number, t.subject, m.body,
                  (SELECT count(*) FROM ticket_events e
                   WHERE e.desk_id = t.desk_id AND e.ticket_id = t.ticket_id AND e.kind = 'ticket.created') AS events
           FROM tickets t JOIN messages m ON m.desk_id = t.desk_id AND m.ticket_id = t.ticket_id
           WHERE t.desk_id = $1""",
        desk.desk_id,
    )
    stored = {str(r["ticket_id"]): r for r in rows}
    assert len(stored) == len(rows)  # one message per ticket
    for ticket, body in load.created:
        row = stored.get(str(ticket["id"]))
        assert row is not None, f"acknowledged ticket {ticket} is not stored"
        stored_as = (row["number"], row["subject"], row["body"], row["events"])
        assert stored_as == (ticket["number"], ticket["subject"], body, 1)
    assert all(r["events"] == 1 for r in rows)  # unacknowledged ones are whole too
    numbers = sorted(r["number"] for r in rows)
    assert numbers == list(range(1, len(numbers) + 1))
    assert await pool.fetchval("SELECT last_number FROM desk_counters WHERE desk_id = $1", desk.desk_id) == len(numbers)
    return len(numbers)
