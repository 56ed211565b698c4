"""Database outages, injected for real on a private PostgreSQL: stopped, restarted, frozen, or not
there yet at start. The service answers 503 quickly, stays alive, and recovers by itself."""

import asyncio
import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import httpx
import msgspec
import pytest

from app import ids as ids_module
from app.errors import RateLimited
from app.ids import MAX_SEQUENCE, LeaseExpired, LeaseKeeper, Snowflake, WorkerLease
from app.limiter import LEASE_TIMEOUT, Limiter
from app.rates import Limit
from bench.server import Server, free_port
from tests.support import ROOT
from tests.support.api import TICKETS, assert_error, new_token
from tests.support.desks import Desk, make_desk, ticket_body
from tests.support.load import assert_acknowledged_are_stored, run_load
from tests.support.own_postgres import OwnPostgres
from tests.support.servers import serving

pytestmark = pytest.mark.e2e

# Every API route, as (method, path): during an outage each answers 503.
ROUTES = [
    ("POST", "/api/v1/tickets"),
    ("GET", "/api/v1/tickets/1"),
    ("GET", "/api/v1/departments"),
    ("GET", "/api/v1/ticket-types"),
]
# No request may hang: an outage must be answered well within this (seconds), or the test fails.
NO_HANG = 8.0


@pytest.fixture(scope="module")
def own_pg() -> Iterator[OwnPostgres]:
    pg = OwnPostgres.start()
    try:
        yield pg
    finally:
        pg.cleanup()


@pytest.fixture(scope="module")
async def fault_db(own_pg: OwnPostgres) -> str:
    return await own_pg.new_database()


class FaultSide:
    """A pool and ids on the private server, to make desks and check what it holds."""

    def __init__(self, pool: asyncpg.Pool, ids: Snowflake) -> None:
        self.pool, self.ids = pool, ids


@pytest.fixture
async def side(fault_db: str, own_pg: OwnPostgres) -> AsyncIterator[FaultSide]:
    """Opened per test: a test that stops the server breaks these connections."""
    lease = await WorkerLease.acquire(fault_db)
    pool = await asyncpg.create_pool(fault_db, min_size=1, max_size=2)
    try:
        yield FaultSide(pool, lease.snowflake())
    finally:
        await pool.close()
        await lease.close()


@pytest.fixture
def fault_server(fault_db: str, own_pg: OwnPostgres, tmp_path: Path) -> Iterator[Server]:
    try:
        with serving(fault_db, tmp_path / "serve.log", HEADONI_STATEMENT_TIMEOUT_MS="1000") as server:
            yield server
    finally:
        own_pg.thaw()
        if not own_pg.running:
            own_pg.resume()


async def _request(
    http: httpx.AsyncClient, method: str, path: str, desk: Desk, secret: str | None = None
) -> httpx.Response:
    if method == "POST":
        return await http.post(path, json=ticket_body(), headers=desk.headers(secret))
    return await http.get(path, headers=desk.headers(secret))


async def _until_created(http: httpx.AsyncClient, desk: Desk, seconds: float) -> httpx.Response:
    deadline = time.monotonic() + seconds
    while True:
        response = await http.post("/api/v1/tickets", json=ticket_body(), headers=desk.headers())
        if response.status_code == 201 or time.monotonic() > deadline:
            return response
        assert_error(response, 503, "service_unavailable")
        await asyncio.sleep(0.1)


async def _assert_unavailable_everywhere(http: httpx.AsyncClient, desk: Desk, fresh_secret: str) -> None:
    for method, path in ROUTES:
        for secret in (None, fresh_secret):  # a cached token, and one the cache has never seen
            response = await _request(http, method, path, desk, secret)
            assert_error(response, 503, "service_unavailable")
            assert response.headers["retry-after"].isdigit()
    ready = await http.get("/readyz")
    assert ready.status_code == 503 and ready.headers["retry-after"].isdigit()
    assert (await http.get("/healthz")).status_code == 200


async def test_stopped_database_answers_503_quickly_and_the_service_recovers_by_itself(
    own_pg: OwnPostgres, fault_server: Server, side: FaultSide
) -> None:
    desk = await make_desk(side.pool, side.ids)
    fresh_secret = await new_token(side.pool, side.ids, desk, "tickets:create", "tickets:read")
    async with httpx.AsyncClient(base_url=fault_server.base_url, timeout=NO_HANG) as http:
        assert (await _request(http, "POST", "/api/v1/tickets", desk)).status_code == 201
        own_pg.stop()
        try:
            await _assert_unavailable_everywhere(http, desk, fresh_secret)
        finally:
            own_pg.resume()
        created = await _until_created(http, desk, 15)
        assert created.status_code == 201, created.text
        assert created.json()["ticket"]["number"] == 2  # the refused requests took no number
        assert (await http.get("/readyz")).status_code == 200
        for method, path in ROUTES[1:]:
            assert (await _request(http, method, path, desk, fresh_secret)).status_code == 200
    assert fault_server.process.poll() is None  # never restarted


async def test_a_restart_under_load_loses_nothing_acknowledged_and_answers_only_201_or_503(
    own_pg: OwnPostgres, fault_server: Server, side: FaultSide, fault_db: str
) -> None:
    desk = await make_desk(side.pool, side.ids)
    restarted = threading.Event()

    def restart() -> None:
        time.sleep(0.7)
        own_pg.stop()
        time.sleep(1.0)
        own_pg.resume()
        restarted.set()

    restarter = threading.Thread(target=restart)
    restarter.start()
    try:
        load = await run_load(fault_server.base_url, desk, clients=4, seconds=4.0, timeout=NO_HANG)
    finally:
        restarter.join()
    assert restarted.is_set()
    assert set(load.outcomes) <= {"201", "503"}, load.outcomes  # never a 500, never a hang
    assert load.outcomes["503"] > 0 and load.outcomes["201"] > 0, load.outcomes
    async with httpx.AsyncClient(base_url=fault_server.base_url, timeout=NO_HANG) as http:
        assert (await _until_created(http, desk, 15)).status_code == 201
    await side.pool.expire_connections()  # they died with the restart
    async with asyncpg.create_pool(fault_db, min_size=1, max_size=2) as pool:
        await assert_acknowledged_are_stored(pool, desk, load)
        ids = await pool.fetch(
            """SELECT ticket_id AS id FROM tickets WHERE desk_id = $1 UNION ALL
               SELECT message_id FROM messages WHERE desk_id = $1 UNION ALL
               SELECT event_id FROM ticket_events WHERE desk_id = $1""",
            desk.desk_id,
        )
        assert len({r["id"] for r in ids}) == len(ids)  # ids made before and after the lease was lost differ


async def test_a_frozen_database_answers_503_within_the_statement_timeout_not_never(
    own_pg: OwnPostgres, fault_server: Server, side: FaultSide, fault_db: str
) -> None:
    """SIGSTOP: connections are accepted and nothing answers. The client-side limit (statement
    timeout + 1 s) and the connect timeout (3 s) bound every request. A write given up on this way is
    in doubt (the statement may run when the database wakes); a retry with the same Idempotency-Key
    gets exactly one ticket either way."""
    desk = await make_desk(side.pool, side.ids)
    key = {"Idempotency-Key": "frozen-1"}
    async with httpx.AsyncClient(base_url=fault_server.base_url, timeout=NO_HANG) as http:
        assert (await _request(http, "POST", "/api/v1/tickets", desk)).status_code == 201
        own_pg.freeze()
        try:
            frozen = await http.post("/api/v1/tickets", json=ticket_body(), headers=desk.headers(**key))
            assert_error(frozen, 503, "service_unavailable")
            assert_error(await _request(http, "GET", "/api/v1/departments", desk), 503, "service_unavailable")
            assert (await http.get("/readyz")).status_code == 503
            assert (await http.get("/healthz")).status_code == 200
        finally:
            own_pg.thaw()
        deadline = time.monotonic() + 15
        while (retry := await http.post(TICKETS, json=ticket_body(), headers=desk.headers(**key))).status_code == 503:
            assert time.monotonic() < deadline, retry.text
            await asyncio.sleep(0.1)
        assert retry.status_code == 201 and retry.json()["ticket"]["number"] == 2, retry.text
        assert (await _request(http, "POST", "/api/v1/tickets", desk)).json()["ticket"]["number"] == 3
    async with asyncpg.create_pool(fault_db, min_size=1, max_size=1) as pool:
        assert await pool.fetchval("SELECT count(*) FROM tickets WHERE desk_id = $1", desk.desk_id) == 3


def test_serve_without_a_database_gives_up_after_the_startup_wait_with_one_clear_line(
    own_pg: OwnPostgres, fault_db: str
) -> None:
    own_pg.stop()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "app", "serve", "--port", str(free_port())],
            cwd=ROOT, capture_output=True, text=True, timeout=30,
            env={"PATH": "/usr/bin:/bin", "DATABASE_URL": fault_db, "HEADONI_STARTUP_TIMEOUT": "1"},
        )
    finally:
        own_pg.resume()
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("headoni: cannot reach the database at ") and "after 1 s" in last
    assert "postgres:" not in last  # no credentials in the message


def test_serve_started_before_its_database_waits_for_it(own_pg: OwnPostgres, fault_db: str, tmp_path: Path) -> None:
    own_pg.stop()
    timer = threading.Timer(1.5, own_pg.resume)
    timer.start()
    try:
        with serving(fault_db, tmp_path / "serve.log", HEADONI_STARTUP_TIMEOUT="20") as server:
            assert httpx.get(f"{server.base_url}/readyz", timeout=NO_HANG).status_code == 200
            assert "waiting for the database" in server.log.read_text()
    finally:
        timer.join()


async def test_past_its_reservation_without_a_lease_no_id_is_made_until_a_lease_is_back(
    own_pg: OwnPostgres, fault_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ids_module, "RESERVE_MS", 1_000)  # a short reservation, to run out within the test
    monkeypatch.setattr(ids_module, "RENEW_BELOW_MS", 600)
    monkeypatch.setattr(ids_module, "_TICK", 0.1)
    keeper = await LeaseKeeper.start(fault_db)
    try:
        before = keeper.ids.next_id()
        own_pg.stop()
        try:
            deadline = time.monotonic() + 5
            while keeper.ids.usable():
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            assert not keeper.holding
            with pytest.raises(LeaseExpired) as refused:
                keeper.ids.next_ids(2 * MAX_SEQUENCE)  # whatever millisecond it would borrow
            assert refused.value.response().status_code == 503
        finally:
            own_pg.resume()
        deadline = time.monotonic() + 10
        while not keeper.holding:
            assert time.monotonic() < deadline, "no lease again after the database came back"
            await asyncio.sleep(0.05)
        assert keeper.ids.next_id() > before
    finally:
        await keeper.close()


async def test_without_its_database_the_limiter_limits_each_process_at_its_share_then_recovers(
    own_pg: OwnPostgres, side: FaultSide, fault_db: str
) -> None:
    """Neither "no limits" nor "everything limited": leases fail fast, and the process limits on its own
    at the limit divided by the live processes it last counted (here 2), until leases work again."""
    desk = await make_desk(side.pool, side.ids)
    token = msgspec.structs.replace(desk.token(), limit=Limit(20, 1, 10))
    other_process = await WorkerLease.acquire(fault_db)  # live processes: this test's side, and this one
    limiter = await Limiter.open(fault_db, None)
    try:
        await limiter.admission(token).charge(1)  # a lease: the bucket is known, the processes counted
        own_pg.stop()
        try:
            allowed, slowest = 0, 0.0
            started = time.monotonic()
            for i in range(120):  # 60/s for 2 s: three times the limit
                await asyncio.sleep(max(0.0, started + i / 60 - time.monotonic()))
                began = time.monotonic()
                try:
                    await limiter.admission(token).charge(1)
                    allowed += 1
                except RateLimited as exc:
                    assert exc.retry_after >= 1
                slowest = max(slowest, time.monotonic() - began)
            span = time.monotonic() - started
        finally:
            own_pg.resume()
        # What it held (at most two slices of 5), then 1/2 of the burst and of 20/s over the span (2 s,
        # more on a loaded machine): not the 120 offered, and not none.
        assert 15 <= allowed <= 10 + 5 + 10 * span + 3, (allowed, span)
        assert slowest <= LEASE_TIMEOUT + 0.5  # a failing lease never holds a request longer
        deadline = time.monotonic() + 15
        allowance = limiter.admission(token).allowance
        assert allowance is not None and allowance.local
        while allowance.local and time.monotonic() < deadline:
            with contextlib.suppress(RateLimited):
                await limiter.admission(token).charge(1)
            await asyncio.sleep(0.2)
        assert not allowance.local  # leasing again, by itself
    finally:
        await limiter.close()
        await other_process.close()
