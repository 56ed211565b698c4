"""/healthz and /readyz: is the process alive, and can it serve."""

from typing import Literal

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from app.services import services


class Health(msgspec.Struct):
    """The body of /healthz and /readyz; the tests check real answers against it."""

    status: Literal["ok", "unavailable"]


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Ready: the database answers, and ids can be made (the worker lease is held or still reserved)."""
    found = services(request)
    try:
        if not found.ids.usable():
            raise RuntimeError("no snowflake worker lease")
        async with found.database.connection(2.0) as conn:
            await conn.fetchval("SELECT 1", timeout=2.0)
    except Exception:
        return JSONResponse({"status": "unavailable"}, 503, {"Retry-After": "1"})
    return JSONResponse({"status": "ok"})
