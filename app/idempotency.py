"""Idempotency-Key: a request's outcome is stored with its key, and a retry replays it.

The record is written by the same statement as the tickets (sql/queries.sql, the create statement), so a key
costs no extra round trip; expired records are purged in small batches by a background task.
"""

import asyncio
import hashlib
import logging
import re
from typing import Final

import asyncpg
import msgspec
from starlette.requests import Request

from app.errors import IdempotencyKeyReused, Issue

HEADER: Final = "idempotency-key"
REPLAYED: Final = {"Idempotent-Replayed": "true"}
_KEY: Final = re.compile(r"[\x21-\x7e]{1,255}")  # visible ASCII
_PURGE_LOCK: Final = 0x4844_7075  # only one process purges at a time
_PURGE_BATCH: Final = 1000

log = logging.getLogger("headoni")


class Key(msgspec.Struct, frozen=True):
    key: str
    route: str
    fingerprint: bytes  # SHA-256 of the request body's bytes

    def check_reuse(self, route: str, fingerprint: bytes) -> None:
        """A stored outcome replays only for the same route and the same body."""
        if route != self.route or fingerprint != self.fingerprint:
            raise IdempotencyKeyReused()


def from_request(request: Request, route: str, body: bytes, issues: list[Issue]) -> Key | None:
    """The request's Idempotency-Key, or None; a malformed key is added to issues."""
    values = request.headers.getlist(HEADER)
    if not values:
        return None
    if len(values) > 1 or not _KEY.fullmatch(values[0]):
        issues.append(
            Issue(["Idempotency-Key"], "invalid_header", "Idempotency-Key must be 1 to 255 visible ASCII characters.")
        )
        return None
    return Key(values[0], route, hashlib.sha256(body).digest())


_PURGE: Final = """
WITH expired AS (
    SELECT desk_id, token_id, idem_key FROM idempotency_keys
    WHERE created_at < now() - make_interval(secs => $1)
    LIMIT $2
)
DELETE FROM idempotency_keys k USING expired e
WHERE k.desk_id = e.desk_id AND k.token_id = e.token_id AND k.idem_key = e.idem_key
"""


async def purge_expired(conn: asyncpg.Connection, ttl_seconds: float) -> int:
    """Delete records older than the TTL, a batch per short transaction; return how many."""
    deleted = 0
    while True:
        async with conn.transaction():
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _PURGE_LOCK):
                return deleted
            status = await conn.execute(_PURGE, ttl_seconds, _PURGE_BATCH)
        count = int(status.rsplit(" ", 1)[1])
        deleted += count
        if count < _PURGE_BATCH:
            return deleted


async def purge_forever(pool: asyncpg.Pool, ttl_seconds: float, every_seconds: float) -> None:
    """The background purge: records live at least ttl_seconds, and at most about every_seconds more."""
    while True:
        await asyncio.sleep(every_seconds)
        try:
            async with pool.acquire(timeout=5) as conn:
                await purge_expired(conn, ttl_seconds)
        except Exception:  # an outage must not end the task; the next round tries again
            log.warning("idempotency key purge failed; will retry", exc_info=True)
