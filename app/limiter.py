"""Rate limits that hold across processes and hosts, with no database round trip per request.

Each token has one GCRA bucket in PostgreSQL (table rate_limit_buckets, the only shared store). A
process does not ask it per request: it leases a slice of units (at most a quarter second of the rate,
and half the burst) in one short statement, spends them locally, and leases the next slice before it
runs dry. When the bucket has no unit left, the database answers when the next one comes, and the
process answers 429 from memory until then. So in the steady state a request costs a dictionary look-up
and some arithmetic; a lease is a round trip every few hundred requests, on a small pool of its own, in
a transaction that does not wait for its WAL flush (a crash of the database forgets at most the last
few leases: a little more allowed, never less).

Units a process holds are spent whenever its token comes back, never thrown away, so a slow client is
not shortchanged; what a process holds is at most one slice, which bounds the error both ways. If a
lease fails (the database is away), the process limits on its own at its share of the limit (the
limit divided by the live processes it last counted) until a lease succeeds again. docs/limits.md
says all of this with numbers.
"""

import asyncio
import logging
import math
import os
import random
import time
from collections.abc import Awaitable
from typing import Final, TypeVar

import asyncpg

from app.auth import Token
from app.errors import RateLimited, Shed
from app.ids import now_ms
from app.rates import Limit

POLICY: Final = "creates"  # the name of the one quota policy, in RateLimit-Policy and RateLimit
LEASE_SECONDS: Final = 0.25  # a slice is at most this long a stretch of the rate
LEASE_TIMEOUT: Final = 0.5  # seconds a lease may take before the process limits on its own
RETRY_SECONDS: Final = 1.0  # after a failed lease, how long before the next attempt
PROCESSES_SECONDS: Final = 10.0  # how often the live processes are counted again
MAX_ALLOWANCES: Final = 100_000
# A connection answered 429 or a shed 503 is not read again for a while: the answer itself goes out at
# once, but a client that ignores Retry-After waits on its own socket instead of taking the event loop
# from the other desks. The pause is random between half and all of min(Retry-After, MAX_PAUSE), so that
# the paused connections of a flood come back spread out, not all in one turn of the event loop, and
# never later than Retry-After said.
MAX_PAUSE: Final = 1.0


def pause_after(retry_after: int) -> float:
    return min(float(retry_after), MAX_PAUSE) * random.uniform(0.5, 1.0)

log = logging.getLogger("headoni")
T = TypeVar("T")

# One bucket row, locked FOR NO KEY UPDATE in a transaction of its own, nothing else (docs/locking.md).
# GCRA: a unit is granted while the bucket's theoretical arrival time stays within burst x interval of
# now; each granted unit moves it on by one interval. Times are the database's, so hosts' clocks never
# matter. $1 desk, $2 token, $3 interval (µs a unit), $4 tolerance (burst x interval), $5 units wanted.
# statement_timestamp(), not clock_timestamp(): on Citus a volatile clock made the statement a plan of
# steps, which failed ("invalid input syntax for type bigint: "PGCOPY""), and every lease with it. After
# a wait for the row lock, now is the statement's start: a lease can only grant less, never more.
LEASE: Final = """
WITH clock AS (SELECT (extract(epoch FROM statement_timestamp()) * 1000000)::bigint AS now_us),
bucket AS (  -- a bucket further ahead than the tolerance was filled under another limit: forgiven
    SELECT greatest(least(b.tat_us, clock.now_us + $4::bigint), clock.now_us) AS base, clock.now_us
    FROM rate_limit_buckets b, clock
    WHERE b.desk_id = $1 AND b.token_id = $2
    FOR NO KEY UPDATE OF b
),
granted AS (
    SELECT base, now_us, least($5::bigint, greatest(0, (now_us + $4::bigint - base) / $3::bigint)) AS units
    FROM bucket
)
UPDATE rate_limit_buckets b SET tat_us = g.base + g.units * $3::bigint
FROM granted g
WHERE b.desk_id = $1 AND b.token_id = $2
RETURNING g.units, b.tat_us - g.now_us AS ahead_us
"""
# Tokens made before migration 0007 have their row; rows of tokens written by other means are made here.
SEED: Final = "INSERT INTO rate_limit_buckets (desk_id, token_id) VALUES ($1, $2) ON CONFLICT DO NOTHING"
LIVE_PROCESSES: Final = "SELECT count(*) FROM snowflake_workers WHERE reserved_until > $1"


def slice_of(limit: Limit) -> int:
    """How many units a process leases at once."""
    per_second = limit.units / limit.seconds
    return max(1, min(math.ceil(per_second * LEASE_SECONDS), limit.burst // 2))


class Allowance:
    """One token's units in this process: leased and unspent, and what the bucket said last."""

    __slots__ = (
        "denied_until", "limit", "local", "local_tat_us", "pending", "retry_at", "room", "room_at", "token", "units",
    )

    def __init__(self, token: Token, limit: Limit) -> None:
        self.token = token
        self.limit = limit
        self.units = 0
        self.room = limit.burst  # units the bucket still held after the last lease (a hint, for headers)
        self.room_at = 0.0
        self.denied_until = 0.0  # the bucket is empty until then: answer 429 without asking
        self.pending: asyncio.Task[None] | None = None
        self.local = False  # the last lease failed: limit on this process's own, at its share
        self.local_tat_us = 0.0
        self.retry_at = 0.0


class Admission:
    """What became of one create request at the limiter and the shedder, for its answer's RateLimit
    fields, the access log (`limit`) and /metrics. decision: allowed, unlimited (no limit applies),
    rate_limited, shed, or None (not reached: a bad body costs nothing)."""

    __slots__ = ("allowance", "decision", "limiter", "pause")

    def __init__(self, limiter: "Limiter", allowance: Allowance | None) -> None:
        self.limiter = limiter
        self.allowance = allowance
        self.decision: str | None = None
        self.pause = 0.0  # seconds the connection is not read after this answer (app/http.py)

    async def charge(self, cost: int) -> None:
        """Spend cost units of the token's limit, or raise RateLimited."""
        if self.allowance is None:
            self.decision = "unlimited"
            return
        if cost == 0:  # a batch of invalid items only
            self.decision = "allowed"
            return
        try:
            await self.limiter.charge(self.allowance, cost)
        except RateLimited as exc:
            self.decision = "rate_limited"
            self.pause = pause_after(exc.retry_after)
            raise
        self.decision = "allowed"

    async def shedding(self, pending: Awaitable[T]) -> T:
        """Await the write, noting a create shed past capacity (app/coalesce.py)."""
        try:
            return await pending
        except Shed:
            self.decision = "shed"
            self.pause = pause_after(1)  # a shed create's Retry-After is 1
            raise

    def fields(self) -> list[tuple[bytes, bytes]]:
        """RateLimit-Policy and RateLimit (draft-ietf-httpapi-ratelimit-headers-10), or none without a limit."""
        return [] if self.allowance is None else self.limiter.fields(self.allowance)


class Limiter:
    """The process's side of the shared buckets: its allowances, and the pool its leases run on."""

    def __init__(self, pool: asyncpg.Pool | None, default: Limit | None, *, enabled: bool = True) -> None:
        self._pool = pool
        self._default = default
        self._enabled = enabled
        self._allowances: dict[int, Allowance] = {}
        self._processes = 1
        self._processes_at = -PROCESSES_SECONDS
        self._policies: dict[Limit, bytes] = {}
        self._failing = False

    @classmethod
    async def open(cls, dsn: str, default: Limit | None, *, enabled: bool = True) -> "Limiter":
        pool = await asyncpg.create_pool(
            dsn, min_size=0, max_size=2, timeout=LEASE_TIMEOUT, command_timeout=LEASE_TIMEOUT * 2, reset=_no_reset,
            server_settings={
                "application_name": f"headoni-limits {os.getpid()}",  # one name per process
                "synchronous_commit": "off",  # see the module's docstring
                "statement_timeout": "1000",
                "lock_timeout": "500",
            },
        )
        return cls(pool, default, enabled=enabled)

    async def close(self) -> None:
        for allowance in self._allowances.values():
            if allowance.pending is not None:
                allowance.pending.cancel()
        if self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), 5.0)
            except TimeoutError:
                self._pool.terminate()

    def limit_of(self, token: Token) -> Limit | None:
        """The token's own limit, else its desk's (both loaded with the token), else the service's."""
        if not self._enabled:
            return None
        return token.limit or self._default

    def admission(self, token: Token) -> Admission:
        limit = self.limit_of(token)
        if limit is None:
            return Admission(self, None)
        allowance = self._allowances.get(token.token_id)
        if allowance is None:
            if len(self._allowances) >= MAX_ALLOWANCES:
                self._forget_idle()
            allowance = self._allowances[token.token_id] = Allowance(token, limit)
        elif allowance.limit != limit:  # changed by `headoni token limit` or `desk limit`
            allowance.limit = limit
        return Admission(self, allowance)

    async def charge(self, allowance: Allowance, cost: int) -> None:
        """Spend cost units, from the units held, else from a lease; else raise RateLimited."""
        limit = allowance.limit
        if cost > limit.burst:
            raise RateLimited(
                math.ceil(limit.burst * limit.interval_us / 1e6),
                f"This request costs {cost} units, more than the token's burst of {limit.burst}: "
                "send fewer tickets per request.",
            )
        while True:
            if allowance.units >= cost:
                allowance.units -= cost
                self._prefetch(allowance)
                return
            now = time.monotonic()
            if allowance.local:
                self._charge_locally(allowance, cost, now)
                self._prefetch(allowance)  # the next lease attempt, in the background
                return
            if allowance.denied_until > now:
                missing = cost - allowance.units - 1  # units beyond the next one, an interval each
                raise RateLimited(_seconds(allowance.denied_until - now + missing * limit.interval_us / 1e6))
            await self._lease(allowance, max(cost - allowance.units, slice_of(limit)))

    def _prefetch(self, allowance: Allowance) -> None:
        """Lease the next slice in the background before the units run out (or, limiting locally after a
        failed lease, try the database again once RETRY_SECONDS have passed)."""
        if allowance.pending is not None:
            return
        now = time.monotonic()
        if allowance.local:
            if now >= allowance.retry_at:
                allowance.retry_at = now + RETRY_SECONDS
                allowance.pending = asyncio.create_task(self._run_lease(allowance, slice_of(allowance.limit)))
            return
        wanted = slice_of(allowance.limit)
        if allowance.units <= wanted // 2 and allowance.denied_until <= now:
            allowance.pending = asyncio.create_task(self._run_lease(allowance, wanted))

    async def _lease(self, allowance: Allowance, wanted: int) -> None:
        """Wait for a lease of the token's bucket: the one already under way, or a new one."""
        if allowance.pending is None:
            allowance.pending = asyncio.create_task(self._run_lease(allowance, wanted))
        await asyncio.shield(allowance.pending)

    async def _run_lease(self, allowance: Allowance, wanted: int) -> None:
        limit = allowance.limit
        interval, tolerance = limit.interval_us, limit.burst * limit.interval_us
        try:
            granted, ahead_us = await self._fetch_lease(allowance.token, interval, tolerance, wanted)
        except Exception as exc:  # the database is away, slow, or worse: never fail the request for it
            now = time.monotonic()
            if not allowance.local:
                allowance.local = True
                allowance.local_tat_us = now * 1e6
            allowance.retry_at = now + RETRY_SECONDS
            if not self._failing:
                self._failing = True
                log.warning("rate limit leases fail (%s); each process limits on its own at 1/%d of the limit",
                            type(exc).__name__, self._processes)
            return
        finally:
            allowance.pending = None
        now = time.monotonic()
        if self._failing:
            self._failing = False
            log.warning("rate limit leases work again")
        allowance.local = False
        allowance.units += granted
        allowance.room = max(0, (tolerance - ahead_us) // interval)
        allowance.room_at = now
        if granted < wanted:  # the bucket is empty: no unit before ahead_us comes within the tolerance
            allowance.denied_until = now + max(0, ahead_us - tolerance + interval) / 1e6

    async def _fetch_lease(self, token: Token, interval: int, tolerance: int, wanted: int) -> tuple[int, int]:
        if self._pool is None:
            raise RuntimeError("this limiter has no database")
        async with asyncio.timeout(LEASE_TIMEOUT), self._pool.acquire() as conn:
            row = await conn.fetchrow(LEASE, token.desk_id, token.token_id, interval, tolerance, wanted)
            if row is None:
                await conn.execute(SEED, token.desk_id, token.token_id)
                row = await conn.fetchrow(LEASE, token.desk_id, token.token_id, interval, tolerance, wanted)
            if time.monotonic() - self._processes_at >= PROCESSES_SECONDS:
                self._processes = max(1, int(await conn.fetchval(LIVE_PROCESSES, now_ms())))
                self._processes_at = time.monotonic()
        assert row is not None
        return int(row["units"]), int(row["ahead_us"])

    def _charge_locally(self, allowance: Allowance, cost: int, now: float) -> None:
        """GCRA on this process alone, at its share of the limit: the limit divided by the live processes."""
        limit, share = allowance.limit, self._processes
        interval = limit.interval_us * share
        tolerance = max(1, limit.burst // share) * interval
        now_us = now * 1e6
        after = max(allowance.local_tat_us, now_us) + cost * interval
        if after - now_us > tolerance:
            raise RateLimited(_seconds((after - now_us - tolerance) / 1e6))
        allowance.local_tat_us = after

    def fields(self, allowance: Allowance) -> list[tuple[bytes, bytes]]:
        limit = allowance.limit
        policy = self._policies.get(limit)
        if policy is None:
            policy = self._policies[limit] = (
                f'"{POLICY}";q={limit.units};w={limit.seconds};headoni-burst={limit.burst}'.encode()
            )
        now = time.monotonic()
        interval = limit.interval_us / 1e6
        if allowance.local:
            ahead = max(0.0, allowance.local_tat_us / 1e6 - now)
            share = self._processes
            remaining = max(0, int((max(1, limit.burst // share) * interval * share - ahead) // (interval * share)))
            wait = interval * share
        elif allowance.denied_until > now:
            remaining, wait = allowance.units, allowance.denied_until - now
        else:
            remaining = allowance.units + min(limit.burst, allowance.room + int((now - allowance.room_at) / interval))
            wait = interval
        remaining = min(remaining, limit.burst)
        value = f'"{POLICY}";r={remaining}'
        if remaining < limit.burst:  # t: seconds until another unit comes; a full bucket gets none
            value += f";t={_seconds(wait)}"
        return [(b"ratelimit-policy", policy), (b"ratelimit", value.encode())]

    def _forget_idle(self) -> None:
        """Bound memory: drop the allowances holding nothing (the buckets remember what matters)."""
        for key in [k for k, a in self._allowances.items() if a.units == 0 and a.pending is None]:
            del self._allowances[key]


def _seconds(value: float) -> int:
    """Whole seconds, rounded up, at least 1 (Retry-After and t never promise sooner than true)."""
    return max(1, math.ceil(value - 1e-9))


async def _no_reset(conn: asyncpg.Connection) -> None:
    """No RESET ALL on release: the limiter never changes session state."""
