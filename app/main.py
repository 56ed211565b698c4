"""The ASGI application: its routes (app/operations.py), error handlers, and the lifespan that makes
the services every route reaches (app/services.py)."""

import asyncio
import functools
import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware

from app import citus, db, idempotency, observability, operations, settings
from app.auth import TokenCache
from app.errors import exception_handlers
from app.ids import LeaseKeeper
from app.limiter import Limiter
from app.services import STATE_KEY, Services
from app.writer import Writer, prepare


def create_app(config: settings.Settings | None = None, dsn: str | None = None) -> Starlette:
    """Build the app. With no arguments (as `headoni serve` and uvicorn workers do) the settings come
    from the environment and the database from DATABASE_URL or the embedded server."""
    config = config or settings.load()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        url = dsn or db.database_url(config)
        await db.wait_until_reachable(url, config.startup_timeout)
        served = await citus.settle_at(url, config)
        keeper = await LeaseKeeper.start(url)
        try:
            init = functools.partial(prepare, one_desk=served.one_desk_statements, citus=served.citus)
            database = await db.Database.open(served, url, init)
        except BaseException:
            await keeper.close()
            raise
        limiter = await Limiter.open(url, served.default_limit, enabled=served.rate_limits)
        purge = asyncio.create_task(idempotency.purge_forever(database.pool, served.idempotency_ttl_seconds, 300.0))
        tokens = TokenCache(database, served.token_cache_seconds)
        await tokens.preload()
        writer = Writer(
            database, keeper.ids, slots=served.slots, one_desk=served.one_desk_statements,
            citus=served.citus, lock_timeout_ms=served.lock_timeout_ms, events=observability.METRICS,
            max_waiting=served.create_queue,
        )
        # What the process holds from here on for its life (modules, pools, caches) leaves the cyclic
        # garbage collector's scans: a full collection of it stalled the event loop 10-20 ms, several
        # times a second under load, on every request in flight (docs/benchmark.md); after this, 0.3-1 ms.
        gc.collect()
        gc.freeze()
        try:
            yield {
                STATE_KEY: Services(
                    served, database, keeper.ids, tokens, writer, limiter
                )
            }
        finally:
            purge.cancel()
            await limiter.close()
            await database.close()
            await keeper.close()

    app = Starlette(
        routes=operations.routes(),
        middleware=[Middleware(observability.Observability)],
        exception_handlers=exception_handlers(),
        lifespan=lifespan,
    )
    app.router.redirect_slashes = False  # an unknown route is 404, never a redirect to plain http
    return app
