"""The one writer of tickets: every create goes through Writer, which runs the create statement
(app/statement.py, sql/queries.sql), runs it again where that is safe, replays what an Idempotency-Key
stored, and lets concurrent single creates share statements (app/coalesce.py)."""

import asyncio
import random
from typing import Any, Final, Protocol

import asyncpg

from app import statement
from app.auth import Token
from app.coalesce import Coalescer
from app.db import Database
from app.errors import Contended
from app.idempotency import Key
from app.ids import Snowflake
from app.statement import CreatedTicket, Entry, Outcome, Requester, Written
from app.validation import NewTicket

# Each run of the statement either succeeds or aborts whole, so running it again is always safe. A run
# that lost the race for its Idempotency-Key to a concurrent request with the same key is run again, and
# replays. A deadlock or serialization failure should not happen (the lock order of sql/queries.sql rules
# deadlocks out; the statement runs in READ COMMITTED), but if the database reports one anyway the
# statement is run again, a bounded number of times after a short random pause, before the write gives up.
_KEY_ATTEMPTS: Final = 5
_KEY_CONSTRAINT: Final = "idempotency_keys_pkey"
_KEY_TAKEN: Final = "HD002"  # headoni_create_for_desk()'s word for it (Citus drops a shard's constraint name)
_ABORTED: Final = (asyncpg.exceptions.DeadlockDetectedError, asyncpg.exceptions.SerializationError)
ABORTED_ATTEMPTS: Final = 3
_PAUSE_SECONDS: Final = 0.002  # the first pause is up to 2 ms, then up to 4 ms, ...


class Events(Protocol):
    """What the writer reports as it goes (app/observability.py counts it)."""

    def written(self, outcomes: list[Outcome]) -> None: ...  # a statement wrote (not a replay)

    def aborted(self, sqlstate: str) -> None: ...  # the database aborted a run of a statement

    def split(self) -> None: ...  # a failed shared statement was split in two


class Unobserved:
    """Events that go nowhere, for callers that count nothing."""

    def written(self, outcomes: list[Outcome]) -> None:
        pass

    def aborted(self, sqlstate: str) -> None:
        pass

    def split(self) -> None:
        pass


class Writer:
    """Writes creates: single ones sharing statements, keyed ones and batches each in a statement of its
    own; with one_desk, every statement is of one desk (HEADONI_STATEMENT_SCOPE=one-desk); with citus,
    each is the call Citus routes to the desk's worker, run there with lock_timeout_ms (app/citus.py)."""

    def __init__(
        self,
        database: Database,
        ids: Snowflake,
        *,
        slots: int,
        one_desk: bool = False,
        citus: bool = False,
        lock_timeout_ms: int = 0,
        events: Events | None = None,
        max_waiting: int = 400,    ) -> None:
        self._database = database
        self._ids = ids
        self._one_desk = one_desk or citus
        self._citus = citus
        self._lock_timeout_ms = lock_timeout_ms
        self._events: Events = events or Unobserved()
        self._coalescer = Coalescer(
            self._write_shared, slots, one_desk=self._one_desk, max_waiting=max_waiting, on_split=self._events.split
        )

    async def create(self, token: Token, ticket: NewTicket) -> Written:
        """Write one ticket, riding a statement with whatever creates are waiting; its own outcome."""
        return await self._coalescer.create(token, ticket)

    async def write(self, token: Token, items: list[NewTicket], key: Key | None) -> Written:
        """Write one request's items in a statement of its own, or replay what its key stored."""
        async with self._database.connection() as conn:
            return await self._write(conn, [(token, item) for item in items], key, token)

    async def _write_shared(self, entries: list[Entry]) -> Written:
        async with self._database.connection() as conn:
            return await self._write(conn, entries)

    async def _write(
        self, conn: asyncpg.Connection, entries: list[Entry], key: Key | None = None, owner: Token | None = None
    ) -> Written:
        return await write(conn, self._ids, entries, key, owner, one_desk=self._one_desk, citus=self._citus,
                           lock_timeout_ms=self._lock_timeout_ms, events=self._events)


async def prepare(conn: asyncpg.Connection, *, one_desk: bool = False, citus: bool = False) -> None:
    """Ready a new pool connection for creates (Database.open's init): prepare the statement, so that the
    first create riding the connection does not wait 10-30 ms for its types to be looked up and its plan
    made. A run with no items does it all and writes nothing; on Citus the call is only prepared, since
    Citus routes it by its desk, which a call of no items has not."""
    if citus:
        await conn.prepare(statement.CREATE_ON_CITUS)
        return
    text, args = statement.of_nothing(one_desk=one_desk)
    await conn.fetchrow(text, *args)


async def write(
    conn: asyncpg.Connection,
    ids: Snowflake,
    entries: list[Entry],
    key: Key | None = None,
    owner: Token | None = None,
    *,
    one_desk: bool = False,
    citus: bool = False,
    lock_timeout_ms: int = 0,
    events: Events | None = None,
) -> Written:
    """Create entries (of any desks, or with one_desk of one) in one statement on conn, or with citus in
    the call Citus routes (statement.build). With a key (of owner, the token of the request, whose desk
    every entry is of), or replay the outcome stored under it."""
    events = events or Unobserved()
    new_ids = ids.next_ids(statement.IDS_PER_ITEM * len(entries))
    text, args = statement.build(
        entries, key, owner, new_ids, one_desk=one_desk, citus=citus, lock_timeout_ms=lock_timeout_ms
    )
    row = await _run(conn, text, args, events)
    if row["route"] is not None:
        assert key is not None and owner is not None
        key.check_reuse(row["route"], row["fingerprint"])
        stored = await _stored_tickets(conn, owner.desk_id, row["replay_ticket_ids"])
        return Written([Outcome(o) for o in row["replay_outcomes"]], stored, replayed=True)
    written = statement.written(row, entries, args)
    events.written(written.outcomes)
    return written


async def _run(conn: asyncpg.Connection, text: str, args: tuple[Any, ...], events: Events) -> asyncpg.Record:
    """Run the create statement, again where a run aborted whole for a reason that a rerun can outlive."""
    key_attempts = aborted_attempts = 0
    while True:
        try:
            return await conn.fetchrow(text, *args)
        except _ABORTED as exc:
            aborted_attempts += 1
            events.aborted(exc.sqlstate)
            if aborted_attempts == ABORTED_ATTEMPTS:
                raise Contended() from exc
            await asyncio.sleep(random.uniform(0, _PAUSE_SECONDS * 2**aborted_attempts))
        except asyncpg.PostgresError as exc:
            key_attempts += 1
            lost_key = exc.sqlstate == _KEY_TAKEN or (
                isinstance(exc, asyncpg.UniqueViolationError) and exc.constraint_name == _KEY_CONSTRAINT
            )
            if not lost_key or key_attempts == _KEY_ATTEMPTS:
                raise


async def _stored_tickets(conn: asyncpg.Connection, desk_id: int, ticket_ids: list[int]) -> list[CreatedTicket]:
    if not ticket_ids:
        return []
    rows = await conn.fetch(statement.STORED_TICKETS, desk_id, ticket_ids)
    return [CreatedTicket(str(r[0]), r[1], r[2], r[3], Requester(r[4])) for r in rows]
