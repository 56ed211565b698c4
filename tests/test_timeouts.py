"""Timeouts and pool exhaustion, with the app in-process on a database of its own (so its connections
can be counted): a held row lock or a slow statement answers 503 within its limit, far more clients
than connections queue and succeed, and only a wait past the pool bound answers 503."""

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
from asgi_lifespan import LifespanManager

from app import settings
from app.ids import Snowflake, WorkerLease
from app.main import create_app
from bench import cluster
from tests.support.api import TICKETS, assert_error, new_token
from tests.support.desks import Desk, make_desk, ticket_body

# Every request must be answered within this (seconds); a hang fails the test.
NO_HANG = 10.0


class Scratch(msgspec.Struct):
    url: str
    pool: asyncpg.Pool
    ids: Snowflake


@pytest.fixture(scope="module")
async def scratch(server_url: str) -> AsyncIterator[Scratch]:
    async with cluster.throwaway_database(server_url, "headoni_timeouts", migrated=True) as url:
        lease = await WorkerLease.acquire(url)
        try:
            async with asyncpg.create_pool(url, min_size=1, max_size=4) as pool:
                yield Scratch(url, pool, lease.snowflake())
        finally:
            await lease.close()


@asynccontextmanager
async def app_client(config: settings.Settings, url: str, **overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(msgspec.structs.replace(config, database_url=url, **overrides), url)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=NO_HANG) as client:
            yield client


@asynccontextmanager
async def counter_locked(scratch: Scratch, desk: Desk) -> AsyncIterator[None]:
    """Hold the desk's counter row lock from another session, as a stuck writer would."""
    async with scratch.pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT 1 FROM desk_counters WHERE desk_id = $1 FOR UPDATE", desk.desk_id)
        yield


async def app_connections(scratch: Scratch) -> list[str]:
    """The states of the app's sessions on the scratch database (its pool; not the lease)."""
    rows = await scratch.pool.fetch(
        "SELECT state FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'headoni'"
    )
    return [r["state"] for r in rows]


async def post(client: httpx.AsyncClient, desk: Desk, secret: str | None = None) -> httpx.Response:
    return await asyncio.wait_for(client.post(TICKETS, json=ticket_body(), headers=desk.headers(secret)), NO_HANG)


async def test_a_held_counter_lock_answers_503_at_the_lock_timeout_then_writes_go_on(
    scratch: Scratch, config: settings.Settings
) -> None:
    desk = await make_desk(scratch.pool, scratch.ids)
    async with app_client(config, scratch.url, lock_timeout_ms=300) as client:
        async with counter_locked(scratch, desk):
            response = await post(client, desk)
            assert_error(response, 503, "service_unavailable")
            assert response.headers["retry-after"].isdigit()
        created = await post(client, desk)
        assert created.status_code == 201 and created.json()["ticket"]["number"] == 1  # no number was lost


async def test_a_statement_past_the_statement_timeout_answers_503_then_writes_go_on(
    scratch: Scratch, config: settings.Settings
) -> None:
    desk = await make_desk(scratch.pool, scratch.ids)
    async with app_client(config, scratch.url, statement_timeout_ms=300, lock_timeout_ms=10_000) as client:
        async with counter_locked(scratch, desk):
            assert_error(await post(client, desk), 503, "service_unavailable")
        created = await post(client, desk)
        assert created.status_code == 201 and created.json()["ticket"]["number"] == 1


async def test_300_concurrent_clients_on_4_connections_queue_and_all_succeed(
    scratch: Scratch, config: settings.Settings
) -> None:
    desks = [await make_desk(scratch.pool, scratch.ids) for _ in range(3)]
    async with app_client(config, scratch.url, pool_min_size=1, pool_max_size=4) as client:

        async def one(i: int) -> int:
            desk = desks[i % len(desks)]
            if i % 2:
                return (await post(client, desk)).status_code
            path = "/api/v1/departments" if i % 4 else "/api/v1/ticket-types"
            return (await asyncio.wait_for(client.get(path, headers=desk.headers()), NO_HANG)).status_code

        seen: list[int] = []

        async def watch() -> None:
            while True:
                seen.append(len(await app_connections(scratch)))
                await asyncio.sleep(0.005)

        watcher = asyncio.create_task(watch())
        statuses = await asyncio.gather(*(one(i) for i in range(300)))
        watcher.cancel()
        assert statuses.count(201) == 150 and statuses.count(200) == 150
        assert seen and max(seen) <= 4
        states = await app_connections(scratch)
        assert 1 <= len(states) <= 4 and set(states) == {"idle"}  # nothing leaked, nothing left busy
    for desk in desks:
        numbers = await scratch.pool.fetch("SELECT number FROM tickets WHERE desk_id = $1 ORDER BY 1", desk.desk_id)
        assert [r["number"] for r in numbers] == list(range(1, len(numbers) + 1))
    assert await app_connections(scratch) == []  # closed with the app


async def test_only_a_wait_past_the_pool_timeout_answers_503_and_nothing_deadlocks(
    scratch: Scratch, config: settings.Settings
) -> None:
    """Two writes with two tokens, two statements in flight (so they are not coalesced), hold both
    connections, waiting on a locked counter; a third request waits for a connection past the pool
    timeout and gets 503."""
    desk = await make_desk(scratch.pool, scratch.ids)
    other_secret = await new_token(scratch.pool, scratch.ids, desk, "tickets:create", "tickets:read")
    async with app_client(
        config, scratch.url, pool_min_size=2, pool_max_size=2, pool_timeout=0.5, create_statements=2
    ) as client:
        for secret in (None, other_secret):  # warm the token cache: later requests need no connection for it
            assert (await client.get("/api/v1/departments", headers=desk.headers(secret))).status_code == 200
        async with counter_locked(scratch, desk):
            writes = [asyncio.create_task(post(client, desk, secret)) for secret in (None, other_secret)]
            deadline = time.monotonic() + NO_HANG
            while (await app_connections(scratch)).count("active") < 2:  # both writes wait on the lock
                assert time.monotonic() < deadline, await app_connections(scratch)
                await asyncio.sleep(0.01)
            waited = await asyncio.wait_for(client.get("/api/v1/departments", headers=desk.headers()), NO_HANG)
            assert_error(waited, 503, "service_unavailable")
            assert not any(write.done() for write in writes)  # still queued on the lock, not failed
        created = await asyncio.gather(*writes)
        assert sorted(r.json()["ticket"]["number"] for r in created) == [1, 2]
        assert (await client.get("/api/v1/departments", headers=desk.headers())).status_code == 200
        assert set(await app_connections(scratch)) == {"idle"}
