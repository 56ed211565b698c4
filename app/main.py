"""The ASGI application: routes, error handlers, and the lifespan that owns the pool."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from app import batch, db, idempotency, observability, openapi, reads, settings, tickets
from app.auth import TokenCache
from app.errors import exception_handlers
from app.ids import LeaseKeeper
from app.limiter import Limiter
from app.writer import Writer


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Ready: the database answers, and ids can be made (the worker lease is held or still reserved)."""
    try:
        if not request.state.ids.usable():
            raise RuntimeError("no snowflake worker lease")
        async with request.state.database.connection(2.0) as conn:
            await conn.fetchval("SELECT 1", timeout=2.0)
    except Exception:
        return JSONResponse({"status": "unavailable"}, 503, {"Retry-After": "1"})
    return JSONResponse({"status": "ok"})


def create_app(config: settings.Settings | None = None, dsn: str | None = None) -> Starlette:
    """Build the app. With no arguments (as `headoni serve` and uvicorn workers do) the settings come
    from the environment and the database from DATABASE_URL or the embedded server."""
    config = config or settings.load()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        url = dsn or db.database_url(config)
        await db.wait_until_reachable(url, config.startup_timeout)
        keeper = await LeaseKeeper.start(url)
        try:
            database = await db.Database.open(config, url)
        except BaseException:
            await keeper.close()
            raise
        pool = database.pool
        limiter = await Limiter.open(url, config.default_limit, enabled=config.rate_limits)
        purge = asyncio.create_task(idempotency.purge_forever(pool, config.idempotency_ttl_seconds, 300.0))
        try:
            yield {
                "settings": config,
                "database": database,
                "ids": keeper.ids,
                "tokens": TokenCache(database, config.token_cache_seconds),
                "writer": Writer(
                    database, keeper.ids, slots=config.create_statements, one_desk=config.one_desk_statements,
                    events=observability.METRICS, max_waiting=config.create_queue,
                ),
                "limiter": limiter,
            }
        finally:
            purge.cancel()
            await limiter.close()
            await database.close()
            await keeper.close()

    routes = [
        Route("/api/v1/tickets", tickets.post_ticket, methods=["POST"]),
        Route("/api/v1/tickets/batch", batch.post_batch, methods=["POST"]),
        Route("/api/v1/tickets/{ref}", reads.get_ticket, methods=["GET"]),
        Route("/api/v1/departments", reads.list_departments, methods=["GET"]),
        Route("/api/v1/ticket-types", reads.list_ticket_types, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", observability.metrics, methods=["GET"]),
        *openapi.routes(),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(observability.Observability)],
        exception_handlers=exception_handlers(),
        lifespan=lifespan,
    )
    app.router.redirect_slashes = False  # an unknown route is 404, never a redirect to plain http
    return app
