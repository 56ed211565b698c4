"""Concurrent single creates share statements, yet each gets its own answer."""

import asyncio
from pathlib import Path

import asyncpg
import httpx
import msgspec
import pytest

from app import admin, settings
from app.ids import Snowflake
from tests.support.desks import Desk, make_desk, ticket_body
from tests.support.servers import serving

TICKETS = "/api/v1/tickets"


async def test_concurrent_creates_share_transactions_and_stay_gapless(
    client: httpx.AsyncClient, desk: Desk, pool: asyncpg.Pool
) -> None:
    responses = await asyncio.gather(
        *(client.post(TICKETS, json=ticket_body(subject=f"n{i}"), headers=desk.headers()) for i in range(60))
    )
    assert {r.status_code for r in responses} == {201}
    numbers = sorted(r.json()["ticket"]["number"] for r in responses)
    assert numbers == list(range(1, 61))
    # Each answer is its own ticket: the subject it sent, under the id it was given.
    stored = await pool.fetch(
        "SELECT ticket_id, subject, xmin::text AS tx FROM tickets WHERE desk_id = $1", desk.desk_id
    )
    by_id = {str(r["ticket_id"]): r["subject"] for r in stored}
    assert all(by_id[r.json()["ticket"]["id"]] == r.json()["ticket"]["subject"] for r in responses)
    assert sorted(by_id.values()) == sorted(f"n{i}" for i in range(60))
    # Fewer commits than tickets: concurrent requests rode shared statements.
    assert len({r["tx"] for r in stored}) < 60


async def test_each_request_in_a_shared_statement_gets_its_own_outcome(
    client: httpx.AsyncClient, desk: Desk, pool: asyncpg.Pool, ids: Snowflake
) -> None:
    async with pool.acquire() as conn:
        await admin.add_blocklist(conn, desk.subdomain, "spam.example")
    bodies = [
        ticket_body(subject="ok-1"),
        ticket_body(email="x@spam.example"),
        ticket_body(departmentId="77"),
        ticket_body(ticketTypeId="78"),
        ticket_body(subject="ok-2"),
    ] * 6
    responses = await asyncio.gather(*(client.post(TICKETS, json=b, headers=desk.headers()) for b in bodies))
    for body, response in zip(bodies, responses, strict=True):
        if "departmentId" in body:
            assert (response.status_code, response.json()["error"]) == (400, "department_not_found")
        elif "ticketTypeId" in body:
            assert (response.status_code, response.json()["error"]) == (400, "ticket_type_not_found")
        elif body["email"] == "x@spam.example":
            assert (response.status_code, response.json()) == (200, {"ok": True})
        else:
            assert response.status_code == 201 and response.json()["ticket"]["subject"] == body["subject"]
    numbers = sorted(r.json()["ticket"]["number"] for r in responses if r.status_code == 201)
    assert numbers == list(range(1, 13))


async def test_concurrent_creates_on_many_desks_share_statements_and_number_each_desk_gaplessly(
    client: httpx.AsyncClient, pool: asyncpg.Pool, ids: Snowflake, on_citus: bool
) -> None:
    if on_citus:
        pytest.skip("statements of several desks are the default of one PostgreSQL; Citus writes one desk each")
    desks = [await make_desk(pool, ids) for _ in range(6)]
    sends = [(desks[i % 6], i) for i in range(120)]
    responses = await asyncio.gather(
        *(client.post(TICKETS, json=ticket_body(subject=f"n{i}"), headers=d.headers()) for d, i in sends)
    )
    assert {r.status_code for r in responses} == {201}
    for desk in desks:
        numbers = sorted(r.json()["ticket"]["number"] for (d, _), r in zip(sends, responses, strict=True) if d is desk)
        assert numbers == list(range(1, 21))
    stored = await pool.fetch(
        "SELECT desk_id, number, xmin::text AS tx FROM tickets WHERE desk_id = ANY($1::bigint[])",
        [d.desk_id for d in desks],
    )
    assert len(stored) == 120
    # Statements carried tickets of several desks at once.
    desks_per_tx: dict[str, set[int]] = {}
    for row in stored:
        desks_per_tx.setdefault(row["tx"], set()).add(row["desk_id"])
    assert max(len(s) for s in desks_per_tx.values()) > 1


async def test_waiters_of_a_cancelled_shared_statement_get_an_error_not_a_hang(
    database_url: str, desk: Desk, pool: asyncpg.Pool, ids: Snowflake
) -> None:
    from app.db import Database
    from app.errors import ServiceUnavailable
    from app.validation import parse_ticket
    from app.writer import Writer

    token = desk.token()
    ticket = parse_ticket(b'{"email": "w@example.com", "subject": "s", "body": "b"}')
    async with asyncpg.create_pool(database_url, min_size=1, max_size=2) as own_pool:
        writer = Writer(Database(own_pool, 5.0), ids, slots=1)
        coalescer = writer._coalescer
        async with pool.acquire() as holder, holder.transaction():
            # Hold the desk's counter row, so the first statement waits on it.
            await holder.execute("SELECT 1 FROM desk_counters WHERE desk_id = $1 FOR UPDATE", desk.desk_id)
            leader = asyncio.create_task(coalescer.create(token, ticket))
            await asyncio.sleep(0.2)
            waiters = [asyncio.create_task(coalescer.create(token, ticket)) for _ in range(2)]
            await asyncio.sleep(0.1)
            leader.cancel()  # its slot passes to a drain task, whose shared statement waits on the lock too
            await asyncio.sleep(0.2)
            drains = list(coalescer._drains)
            assert len(drains) == 1
            drains[0].cancel()  # as a shutdown past its grace period would
            results = await asyncio.wait_for(asyncio.gather(*waiters, return_exceptions=True), 5)
        assert [type(r) for r in results] == [ServiceUnavailable, ServiceUnavailable]
        assert leader.cancelled()
    assert await pool.fetchval("SELECT count(*) FROM tickets WHERE desk_id = $1", desk.desk_id) == 0


async def test_one_desk_statements_are_shared_only_within_a_desk(
    database_url: str, pool: asyncpg.Pool, ids: Snowflake
) -> None:
    """HEADONI_STATEMENT_SCOPE=one-desk: every statement carries creates of one desk (the form Citus
    routes to one shard), and creates of a desk still share statements."""
    from app.db import Database
    from app.validation import parse_ticket
    from app.writer import Writer

    desks = [await make_desk(pool, ids) for _ in range(4)]
    tokens = [d.token() for d in desks]
    async with asyncpg.create_pool(database_url, min_size=1, max_size=2) as own_pool:
        writer = Writer(Database(own_pool, 5.0), ids, slots=1, one_desk=True)
        bodies = [f'{{"email": "p{i}@example.com", "subject": "n{i}", "body": "b"}}'.encode() for i in range(80)]
        sends = [(tokens[i % 4], parse_ticket(body)) for i, body in enumerate(bodies)]
        written = await asyncio.gather(*(writer.create(token, ticket) for token, ticket in sends))
    assert [w.outcomes for w in written] == [["created"]] * 80
    for token in tokens:
        numbers = sorted(w.tickets[0].number for (t, _), w in zip(sends, written, strict=True) if t is token)
        assert numbers == list(range(1, 21))
    stored = await pool.fetch(
        "SELECT desk_id, subject, xmin::text AS tx FROM tickets WHERE desk_id = ANY($1::bigint[])",
        [d.desk_id for d in desks],
    )
    assert sorted(r["subject"] for r in stored) == sorted(f"n{i}" for i in range(80))
    desks_per_tx: dict[str, set[int]] = {}
    for row in stored:
        desks_per_tx.setdefault(row["tx"], set()).add(row["desk_id"])
    assert {len(s) for s in desks_per_tx.values()} == {1}  # never two desks in one statement
    assert len(desks_per_tx) < 80  # yet creates of a desk shared statements


async def test_a_server_set_to_one_desk_statements_writes_one_desk_per_transaction(
    database_url: str, pool: asyncpg.Pool, ids: Snowflake, tmp_path: Path
) -> None:
    """HEADONI_STATEMENT_SCOPE=one-desk, end to end: a real server under concurrent creates on three desks."""
    desks = [await make_desk(pool, ids) for _ in range(3)]
    with serving(database_url, tmp_path / "serve.log", HEADONI_STATEMENT_SCOPE="one-desk") as server:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
            responses = await asyncio.gather(*(
                http.post(TICKETS, json=ticket_body(subject=f"n{i}"), headers=desks[i % 3].headers())
                for i in range(90)
            ))
    assert {r.status_code for r in responses} == {201}
    stored = await pool.fetch(
        "SELECT desk_id, number, xmin::text AS tx FROM tickets WHERE desk_id = ANY($1::bigint[])",
        [d.desk_id for d in desks],
    )
    assert sorted((r["desk_id"], r["number"]) for r in stored) == sorted(
        (d.desk_id, n) for d in desks for n in range(1, 31)
    )
    desks_per_tx: dict[str, set[int]] = {}
    for row in stored:
        desks_per_tx.setdefault(row["tx"], set()).add(row["desk_id"])
    assert {len(s) for s in desks_per_tx.values()} == {1}


def test_one_statement_is_in_flight_by_default_and_two_when_each_is_of_one_desk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """HEADONI_CREATE_STATEMENTS unset: 1 statement in flight per process with statements of any desks (on
    one PostgreSQL they carry twice the creates each, docs/benchmark.md), 2 with statements of one desk
    (HEADONI_STATEMENT_SCOPE=one-desk, and on Citus, where app/citus.py makes every statement one desk's);
    set, it holds for both."""
    for name in ("HEADONI_CREATE_STATEMENTS", "HEADONI_STATEMENT_SCOPE"):
        monkeypatch.delenv(name, raising=False)
    assert settings.load().slots == 1
    assert msgspec.structs.replace(settings.load(), one_desk_statements=True, citus=True).slots == 2
    monkeypatch.setenv("HEADONI_STATEMENT_SCOPE", "one-desk")
    assert settings.load().slots == 2
    monkeypatch.setenv("HEADONI_CREATE_STATEMENTS", "3")
    assert settings.load().slots == 3
    monkeypatch.setenv("HEADONI_STATEMENT_SCOPE", "any-desks")
    assert settings.load().slots == 3
