"""Fair under overload: desks take turns in the create queue, a statement shares its places among the
waiting desks, and a full queue sheds the desk that floods it, all with real statements on PostgreSQL."""

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import httpx
import msgspec
import pytest

from app.db import Database
from app.errors import Shed
from app.ids import Snowflake
from app.settings import Settings
from app.statement import Entry, Outcome, Written
from app.validation import NewTicket
from app.writer import Writer
from tests.support.api import TICKETS, written
from tests.support.app import app_client
from tests.support.desks import Desk, make_desk, ticket_body


def new_ticket(email: str) -> NewTicket:
    return NewTicket(email, email.rsplit("@", 1)[1], "Requester", "Subject", "Body", "normal", None, None)


class Recorded:
    """A Writer whose shared statements are recorded: the desk of each create, statement by statement."""

    def __init__(
        self, database: Database, ids: Snowflake, *, one_desk: bool, max_waiting: int, citus: bool = False
    ) -> None:
        self.writer = Writer(database, ids, slots=1, one_desk=one_desk, max_waiting=max_waiting, citus=citus)
        self.statements: list[list[int]] = []
        coalescer = self.writer._coalescer
        real = coalescer._write

        async def recording(entries: list[Entry]) -> Written:
            self.statements.append([token.desk_id for token, _ in entries])
            return await real(entries)

        coalescer._write = recording


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[Database]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    try:
        yield Database(pool, 10.0)
    finally:
        await pool.close()


async def settle(tasks: list["asyncio.Task[Written]"]) -> list[Written | BaseException]:
    return list(await asyncio.gather(*tasks, return_exceptions=True))


@pytest.mark.parametrize("one_desk", [False, True], ids=["any-desks", "one-desk"])
async def test_a_flooding_desk_cannot_starve_another_desks_creates(
    database: Database, pool: asyncpg.Pool, ids: Snowflake, one_desk: bool, on_citus: bool
) -> None:
    if on_citus and not one_desk:
        pytest.skip("statements of several desks are the default of one PostgreSQL; Citus writes one desk each")
    x, y = await make_desk(pool, ids), await make_desk(pool, ids)
    recorded = Recorded(database, ids, one_desk=one_desk, max_waiting=1000, citus=on_citus)
    writer = recorded.writer
    floods = [asyncio.create_task(writer.create(x.token(), new_ticket(f"x{i}@example.com"))) for i in range(350)]
    await asyncio.sleep(0)  # the first runs its statement; the others queue behind it
    theirs = [asyncio.create_task(writer.create(y.token(), new_ticket(f"y{i}@example.com"))) for i in range(3)]
    results = await settle(floods + theirs)
    assert all(isinstance(r, Written) and r.outcomes == [Outcome.CREATED] for r in results), results
    rode = [i for i, desks in enumerate(recorded.statements) if y.desk_id in desks]
    # With one queue in arrival order, y's creates would ride statement 4 (0 is x's first, alone), after
    # 349 of x's; taking turns, they ride the first statement after them (any desks), or the one after
    # x's turn (one desk: x queued first).
    assert rode == [2 if one_desk else 1], recorded.statements[:3]
    if one_desk:
        assert all(len(set(desks)) == 1 for desks in recorded.statements)
    else:  # y's three and x's share of the rest: each waiting desk gets its share of the statement
        assert recorded.statements[1].count(y.desk_id) == 3 and len(recorded.statements[1]) == 100
    assert (await written(pool, x))["tickets"] == 350 and (await written(pool, y))["tickets"] == 3


async def test_a_full_queue_sheds_the_desk_that_floods_it(
    database: Database, pool: asyncpg.Pool, ids: Snowflake, on_citus: bool
) -> None:
    x, y = await make_desk(pool, ids), await make_desk(pool, ids)
    writer = Recorded(database, ids, one_desk=False, max_waiting=50, citus=on_citus).writer  # as the service writes
    floods = [asyncio.create_task(writer.create(x.token(), new_ticket(f"x{i}@example.com"))) for i in range(200)]
    await asyncio.sleep(0)
    theirs = [asyncio.create_task(writer.create(y.token(), new_ticket(f"y{i}@example.com"))) for i in range(10)]
    flooded, served = await settle(floods), await settle(theirs)
    shed = [r for r in flooded if isinstance(r, Shed)]
    # One ran at once and 50 queued; the other 149 were shed on arrival, and each of y's 10 pushed out
    # one of x's newest: x is the desk with the most waiters.
    assert len(shed) == 159 and all(isinstance(r, Written) for r in flooded if not isinstance(r, Shed))
    assert all(isinstance(r, Written) for r in served), served
    assert shed[0].status == 503 and shed[0].headers["Retry-After"] == "1"
    assert (await written(pool, x))["tickets"] == 41 and (await written(pool, y))["tickets"] == 10


async def test_over_http_a_flood_is_shed_fast_while_another_desk_is_served(
    config: Settings, database_url: str, pool: asyncpg.Pool, ids: Snowflake, capsys: pytest.CaptureFixture[str]
) -> None:
    """The queue filled for sure: x's first create holds the only statement slot, stuck on x's counter
    row, which this test holds locked until every request has arrived."""
    x, y = await make_desk(pool, ids), await make_desk(pool, ids)
    tight = msgspec.structs.replace(config, create_statements=1, create_queue=10)
    async with app_client(tight, database_url) as client, pool.acquire() as blocker:
        before = (await client.get("/metrics")).text

        async def post(desk: Desk, i: int) -> httpx.Response:
            return await client.post(TICKETS, json=ticket_body(email=f"r{i}@example.com"), headers=desk.headers())

        for desk in (x, y):  # tokens cached: every request below goes straight to the queue
            assert (await client.get("/api/v1/departments", headers=desk.headers())).status_code == 200
        lock = blocker.transaction()
        await lock.start()
        await blocker.execute("SELECT 1 FROM desk_counters WHERE desk_id = $1 FOR UPDATE", x.desk_id)
        try:
            floods = [asyncio.create_task(post(x, i)) for i in range(120)]
            await asyncio.sleep(0.5)  # one running, 10 waiting, the other 109 answered 503 already
            assert sum(task.done() for task in floods) == 109
            theirs = [asyncio.create_task(post(y, i)) for i in range(5)]
            await asyncio.sleep(0.3)
        finally:
            await lock.rollback()
        answers, served = await asyncio.gather(*floods), await asyncio.gather(*theirs)
        text = (await client.get("/metrics")).text
    assert [r.status_code for r in served] == [201] * 5  # each pushed out one of x's newest waiters
    statuses = [r.status_code for r in answers]
    assert (statuses.count(201), statuses.count(503)) == (6, 114)
    shed = next(r for r in answers if r.status_code == 503)
    assert shed.json()["error"] == "service_unavailable" and shed.headers["retry-after"] == "1"
    assert (await written(pool, x))["tickets"] == 6 and (await written(pool, y))["tickets"] == 5
    series = 'headoni_shed_total{route="/api/v1/tickets"}'

    def count(metrics: str) -> float:
        return next((float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith(series)), 0.0)

    assert count(text) - count(before) == 114
    logged = capsys.readouterr().out
    assert logged.count('"limit":"shed"') == 114
