"""Snowflake ids: milliseconds since 2015-01-01 UTC << 22 | worker << 12 | sequence.

Every process leases a worker number from the database (a session advisory lock on one of 1024 keys,
held by a connection kept for the life of the process), so two processes or hosts sharing a database
can never generate ids with the same worker bits by mistake.
"""

import asyncio
import time
from typing import Final

import asyncpg

EPOCH_MS: Final = 1_420_070_400_000  # 2015-01-01T00:00:00Z
WORKER_BITS: Final = 10
SEQUENCE_BITS: Final = 12
MAX_WORKER: Final = (1 << WORKER_BITS) - 1
MAX_SEQUENCE: Final = (1 << SEQUENCE_BITS) - 1
_LEASE_CLASS: Final = 0x4844  # first key of pg_try_advisory_lock(int, int): "HD"


class Snowflake:
    """Generates unique, time-ordered 64-bit ids for one worker number."""

    __slots__ = ("_last_ms", "_sequence", "worker")

    def __init__(self, worker: int) -> None:
        if not 0 <= worker <= MAX_WORKER:
            raise ValueError(f"worker must be 0..{MAX_WORKER}")
        self.worker = worker
        self._last_ms = 0
        self._sequence = 0

    def next_id(self) -> int:
        now = time.time_ns() // 1_000_000 - EPOCH_MS
        if now < self._last_ms:  # the clock stepped back: stay on the last millisecond
            now = self._last_ms
        if now == self._last_ms:
            self._sequence = (self._sequence + 1) & MAX_SEQUENCE
            if self._sequence == 0:  # 4096 ids in this millisecond: borrow the next one
                now = self._last_ms + 1
        else:
            self._sequence = 0
        self._last_ms = now
        return (now << (WORKER_BITS + SEQUENCE_BITS)) | (self.worker << SEQUENCE_BITS) | self._sequence

    def next_ids(self, count: int) -> list[int]:
        return [self.next_id() for _ in range(count)]


def decode(snowflake: int) -> tuple[int, int, int]:
    """Split an id into (unix milliseconds, worker, sequence)."""
    return (
        (snowflake >> (WORKER_BITS + SEQUENCE_BITS)) + EPOCH_MS,
        (snowflake >> SEQUENCE_BITS) & MAX_WORKER,
        snowflake & MAX_SEQUENCE,
    )


_LEASE = f"""
SELECT w FROM generate_series(0, {MAX_WORKER}) AS w
WHERE pg_try_advisory_lock({_LEASE_CLASS}, w)
LIMIT 1
"""


class WorkerLease:
    """Holds one worker number for this process through a dedicated database connection."""

    def __init__(self, conn: asyncpg.Connection, worker: int) -> None:
        self.conn = conn
        self.worker = worker

    @classmethod
    async def acquire(cls, dsn: str) -> "WorkerLease":
        conn = await asyncpg.connect(dsn, server_settings={"application_name": "headoni-worker-lease"})
        try:
            worker = await conn.fetchval(_LEASE)
        except BaseException:
            await conn.close()
            raise
        if worker is None:
            await conn.close()
            raise RuntimeError(f"all {MAX_WORKER + 1} snowflake worker numbers are leased")
        return cls(conn, worker)

    async def close(self) -> None:
        if not self.conn.is_closed():
            await asyncio.shield(self.conn.close())
