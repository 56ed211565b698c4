"""The create statement's lock order (docs/locking.md), checked against a real PostgreSQL, and the
safety net for a statement the database aborts anyway: run again, split, or 503.

Each test holds a lock in a transaction of its own, starts a create that must wait on it, and looks at
what the create does or does not hold while it waits.
"""

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
from prometheus_client import REGISTRY

from app import observability, writer
from app.db import Database
from app.errors import ServiceUnavailable
from app.ids import Snowflake
from app.statement import Written
from app.validation import NewTicket, parse_ticket
from tests.support.app import CREATE_FORMS, create_form
from tests.support.desks import Desk


@pytest.fixture(params=list(CREATE_FORMS))
def form(request: pytest.FixtureRequest, on_citus: bool) -> dict[str, Any]:
    """Each form of the create (the two statements, and the function the service uses on Citus), as
    writer.write's keyword arguments."""
    return create_form(request.param, on_citus)


def new_ticket(email: str, subject: str = "s") -> NewTicket:
    return parse_ticket(f'{{"email": "{email}", "subject": "{subject}", "body": "b"}}'.encode())


# A session's lock waits: on a plain PostgreSQL in pg_locks, by its backend's pid; on Citus on whichever
# node runs its statement (the desk's worker, for a routed call), in citus_lock_waits by its global pid.
_WAITS = "SELECT count(*) FROM pg_locks WHERE pid = $1 AND NOT granted"
_CITUS_WAITS = "SELECT count(*) FROM citus_lock_waits WHERE waiting_gpid = $1"


async def waiting(pool: asyncpg.Pool, conn: asyncpg.Connection) -> None:
    """Return once the connection's statement waits for a lock; fail if it never does."""
    citus = await pool.fetchval("SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus')")
    query, session = (_CITUS_WAITS, await global_pid(pool, conn)) if citus else (_WAITS, conn.get_server_pid())
    for _ in range(500):
        if await pool.fetchval(query, session):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the statement never waited for the lock")


async def global_pid(pool: asyncpg.Pool, conn: asyncpg.Connection) -> int:
    """A Citus session's global pid (asked of another session: conn may be busy), as its workers know it."""
    return int(await pool.fetchval(
        "SELECT global_pid FROM citus_stat_activity WHERE nodeid = (SELECT nodeid FROM pg_dist_node"
        " WHERE groupid = 0) AND pid = $1", conn.get_server_pid()
    ))


async def is_locked(pool: asyncpg.Pool, query: str, *args: Any) -> bool:
    """Whether `query` (a SELECT ... FOR <strength> NOWAIT) cannot take its row lock right now."""
    async with pool.acquire() as conn:
        try:
            await conn.fetch(query, *args)
        except asyncpg.LockNotAvailableError:
            return True
    return False


def aborted(sqlstate: str) -> float:
    return REGISTRY.get_sample_value("headoni_create_statements_aborted_total", {"sqlstate": sqlstate}) or 0.0


def splits() -> float:
    return REGISTRY.get_sample_value("headoni_create_statements_split_total") or 0.0


@pytest.fixture
async def connections(database_url: str) -> AsyncIterator[tuple[asyncpg.Connection, asyncpg.Connection]]:
    """Two connections of their own: one to hold locks in a transaction, one to run the create."""
    holder, runner = await asyncpg.connect(database_url), await asyncpg.connect(database_url)
    try:
        yield holder, runner
    finally:
        await holder.close()
        await runner.close()


async def test_a_create_waiting_for_a_requester_holds_no_counter_lock(
    pool: asyncpg.Pool, ids: Snowflake, desk: Desk, connections: tuple[Any, Any], form: dict[str, Any]
) -> None:
    """Users come before counters: while its requester insert waits for another transaction's insert of
    the same email, the create has not locked its desk's counter."""
    holder, runner = connections
    token = desk.token()
    async with holder.transaction():
        await holder.execute(
            "INSERT INTO users (desk_id, user_id, email, name) VALUES ($1, $2, 'held@example.com', 'Held')",
            desk.desk_id, ids.next_id(),
        )
        entries = [(token, new_ticket("aaa-known-first@example.com")), (token, new_ticket("held@example.com"))]
        create = asyncio.create_task(writer.write(runner, ids, entries, **form))
        await waiting(pool, runner)
        counter = "SELECT 1 FROM desk_counters WHERE desk_id = $1 FOR NO KEY UPDATE NOWAIT"
        assert not await is_locked(pool, counter, desk.desk_id)
    written = await asyncio.wait_for(create, 10)
    assert written.outcomes == ["created", "created"]


async def test_a_create_waiting_for_its_counter_has_written_its_requesters(
    pool: asyncpg.Pool, ids: Snowflake, desk: Desk, connections: tuple[Any, Any], form: dict[str, Any]
) -> None:
    """Counters come after users: a create that waits for its desk's counter has already inserted its new
    requesters (another insert of the same email has to wait for it)."""
    holder, runner = connections
    token = desk.token()
    async with holder.transaction():
        await holder.execute("UPDATE desk_counters SET last_number = last_number WHERE desk_id = $1", desk.desk_id)
        entries = [(token, new_ticket(f"new{i}@example.com")) for i in range(3)]
        create = asyncio.create_task(writer.write(runner, ids, entries, **form))
        await waiting(pool, runner)
        async with pool.acquire() as other:
            for i in range(3):
                with pytest.raises(asyncpg.LockNotAvailableError):  # the create's uncommitted insert holds it
                    async with other.transaction():
                        # On Citus the insert runs on the desk's worker, which a SET LOCAL reaches only so.
                        await other.execute("SET LOCAL citus.propagate_set_commands = 'local'")
                        await other.execute("SET LOCAL lock_timeout = '50ms'")
                        await other.execute(
                            "INSERT INTO users (desk_id, user_id, email, name) VALUES ($1, $2, $3, 'x')",
                            desk.desk_id, ids.next_id(), f"new{i}@example.com",
                        )
    written = await asyncio.wait_for(create, 10)
    assert [t.number for t in written.tickets] == [1, 2, 3]


async def test_the_requester_race_locks_the_requester_only_as_foreign_keys_allow(
    pool: asyncpg.Pool, ids: Snowflake, desk: Desk, connections: tuple[Any, Any], form: dict[str, Any]
) -> None:
    """A requester committed while the create waited is taken with a lock that leaves other creates'
    foreign-key checks (FOR KEY SHARE) free: FOR NO KEY UPDATE, never FOR UPDATE."""
    holder, runner = connections
    user_id = ids.next_id()
    transaction = holder.transaction()
    await transaction.start()
    await holder.execute(
        "INSERT INTO users (desk_id, user_id, email, name) VALUES ($1, $2, 'race@example.com', 'Early')",
        desk.desk_id, user_id,
    )
    async with runner.transaction():  # the create's own transaction, kept open to look at its locks
        create = asyncio.create_task(
            writer.write(runner, ids, [(desk.token(), new_ticket("race@example.com"))], **form)
        )
        await waiting(pool, runner)
        await transaction.commit()
        written = await asyncio.wait_for(create, 10)
        user = "SELECT 1 FROM users WHERE desk_id = $1 AND user_id = $2 FOR {} NOWAIT"
        assert await is_locked(pool, user.format("NO KEY UPDATE"), desk.desk_id, user_id)  # the race's row lock
        assert not await is_locked(pool, user.format("KEY SHARE"), desk.desk_id, user_id)
    assert written.outcomes == ["created"]
    assert await pool.fetchval("SELECT name FROM users WHERE user_id = $1", user_id) == "Early"


async def into_a_deadlock(
    pool: asyncpg.Pool, ids: Snowflake, desk: Desk, holder: asyncpg.Connection, create: Callable[[], Awaitable[Any]]
) -> Any:
    """Run `create` (a write of the new requester cycle@example.com on desk) into a real deadlock: the
    holder locks the desk's counter, the create inserts its requester and waits for the counter, then the
    holder inserts the same requester, waiting for the create. The holder's deadlock_timeout is long, so
    the create's deadlock check fires first and the database aborts the create's statement. The holder
    then rolls back, so what the create does next can go through. Returns what the create returned."""
    transaction = holder.transaction()
    await transaction.start()
    try:
        await holder.execute("SET LOCAL deadlock_timeout = '60s'")
        await holder.execute("UPDATE desk_counters SET last_number = last_number WHERE desk_id = $1", desk.desk_id)
        task = asyncio.ensure_future(create())
        await blocked_by(pool, holder)
        await holder.execute(
            "INSERT INTO users (desk_id, user_id, email, name) VALUES ($1, $2, 'cycle@example.com', 'x')",
            desk.desk_id, ids.next_id(),
        )
    finally:
        await transaction.rollback()
    return await asyncio.wait_for(task, 20)


async def blocked_by(pool: asyncpg.Pool, holder: asyncpg.Connection) -> None:
    """Return once some session waits for a lock that the holder's transaction holds."""
    for _ in range(500):
        if await pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))", holder.get_server_pid()
        ):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("nothing ever waited for the holder")


@pytest.fixture
async def superuser(pool: asyncpg.Pool, on_citus: bool) -> None:
    """What building a deadlock with a chosen victim needs: a superuser to set deadlock_timeout, on the
    node where the create waits."""
    if on_citus:
        pytest.skip(
            "the victim of a deadlock is chosen by each waiting session's deadlock_timeout; on Citus the"
            " create waits in a session of its own on a worker, which the test's settings do not reach"
        )
    if not await pool.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"):
        pytest.skip("setting deadlock_timeout (to choose which side of a deadlock is aborted) needs a superuser")


async def test_a_deadlocked_create_is_run_again_and_succeeds(
    pool: asyncpg.Pool, ids: Snowflake, desk: Desk, connections: tuple[Any, Any], form: dict[str, Any], superuser: None
) -> None:
    holder, runner = connections
    await runner.execute("SET deadlock_timeout = '100ms'")
    before = aborted("40P01")
    entries = [(desk.token(), new_ticket("cycle@example.com"))]
    def create() -> Awaitable[Written]:
        return writer.write(runner, ids, entries, **form, events=observability.METRICS)

    written = await into_a_deadlock(pool, ids, desk, holder, create)
    assert aborted("40P01") == before + 1
    assert [t.number for t in written.tickets] == [1]
    assert await pool.fetchval("SELECT count(*) FROM users WHERE desk_id = $1", desk.desk_id) == 1


async def test_a_create_the_database_keeps_aborting_answers_503_and_writes_nothing(
    client: httpx.AsyncClient, pool: asyncpg.Pool, ids: Snowflake, desk: Desk, connections: tuple[Any, Any],
    superuser: None, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past its runs (here one, to keep the test short), an aborted statement answers 503 with Retry-After."""
    monkeypatch.setattr(writer, "ABORTED_ATTEMPTS", 1)
    holder, _ = connections
    body = {"email": "cycle@example.com", "subject": "s", "body": "b"}
    headers = desk.headers(**{"Idempotency-Key": "keyed-runs-its-own-statement"})
    def create() -> Awaitable[httpx.Response]:
        return client.post("/api/v1/tickets", json=body, headers=headers)

    response = await into_a_deadlock(pool, ids, desk, holder, create)
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    assert response.json()["error"] == "service_unavailable"
    assert await pool.fetchval("SELECT count(*) FROM users WHERE desk_id = $1", desk.desk_id) == 0
    assert await pool.fetchval("SELECT last_number FROM desk_counters WHERE desk_id = $1", desk.desk_id) == 0


async def test_a_rider_that_fails_a_shared_statement_fails_alone(
    database_url: str, pool: asyncpg.Pool, ids: Snowflake, desk: Desk, on_citus: bool
) -> None:
    """A shared statement that fails (here a rider whose priority the table refuses, as a bug past the
    body's checks would) is split until each rider runs alone: only that rider fails."""
    token = desk.token()
    good = [new_ticket(f"ok{i}@example.com", f"ok {i}") for i in range(7)]
    bad = msgspec.structs.replace(new_ticket("bad@example.com"), priority="sometime")
    before = splits()
    async with asyncpg.create_pool(database_url, min_size=1, max_size=2) as own_pool:
        coalescer = writer.Writer(  # as the service writes on this database
            Database(own_pool, 5.0), ids, slots=1, citus=on_citus, events=observability.METRICS
        )
        async with pool.acquire() as holder, holder.transaction():
            # Hold the counter while the creates queue up, so that they all ride one statement.
            await holder.execute("SELECT 1 FROM desk_counters WHERE desk_id = $1 FOR UPDATE", desk.desk_id)
            first = asyncio.create_task(coalescer.create(token, new_ticket("first@example.com", "first")))
            await asyncio.sleep(0.2)
            riders = [asyncio.create_task(coalescer.create(token, t)) for t in [*good[:3], bad, *good[3:]]]
            await asyncio.sleep(0.2)
        results = await asyncio.wait_for(asyncio.gather(first, *riders, return_exceptions=True), 10)
    assert isinstance(results[4], asyncpg.CheckViolationError)
    others = [r for i, r in enumerate(results) if i != 4]
    assert all(isinstance(r, Written) and r.outcomes == ["created"] for r in others), others
    assert splits() > before
    stored = await pool.fetch("SELECT number, subject FROM tickets WHERE desk_id = $1 ORDER BY number", desk.desk_id)
    assert [r["number"] for r in stored] == list(range(1, 9))
    assert sorted(r["subject"] for r in stored) == sorted(["first", *(f"ok {i}" for i in range(7))])


async def test_an_unavailable_database_fails_every_rider_at_once_without_splitting(
    database_url: str, pool: asyncpg.Pool, ids: Snowflake, desk: Desk, on_citus: bool
) -> None:
    """A statement timeout (the database cannot serve now) is every rider's answer: no split, no retries."""
    token = desk.token()
    before = splits()
    async with asyncpg.create_pool(
        database_url, min_size=1, max_size=2, server_settings={"statement_timeout": "300"}
    ) as own_pool:
        coalescer = writer.Writer(  # as the service writes on this database
            Database(own_pool, 5.0), ids, slots=1, citus=on_citus, events=observability.METRICS
        )
        async with pool.acquire() as holder, holder.transaction():
            await holder.execute("SELECT 1 FROM desk_counters WHERE desk_id = $1 FOR UPDATE", desk.desk_id)
            first = asyncio.create_task(coalescer.create(token, new_ticket("first@example.com")))
            await asyncio.sleep(0.1)
            riders = [asyncio.create_task(coalescer.create(token, new_ticket(f"r{i}@example.com"))) for i in range(4)]
            results = await asyncio.wait_for(asyncio.gather(first, *riders, return_exceptions=True), 10)
    assert [type(r) for r in results] == [ServiceUnavailable] * 5
    assert splits() == before
    assert await pool.fetchval("SELECT count(*) FROM users WHERE desk_id = $1", desk.desk_id) == 0
