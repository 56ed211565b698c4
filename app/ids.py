"""Snowflake ids: milliseconds since 2015-01-01 UTC << 22 | worker << 12 | sequence.

Every process leases a worker number from the database: a session advisory lock on one of 1024 keys,
held by a connection of its own. The lock alone cannot stop two processes sharing a worker number when
a lease is lost (the database restarts, the connection drops) while the process keeps generating ids
and another process takes the number. So a lease also reserves, in table snowflake_workers and before
any id is generated, the milliseconds its ids may use: a holder never generates an id past its committed
reservation, and a new holder of the number starts after it. Ids therefore never collide, whenever a
lease is lost or noticed lost, and whatever the clocks of the hosts say.
"""

import asyncio
import logging
import time
import uuid
from typing import Final

import asyncpg

from app.errors import ServiceUnavailable

EPOCH_MS: Final = 1_420_070_400_000  # 2015-01-01T00:00:00Z
WORKER_BITS: Final = 10
SEQUENCE_BITS: Final = 12
MAX_WORKER: Final = (1 << WORKER_BITS) - 1
MAX_SEQUENCE: Final = (1 << SEQUENCE_BITS) - 1
_LEASE_CLASS: Final = 0x4844  # first key of pg_try_advisory_lock(int, int): "HD"
RESERVE_MS: Final = 10_000  # how far ahead of now a lease reserves its milliseconds
RENEW_BELOW_MS: Final = 6_000  # the keeper renews when less than this remains
_TICK: Final = 1.0  # seconds between the keeper's checks
_CONNECT_TIMEOUT: Final = 3.0
_QUERY_TIMEOUT: Final = 3.0

log = logging.getLogger("headoni")


def now_ms() -> int:
    """Milliseconds since the snowflake epoch."""
    return time.time_ns() // 1_000_000 - EPOCH_MS


class LeaseExpired(ServiceUnavailable):
    default_message = "This server holds no id lease right now (the database was unreachable); retry shortly."


class Snowflake:
    """Generates unique, time-ordered 64-bit ids for one worker number.

    Ids come after `after_ms` (milliseconds spent by an earlier holder of the worker number) and, when
    `until_ms` is set, never past it: past the reservation next_id raises LeaseExpired (a 503).
    """

    __slots__ = ("_last_ms", "_sequence", "until_ms", "worker")

    def __init__(self, worker: int, *, after_ms: int = 0, until_ms: int | None = None) -> None:
        if not 0 <= worker <= MAX_WORKER:
            raise ValueError(f"worker must be 0..{MAX_WORKER}")
        self.worker = worker
        self.until_ms = until_ms
        self._last_ms = after_ms
        self._sequence = MAX_SEQUENCE  # so an id in the millisecond after_ms itself is never made

    def next_id(self) -> int:
        now = time.time_ns() // 1_000_000 - EPOCH_MS
        sequence = 0
        if now <= self._last_ms:  # same millisecond, or the clock stepped back: stay on the last one
            now = self._last_ms
            sequence = (self._sequence + 1) & MAX_SEQUENCE
            if sequence == 0:  # 4096 ids in this millisecond: borrow the next one
                now += 1
        if self.until_ms is not None and now > self.until_ms:
            raise LeaseExpired()
        self._last_ms, self._sequence = now, sequence
        return (now << (WORKER_BITS + SEQUENCE_BITS)) | (self.worker << SEQUENCE_BITS) | sequence

    def next_ids(self, count: int) -> list[int]:
        return [self.next_id() for _ in range(count)]

    @property
    def last_ms(self) -> int:
        """The millisecond of the last id made (or the floor it started after)."""
        return self._last_ms

    def usable(self) -> bool:
        return self.until_ms is None or now_ms() <= self.until_ms

    def move(self, worker: int, after_ms: int, until_ms: int) -> None:
        """Continue on another worker number, after the milliseconds its earlier holders spent."""
        self.worker = worker
        self.until_ms = until_ms
        # The next id takes a millisecond after both: unique on the new number, ordered after the old.
        self._last_ms, self._sequence = max(self._last_ms, after_ms), MAX_SEQUENCE


def decode(snowflake: int) -> tuple[int, int, int]:
    """Split an id into (unix milliseconds, worker, sequence)."""
    return (
        (snowflake >> (WORKER_BITS + SEQUENCE_BITS)) + EPOCH_MS,
        (snowflake >> SEQUENCE_BITS) & MAX_WORKER,
        snowflake & MAX_SEQUENCE,
    )


# Free numbers first: a number held by a live process has a reservation in the future; among free
# ones the least recently reserved, so a new holder rarely has to start in the future.
_CANDIDATES: Final = """
SELECT worker FROM snowflake_workers ORDER BY worker = $1 DESC, reserved_until, worker
"""
_TRY_LOCK: Final = f"SELECT pg_try_advisory_lock({_LEASE_CLASS}, $1::int)"
_RESERVATION: Final = "SELECT reserved_until, holder FROM snowflake_workers WHERE worker = $1"
_RESERVE: Final = """
UPDATE snowflake_workers SET reserved_until = $2, holder = $3 WHERE worker = $1 AND holder IS NOT DISTINCT FROM $4
"""


class WorkerLease:
    """Holds one worker number through a dedicated connection, and its reservation of milliseconds.

    `after_ms`: the earlier holders' reservation, which this holder's ids must come after;
    `until_ms`: how far this holder's own committed reservation reaches; `previous_holder`: who
    reserved the number last before this lease.
    """

    def __init__(
        self,
        conn: asyncpg.Connection,
        worker: int,
        *,
        holder: uuid.UUID,
        previous_holder: uuid.UUID | None,
        after_ms: int,
        until_ms: int,
    ) -> None:
        self.conn = conn
        self.worker = worker
        self.holder = holder
        self.previous_holder = previous_holder
        self.after_ms = after_ms
        self.until_ms = until_ms

    @classmethod
    async def acquire(cls, dsn: str, *, holder: uuid.UUID | None = None, prefer: int = -1) -> "WorkerLease":
        conn = await asyncpg.connect(
            dsn, timeout=_CONNECT_TIMEOUT, server_settings={"application_name": "headoni-worker-lease"}
        )
        try:
            return await cls.take(conn, holder or uuid.uuid4(), prefer)
        except BaseException:
            conn.terminate()
            raise

    @classmethod
    async def take(cls, conn: asyncpg.Connection, holder: uuid.UUID, prefer: int = -1) -> "WorkerLease":
        """Lease a number on an open connection, which then belongs to the lease."""
        for (worker,) in await conn.fetch(_CANDIDATES, prefer, timeout=_QUERY_TIMEOUT):
            if await conn.fetchval(_TRY_LOCK, worker, timeout=_QUERY_TIMEOUT):
                break
        else:
            raise RuntimeError(f"all {MAX_WORKER + 1} snowflake worker numbers are leased")
        # Read under the lock: no other process can reserve this number now.
        row = await conn.fetchrow(_RESERVATION, worker, timeout=_QUERY_TIMEOUT)
        after_ms, previous = row["reserved_until"], row["holder"]
        until_ms = max(now_ms(), after_ms) + RESERVE_MS
        if await conn.execute(_RESERVE, worker, until_ms, holder, previous, timeout=_QUERY_TIMEOUT) != "UPDATE 1":
            raise RuntimeError(f"snowflake worker {worker} could not be reserved")
        return cls(conn, worker, holder=holder, previous_holder=previous, after_ms=after_ms, until_ms=until_ms)

    def snowflake(self) -> Snowflake:
        """A generator for this lease, bounded by its reservation (renew it to go on)."""
        return Snowflake(self.worker, after_ms=self.after_ms, until_ms=self.until_ms)

    async def renew(self, until_ms: int) -> None:
        """Extend the reservation to until_ms; raises if the lease is gone. Only once this returns may
        ids use the new milliseconds: a reservation whose commit is in doubt is never used."""
        status = await self.conn.execute(
            _RESERVE, self.worker, until_ms, self.holder, self.holder, timeout=_QUERY_TIMEOUT
        )
        if status != "UPDATE 1":
            raise RuntimeError(f"snowflake worker {self.worker} is no longer reserved by this process")
        self.until_ms = until_ms

    async def close(self, spent_ms: int | None = None) -> None:
        """Release the number. With spent_ms (the last millisecond used), shrink the reservation to it
        first, so the next holder need not start in the future."""
        if self.conn.is_closed():
            return
        try:
            if spent_ms is not None and spent_ms < self.until_ms:
                await self.renew(spent_ms)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError):
            pass  # the reservation stays as it was: safe, only further ahead
        finally:
            await asyncio.shield(self.conn.close(timeout=_QUERY_TIMEOUT))


class LeaseKeeper:
    """Keeps the process's Snowflake (`ids`) backed by a live lease: renews the reservation ahead of
    time and, when the lease connection is lost, takes a lease again (the same number when it is free
    and nobody reserved it meanwhile). While it holds none, ids run only to the end of the last
    reservation; past it next_id raises LeaseExpired, so writes answer 503 until a lease is back."""

    def __init__(self, dsn: str, lease: WorkerLease) -> None:
        self._dsn = dsn
        self._lease: WorkerLease | None = lease
        self._holder = lease.holder
        self.ids = lease.snowflake()
        self._wake = asyncio.Event()
        self._watch(lease)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="headoni-lease-keeper")

    @classmethod
    async def start(cls, dsn: str) -> "LeaseKeeper":
        return cls(dsn, await WorkerLease.acquire(dsn))

    @property
    def lease(self) -> WorkerLease | None:
        """The lease held now, if any."""
        return self._lease

    @property
    def holding(self) -> bool:
        """Whether a lease is held and the ids are within its reservation."""
        return self._lease is not None and not self._lease.conn.is_closed() and self.ids.usable()

    def _watch(self, lease: WorkerLease) -> None:
        lease.conn.add_termination_listener(lambda _conn: self._wake.set())

    async def _run(self) -> None:
        failing = False
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), _TICK)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self._tend()
            except Exception as exc:  # the database is away, or worse: keep trying, never die
                if self._lease is not None:
                    self._lease.conn.terminate()
                    self._lease = None
                if not failing:
                    log.warning("snowflake worker lease lost (%s); taking one again", type(exc).__name__)
                failing = True
            else:
                if failing:
                    log.warning("snowflake worker lease held again: worker %d", self.ids.worker)
                failing = False

    async def _tend(self) -> None:
        lease = self._lease
        if lease is not None and lease.conn.is_closed():
            lease, self._lease = None, None
        if lease is None:
            lease = await WorkerLease.acquire(self._dsn, holder=self._holder, prefer=self.ids.worker)
            if lease.worker == self.ids.worker and lease.previous_holder == self._holder:
                # Nobody reserved the number since this process did: its ids go on from where they are.
                self.ids.until_ms = lease.until_ms
            else:
                self.ids.move(lease.worker, lease.after_ms, lease.until_ms)
            self._lease = lease
            self._watch(lease)
        elif lease.until_ms - now_ms() < RENEW_BELOW_MS:
            await lease.renew(max(now_ms(), self.ids.last_ms) + RESERVE_MS)
            self.ids.until_ms = lease.until_ms

    async def close(self) -> None:
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        spent = self.ids.last_ms
        self.ids.until_ms = spent  # no id after this point: the reservation can shrink to it
        if self._lease is not None:
            await self._lease.close(spent)
