"""Coalescing: concurrent single creates for one desk share one statement, one lock and one commit.

Every ticket on a desk bumps the desk's counter row, so concurrent creates on a hot desk queue on its
row lock, each holding it through its own commit. Here the first request for a desk (and token) runs
its statement at once; requests arriving meanwhile wait and then ride the next statement together,
up to 100 at a time. Each is still answered with its own ticket, and numbers stay gapless: a
statement writes all of its items or none. With no concurrency nothing waits.
"""

import asyncio
from typing import Final

import asyncpg

from app import db
from app.auth import Token
from app.ids import Snowflake
from app.tickets import Written, write_tickets
from app.validation import NewTicket

MAX_GROUP: Final = 100

_Waiter = tuple[NewTicket, "asyncio.Future[Written]"]


class Coalescer:
    def __init__(self, pool: asyncpg.Pool, ids: Snowflake, acquire_timeout: float) -> None:
        self._pool = pool
        self._ids = ids
        self._acquire_timeout = acquire_timeout
        # (desk, token) -> requests waiting for the statement in flight to finish; present while one is.
        self._waiting: dict[tuple[int, int], list[_Waiter]] = {}
        self._drains: set[asyncio.Task[None]] = set()

    async def create(self, token: Token, ticket: NewTicket) -> Written:
        """Write one ticket, alone or with others for the same desk; its own outcome."""
        key = (token.desk_id, token.token_id)
        waiting = self._waiting.get(key)
        if waiting is not None:
            future: asyncio.Future[Written] = asyncio.get_running_loop().create_future()
            waiting.append((ticket, future))
            return await future
        self._waiting[key] = []
        try:
            return await self._write(token, [ticket])
        finally:
            self._hand_off(key, token)

    async def _write(self, token: Token, tickets: list[NewTicket]) -> Written:
        async with db.connection(self._pool, self._acquire_timeout) as conn:
            return await write_tickets(conn, self._ids, token, tickets, None)

    def _hand_off(self, key: tuple[int, int], token: Token) -> None:
        if self._waiting[key]:
            task = asyncio.create_task(self._drain(key, token))
            self._drains.add(task)
            task.add_done_callback(self._drains.discard)
        else:
            del self._waiting[key]

    async def _drain(self, key: tuple[int, int], token: Token) -> None:
        """Write the waiting requests in groups until none is left."""
        while waiting := self._waiting[key]:
            group, self._waiting[key] = waiting[:MAX_GROUP], waiting[MAX_GROUP:]
            try:
                written = await self._write(token, [ticket for ticket, _ in group])
            except Exception as exc:
                for _, future in group:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), own in zip(group, written.split(), strict=True):
                if not future.done():
                    future.set_result(own)
        del self._waiting[key]
