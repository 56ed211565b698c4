"""Who is calling: the desk named by the Host header, and the bearer token, cached briefly."""

import asyncio
import hashlib
import re
import secrets
import time
from typing import Any, Final

import msgspec

from app.db import Database
from app.errors import InsufficientScope, TokenDeskMismatch, Unauthenticated
from app.rates import Limit, from_columns

SCOPES: Final = frozenset({"tickets:create", "tickets:read"})
TOKEN_PREFIX: Final = "hd_"
SUBDOMAIN: Final = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
# Names no desk may take: they are, or may become, host names of the service itself (www.headoni.app,
# api.headoni.app, ...) or of mail and name servers. docs/api.md publishes this list; a test keeps them equal.
RESERVED_SUBDOMAINS: Final = frozenset({
    "admin", "api", "app", "assets", "auth", "cdn", "docs", "ftp", "imap", "localhost", "login",
    "mail", "ns1", "ns2", "pop", "smtp", "static", "status", "www",
})
_TOKEN_SHAPE: Final = re.compile(r"hd_[A-Za-z0-9_-]{16,200}")
# A Host value (or an absolute-form target's authority), stricter than RFC 3986 allows but wider than
# any real host: a DNS name (labels of letters, digits, "-" and "_", with at most one trailing dot), an
# IPv4 address, or a bracketed IPv6 literal, then an optional port of 1 to 5 digits. Not an empty
# label ("acme.localhost.."), an empty port ("acme.localhost:") or a port that is not a number.
_HOST: Final = re.compile(
    r"(?:[A-Za-z0-9_-]{1,63}(?:\.[A-Za-z0-9_-]{1,63})*\.?|\[[0-9A-Fa-f:.]{2,45}\])(?::([0-9]{1,5}))?"
)


class Token(msgspec.Struct, frozen=True):
    token_id: int
    desk_id: int
    subdomain: str
    name: str
    scopes: frozenset[str]
    channel: str  # "API Via <token name>", recorded on the events this token creates
    limit: Limit | None = None  # the token's own rate limit, else its desk's default (docs/limits.md)


def new_secret() -> str:
    """A fresh token: 32 random bytes, URL-safe, prefixed hd_. Shown once, never stored."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def valid_host(host: str) -> bool:
    """Whether a Host value is host[:port] as _HOST spells it, with a port below 65536."""
    match = _HOST.fullmatch(host)
    return match is not None and (match[1] is None or int(match[1]) <= 65535)


def desk_from_host(host: str | None, base_domain: str) -> str | None:
    """The desk subdomain a Host header names: exactly one valid label below the base domain."""
    if not host:
        return None
    host = host.strip().lower()
    if host.startswith("[") or not valid_host(host):  # an IPv6 literal names no desk, nor an odd spelling
        return None
    host = host.rsplit(":", 1)[0] if ":" in host else host
    host = host.removesuffix(".")
    suffix = "." + base_domain
    if not host.endswith(suffix):
        return None
    label = host[: -len(suffix)]
    return label if SUBDOMAIN.fullmatch(label) else None


# Where app/http.py leaves a request's token_key (it reads it first, to tell known clients from
# anonymous ones), so that authorize does not parse and hash the secret a second time.
SCOPE_TOKEN_KEY: Final = "headoni.token_key"


def token_key(authorization: str | None) -> bytes | None:
    """The token cache's key for an Authorization value (the sha256 of its bearer secret), or None
    when it holds no well-formed bearer token."""
    secret = bearer_secret(authorization)
    return digest(secret) if secret is not None else None


def bearer_secret(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, secret = authorization.strip().partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer" or not _TOKEN_SHAPE.fullmatch(secret):
        return None
    return secret


_VALID_TOKENS: Final = """
SELECT t.secret_sha256, t.token_id, t.desk_id, d.subdomain, t.name, t.scopes,
       coalesce(t.rate_units, d.rate_units) AS rate_units,
       CASE WHEN t.rate_units IS NULL THEN d.rate_seconds ELSE t.rate_seconds END AS rate_seconds,
       CASE WHEN t.rate_units IS NULL THEN d.rate_burst ELSE t.rate_burst END AS rate_burst
FROM api_tokens t JOIN desks d USING (desk_id)
WHERE t.revoked_at IS NULL
"""
_LOOKUP: Final = _VALID_TOKENS + "AND t.secret_sha256 = $1"
_NEWEST: Final = _VALID_TOKENS + "ORDER BY t.created_at DESC LIMIT $1"


class TokenCache:
    """Token lookups kept off the database on the hot path, each answer kept for at most `ttl`
    seconds, so a revoked token stops working within that bound. Unknown tokens are cached too, so
    a client hammering with a bad token costs one query per `ttl`; concurrent misses share a query."""

    def __init__(self, database: Database, ttl: float, max_entries: int = 10_000):
        self._database = database
        self._ttl = ttl
        self._max_entries = max_entries
        self._entries: dict[bytes, tuple[float, Token | None]] = {}
        self._pending: dict[bytes, asyncio.Future[Token | None]] = {}

    async def preload(self) -> int:
        """Look up the newest valid tokens (as many as the cache holds) at once, as a server starts: their
        first requests then need no lookup, and are known to the HTTP layer, which queues the requests of
        tokens it does not know (app/http.py). Returns how many."""
        async with self._database.connection() as conn:
            rows = await conn.fetch(_NEWEST, self._max_entries)
        expires = time.monotonic() + self._ttl
        for row in rows:
            self._entries[bytes(row["secret_sha256"])] = (expires, _token(row))
        return len(rows)

    def known(self, key: bytes) -> bool:
        """Whether this token was valid when last looked up, however long ago (no database access)."""
        entry = self._entries.get(key)
        return entry is not None and entry[1] is not None

    async def get(self, key: bytes) -> Token | None:
        entry = self._entries.get(key)
        if entry is not None and entry[0] > time.monotonic():
            return entry[1]
        pending = self._pending.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Token | None] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            started = time.monotonic()
            token = await self._load(key)
            if len(self._entries) >= self._max_entries:
                self._entries.clear()
            self._entries[key] = (started + self._ttl, token)
            future.set_result(token)
            return token
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters, if any, get it themselves
            raise
        finally:
            del self._pending[key]

    async def _load(self, key: bytes) -> Token | None:
        async with self._database.connection() as conn:
            row = await conn.fetchrow(_LOOKUP, key)
        return None if row is None else _token(row)


def _token(row: Any) -> Token:
    return Token(
        token_id=row["token_id"],
        desk_id=row["desk_id"],
        subdomain=row["subdomain"],
        name=row["name"],
        scopes=frozenset(row["scopes"]),
        channel=f"API Via {row['name']}",
        limit=from_columns(row["rate_units"], row["rate_seconds"], row["rate_burst"]),
    )


async def authorize(
    cache: TokenCache, key: bytes | None, host: str | None, base_domain: str, scope: str | None
) -> Token:
    """The contract's order: 401 unauthenticated, then 403 token_desk_mismatch, then 403 scope. `key` is
    the request's token_key."""
    token = await cache.get(key) if key is not None else None
    if token is None:
        raise Unauthenticated()
    if desk_from_host(host, base_domain) != token.subdomain:
        raise TokenDeskMismatch()
    if scope is not None and scope not in token.scopes:
        raise InsufficientScope(f"This token lacks the {scope} scope.")
    return token
