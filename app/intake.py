"""What every create route does first, in the contract's order, once its token is authorized
(app/operations.py): the body (within its size and its time), then the headers' issues, to be listed
with the body's. The route then checks the body (400) and charges the token's rate limit through the
admission (429)."""

import asyncio
from typing import NamedTuple

from starlette.requests import Request
from starlette.responses import Response

from app import idempotency
from app.auth import Token
from app.errors import SCOPE_ADMISSION, Issue, PayloadTooLarge, RequestTimeout
from app.idempotency import Key
from app.limiter import Admission
from app.services import services
from app.validation import MAX_BODY_BYTES


class Intake(NamedTuple):
    token: Token
    body: bytes
    issues: list[Issue]  # the headers' (Content-Type, Idempotency-Key), to be listed with the body's
    key: Key | None
    admission: Admission  # the token's rate limit, charged once the body is known to be good


async def intake(request: Request, token: Token) -> Intake:
    found = services(request)
    admission = request.scope[SCOPE_ADMISSION] = found.limiter.admission(token)  # every answer on: RateLimit
    body = await read_body(request, found.settings.body_timeout_seconds)
    issues = content_type_issues(request)
    # An Idempotency-Key belongs to its route, as the router matched it: "POST /api/v1/tickets".
    route = f"{request.method} {request.scope['route'].path}"
    return Intake(token, body, issues, idempotency.from_request(request, route, body, issues), admission)


def content_type_issues(request: Request) -> list[Issue]:
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type == "application/json":
        return []
    return [Issue(["Content-Type"], "invalid_header", "Content-Type must be application/json.")]


async def read_body(request: Request, timeout: float) -> bytes:
    """The request body, refusing to read past 1 MiB."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise PayloadTooLarge()
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):  # no slow-loris hold
            async for chunk in request.stream():
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    raise PayloadTooLarge()
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout() from None
    return b"".join(chunks)


def json_response(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(body, status, headers, media_type="application/json")
