"""Coalescing: concurrent single creates share statements: one round trip and one commit for many.

A create needs the database for about one commit's time, and most of that is waiting: for the
WAL flush and, on a busy desk, for the desk's counter row, which each statement holds through its
commit. So the service runs at most `slots` create statements at a time (HEADONI_CREATE_STATEMENTS,
2: more statements in flight measured slower, see docs/benchmark.md); a request that finds one free
runs at once, taking along whatever is waiting, and
requests arriving while all are busy wait and ride the next statement together, up to 100 at a time.
Each is still answered with its own ticket, and numbers stay gapless: a statement writes all of its
items or none. With no concurrency nothing waits.

Which waiters ride together (HEADONI_STATEMENT_SCOPE): by default any, whatever their desks, which
on one PostgreSQL makes creates over many desks cheapest; with `one-desk`, only creates of one desk,
the oldest waiter's, written by the statement of one desk, which a distributed database (Citus) can
route to the desk's shard (docs/scaling.md).
"""

import asyncio
from collections import deque
from typing import Final

import asyncpg

from app import db
from app.auth import Token
from app.errors import ServiceUnavailable
from app.ids import Snowflake
from app.tickets import Entry, Written, write_entries
from app.validation import NewTicket

MAX_GROUP: Final = 100

_Waiter = tuple[Entry, "asyncio.Future[Written]"]


class Coalescer:
    def __init__(
        self, pool: asyncpg.Pool, ids: Snowflake, acquire_timeout: float, slots: int, *, one_desk: bool = False
    ) -> None:
        self._pool = pool
        self._ids = ids
        self._acquire_timeout = acquire_timeout
        self._slots = slots
        self._one_desk = one_desk
        self._running = 0
        self._waiting: deque[_Waiter] = deque()
        self._drains: set[asyncio.Task[None]] = set()

    async def create(self, token: Token, ticket: NewTicket) -> Written:
        """Write one ticket, alone or with others; its own outcome."""
        if self._running >= self._slots:
            future: asyncio.Future[Written] = asyncio.get_running_loop().create_future()
            self._waiting.append(((token, ticket), future))
            return await future
        self._running += 1
        try:
            group = self._take(MAX_GROUP - 1, token.desk_id)
            if not group:
                return await self._write([(token, ticket)])
            written = await self._write_group([((token, ticket), None), *group])
            assert written is not None
            return written
        finally:
            self._running -= 1
            self._start_drains()

    def _take(self, most: int, desk_id: int | None = None) -> list[_Waiter]:
        """Up to `most` waiters, oldest first; for one-desk statements, only those of desk_id (or of the
        oldest's desk)."""
        waiting = self._waiting
        if not self._one_desk:
            return [waiting.popleft() for _ in range(min(most, len(waiting)))]
        if desk_id is None and waiting:
            desk_id = waiting[0][0][0].desk_id
        taken: list[_Waiter] = []
        passed: deque[_Waiter] = deque()
        while waiting and len(taken) < most:
            waiter = waiting.popleft()
            (taken if waiter[0][0].desk_id == desk_id else passed).append(waiter)
        waiting.extendleft(reversed(passed))  # the others keep their places, ahead of later arrivals
        return taken

    async def _write(self, entries: list[Entry]) -> Written:
        async with db.connection(self._pool, self._acquire_timeout) as conn:
            return await write_entries(conn, self._ids, entries, one_desk=self._one_desk)

    async def _write_group(self, group: list[tuple[Entry, "asyncio.Future[Written] | None"]]) -> Written | None:
        """Write a group; settle the waiters' futures and return the outcome of the one without."""
        try:
            written = await self._write([entry for entry, _ in group])
        except BaseException as exc:
            # Cancelled (a shutdown past its grace period): the waiters must not wait forever either.
            shared = exc if isinstance(exc, Exception) else ServiceUnavailable()
            for _, future in group:
                if future is not None and not future.done():
                    future.set_exception(shared)
            if not isinstance(exc, Exception) or any(future is None for _, future in group):
                raise
            return None
        own: Written | None = None
        for (_, future), result in zip(group, written.split(), strict=True):
            if future is None:
                own = result
            elif not future.done():
                future.set_result(result)
        return own

    def _start_drains(self) -> None:
        while self._waiting and self._running < self._slots:
            self._running += 1
            task = asyncio.create_task(self._drain())
            self._drains.add(task)
            task.add_done_callback(self._drains.discard)

    async def _drain(self) -> None:
        """Write waiting requests in groups until none is left."""
        try:
            while self._waiting:
                await self._write_group([(entry, future) for entry, future in self._take(MAX_GROUP)])
        finally:
            self._running -= 1
