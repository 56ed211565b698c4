"""Coalescing: concurrent single creates share statements: one round trip and one commit for many.

A create needs the database for about one commit's time, and most of that is waiting: for the
WAL flush and, on a busy desk, for the desk's counter row, which each statement holds through its
commit. So the service runs at most `slots` create statements at a time (HEADONI_CREATE_STATEMENTS:
by default 1, or 2 with one-desk statements; more statements in flight measured slower, see
docs/benchmark.md); a request that finds one free
runs at once, taking along whatever is waiting, and
requests arriving while all are busy wait and ride the next statement together, up to 100 at a time.
Each is still answered with its own ticket, and numbers stay gapless: a statement writes all of its
items or none. With no concurrency nothing waits.

Which waiters ride together (HEADONI_STATEMENT_SCOPE): by default any, whatever their desks, which
on one PostgreSQL makes creates over many desks cheapest; with `one-desk`, only creates of one desk,
written by the statement of one desk, which a distributed database (Citus) can route to the desk's
shard (docs/scaling.md).

Fair under overload: waiters queue per desk, and desks take turns (round-robin). A statement of any
desks gives each waiting desk an equal share of its 100 places (a desk that needs fewer leaves its rest
to the others); with `one-desk` the desks' statements take turns. The queue is bounded
(HEADONI_CREATE_QUEUE, 400 per process): past it a create is shed with 503 and Retry-After rather than
queued, and the shedding falls on the desk with the most waiters: the newcomer if it is of that desk,
else that desk's newest waiter, so a flooding desk cannot push out another's creates.
"""

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Final

from app.auth import Token
from app.errors import Contended, ServiceUnavailable, Shed
from app.statement import Entry, Written
from app.validation import NewTicket

MAX_GROUP: Final = 100

_Waiter = tuple[Entry, "asyncio.Future[Written]"]
_Rider = tuple[Entry, "asyncio.Future[Written] | None"]  # a waiter, or (future None) the create that runs the statement


def _may_lie_with_one_rider(exc: Exception) -> bool:
    """Whether a failed shared statement may have failed for one rider's sake: the database aborted it on
    every attempt, or it failed unexpectedly. An unavailable database fails every rider alike."""
    return isinstance(exc, Contended) or not isinstance(exc, ServiceUnavailable)


def _fail(group: list[_Rider], exc: Exception, *, own: bool = True) -> None:
    """Give every waiter of the group the error; with own, raise it for the rider without a future, if any."""
    for _, future in group:
        if future is not None and not future.done():
            future.set_exception(exc)
    if own and any(future is None for _, future in group):
        raise exc


class Coalescer:
    """Runs `write` (a statement for a list of entries) for single creates, at most `slots` at a time."""

    def __init__(
        self,
        write: Callable[[list[Entry]], Awaitable[Written]],
        slots: int,
        *,
        one_desk: bool = False,
        max_waiting: int = 400,
        on_split: Callable[[], None] = lambda: None,
    ) -> None:
        self._write = write
        self._slots = slots
        self._one_desk = one_desk
        self._max_waiting = max_waiting
        self._on_split = on_split
        self._running = 0
        self._queues: dict[int, deque[_Waiter]] = {}  # by desk, in turn order: the next desk to serve first
        self._waiting = 0
        self._drains: set[asyncio.Task[None]] = set()

    async def create(self, token: Token, ticket: NewTicket) -> Written:
        """Write one ticket, alone or with others; its own outcome."""
        if self._running >= self._slots:
            future: asyncio.Future[Written] = asyncio.get_running_loop().create_future()
            self._enqueue(((token, ticket), future))
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

    def _enqueue(self, waiter: _Waiter) -> None:
        """Queue a waiter on its desk's turn; with the queue full, shed on the desk with the most waiters."""
        desk = waiter[0][0].desk_id
        if self._waiting >= self._max_waiting > 0:
            fattest = max(self._queues, key=lambda d: len(self._queues[d]))
            if len(self._queues.get(desk, ())) + 1 >= len(self._queues[fattest]):
                raise Shed()
            _, shed = self._queues[fattest].pop()  # that desk's newest: its oldest keep their places
            self._waiting -= 1
            if not shed.done():
                shed.set_exception(Shed())
        queue = self._queues.get(desk)
        if queue is None:
            queue = self._queues[desk] = deque()
        queue.append(waiter)
        self._waiting += 1

    def _take(self, most: int, desk_id: int | None = None) -> list[_Waiter]:
        """Up to `most` waiters, desks taking turns: of any desks, an equal share each (what a desk does not
        need goes to the others); for one-desk statements, those of desk_id, or of the desk whose turn it is."""
        queues = self._queues
        taken: list[_Waiter] = []
        if self._one_desk:
            desk = next(iter(queues), None) if desk_id is None else desk_id
            queue = queues.pop(desk, None) if desk is not None else None
            if desk is not None and queue is not None:
                taken = [queue.popleft() for _ in range(min(most, len(queue)))]
                if queue:
                    queues[desk] = queue  # to the back of the turn order
        else:
            while queues and len(taken) < most:
                share = max(1, (most - len(taken)) // len(queues))
                for desk in list(queues):
                    if len(taken) >= most:
                        break
                    queue = queues.pop(desk)
                    taken.extend(queue.popleft() for _ in range(min(share, len(queue), most - len(taken))))
                    if queue:
                        queues[desk] = queue  # served: to the back of the turn order
        self._waiting -= len(taken)
        return taken

    async def _write_group(self, group: list[_Rider]) -> Written | None:
        """Write a group; settle the waiters' futures and return the outcome of the one without."""
        try:
            written = await self._write([entry for entry, _ in group])
        except Exception as exc:
            if len(group) > 1 and _may_lie_with_one_rider(exc):
                return await self._split(group)
            _fail(group, exc)
            return None
        except BaseException:
            # Cancelled (a shutdown past its grace period): the waiters must not wait forever either.
            _fail(group, ServiceUnavailable(), own=False)
            raise
        own: Written | None = None
        for (_, future), result in zip(group, written.split(), strict=True):
            if future is None:
                own = result
            elif not future.done():
                future.set_result(result)
        return own

    async def _split(self, group: list[_Rider]) -> Written | None:
        """A shared statement has a shared fate: when it failed for a reason that may lie with one rider,
        write each half on its own (and so on, down to single riders), so each is answered on its merits."""
        self._on_split()
        half = len(group) // 2
        own: Written | None = None
        failure: Exception | None = None  # the rider without a future's own, raised once both halves are done
        for i, part in enumerate((group[:half], group[half:])):
            try:
                result = await self._write_group(part)
            except Exception as exc:
                failure = exc
            except BaseException:
                if i == 0:
                    _fail(group[half:], ServiceUnavailable(), own=False)
                raise
            else:
                own = result if result is not None else own
        if failure is not None:
            raise failure
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
