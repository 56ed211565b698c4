"""Stopping the server under load: SIGTERM drains what is in flight and exits cleanly; SIGKILL loses
nothing that was acknowledged. Numbers stay gapless either way (a number is taken only by a commit)."""

import asyncio
import signal
from pathlib import Path

import asyncpg
import httpx
import pytest

from app.ids import Snowflake
from tests.support.desks import make_desk, ticket_body
from tests.support.load import Load, assert_acknowledged_are_stored, once_created, run_load, settled
from tests.support.servers import serving

pytestmark = pytest.mark.e2e

CLIENTS = 8


async def test_sigterm_under_load_drains_in_flight_requests_and_exits_cleanly(
    database_url: str, pool: asyncpg.Pool, ids: Snowflake, tmp_path: Path
) -> None:
    desk = await make_desk(pool, ids)
    with serving(database_url, tmp_path / "serve.log") as server:
        load = Load()
        stopping = asyncio.create_task(once_created(load, 20, lambda: server.process.send_signal(signal.SIGTERM)))
        await run_load(server.base_url, desk, clients=CLIENTS, seconds=15.0, load=load)
        await stopping
        assert await asyncio.to_thread(server.process.wait, 25) == 0
    assert load.outcomes["201"] > 0 and load.outcomes["refused"] == CLIENTS, load.outcomes
    assert not any(outcome.startswith("5") for outcome in load.outcomes), load.outcomes
    stored = await assert_acknowledged_are_stored(pool, desk, load)
    assert stored == len(load.created)  # drained: whatever was taken in was answered
    log = server.log.read_text()
    assert "Traceback" not in log and "Application shutdown complete." in log


async def test_sigkill_under_load_loses_nothing_acknowledged_and_a_new_server_goes_on_gapless(
    database_url: str, pool: asyncpg.Pool, ids: Snowflake, tmp_path: Path
) -> None:
    desk = await make_desk(pool, ids)
    with serving(database_url, tmp_path / "serve.log") as server:
        load = Load()
        killing = asyncio.create_task(once_created(load, 20, lambda: server.process.send_signal(signal.SIGKILL)))
        await run_load(server.base_url, desk, clients=CLIENTS, seconds=15.0, load=load)
        await killing
        assert await asyncio.to_thread(server.process.wait, 10) == -signal.SIGKILL
    assert load.outcomes["201"] > 0 and load.outcomes["refused"] == CLIENTS, load.outcomes
    await settled(pool)  # the statements the killed server had sent commit (or not) on their own
    stored = await assert_acknowledged_are_stored(pool, desk, load)  # may hold some never acknowledged
    with serving(database_url, tmp_path / "serve-again.log") as successor:
        async with httpx.AsyncClient(base_url=successor.base_url, timeout=10) as http:
            created = await http.post("/api/v1/tickets", json=ticket_body(), headers=desk.headers())
        assert created.status_code == 201 and created.json()["ticket"]["number"] == stored + 1
