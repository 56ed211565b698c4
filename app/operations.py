"""Every operation of the API, declared once: its route and handler, the scope it needs, the errors
it may answer and what the OpenAPI document says of it. app/main.py builds the routes from this table,
app/openapi.py the document; a handler of a token's operation is called with the token, authorized for
the declared scope in the contract's order (401, 403 token_desk_mismatch, 403 insufficient_scope)."""

from collections.abc import Awaitable, Callable
from typing import Final

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from app import batch, health, observability, openapi, reads, tickets
from app.auth import SCOPE_TOKEN_KEY, Token, authorize, token_key
from app.batch import MAX_ITEMS, BatchIn, BatchResults
from app.errors import (
    SCOPE_TOKEN,
    DepartmentNotFound,
    IdempotencyKeyReused,
    InvalidBody,
    PayloadTooLarge,
    RateLimited,
    RequestTimeout,
    TicketNotFound,
    TicketTypeNotFound,
)
from app.health import Health
from app.openapi import Operation, Reply
from app.reads import DepartmentList, TicketBody, TicketTypeList
from app.services import services
from app.tickets import Accepted, TicketCreated
from app.validation import TicketIn

_WRITE_ERRORS: Final = (InvalidBody, RequestTimeout, PayloadTooLarge, IdempotencyKeyReused, RateLimited)
_LIMITED: Final = (
    " Charged to the token's rate limit (one unit per ticket) once the body is good; over it, 429 "
    "`rate_limited` with `Retry-After`. While a limit applies, every answer from 400 `invalid_body` on carries "
    "`RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-headers-10)."
)
_EXAMPLE_TICKET: Final = {
    "email": "alice@example.com",
    "name": "Alice",
    "subject": "Login broken on staging",
    "body": "I loop back to /sign-in after typing my email.",
    "priority": "high",
}
_REPLAYABLE: Final = ("IdempotentReplayed",)

OPERATIONS: Final[tuple[Operation, ...]] = (
    Operation(
        "POST", "/api/v1/tickets", "createTicket", "Create a ticket", "tickets", tickets.post_ticket,
        scope="tickets:create", body=TicketIn, parameters=("IdempotencyKey",),
        replies=(
            Reply(201, "The ticket was created.", TicketCreated, headers=("Location", *_REPLAYABLE)),
            Reply(200, "The requester is blocklisted: accepted, nothing written.", Accepted, headers=_REPLAYABLE),
        ),
        errors=(*_WRITE_ERRORS, DepartmentNotFound, TicketTypeNotFound),
        description="Every problem of the body is reported at once, as `issues`." + _LIMITED, limited=True,
        example=_EXAMPLE_TICKET,
    ),
    Operation(
        "POST", "/api/v1/tickets/batch", "createTickets", f"Create 1 to {MAX_ITEMS} tickets", "tickets",
        batch.post_batch,
        scope="tickets:create", body=BatchIn, parameters=("IdempotencyKey",),
        replies=(Reply(200, "One result per item, in order.", BatchResults, headers=_REPLAYABLE),),
        errors=_WRITE_ERRORS,
        description="Only a wrong envelope fails the whole request; each item gets its own result, and the "
        "created items have consecutive numbers in item order." + _LIMITED, limited=True,
        example={"tickets": [_EXAMPLE_TICKET, {"email": "bob@example.com", "subject": "Refund", "body": "Broken."}]},
    ),
    Operation(
        "GET", "/api/v1/tickets/{ref}", "getTicket", "Read a ticket with its messages and events", "tickets",
        reads.get_ticket,
        scope="tickets:read", replies=(Reply(200, "The ticket.", TicketBody),), errors=(TicketNotFound,),
    ),
    Operation(
        "GET", "/api/v1/departments", "listDepartments", "List the desk's departments", "catalog",
        reads.list_departments,
        replies=(Reply(200, "Departments that are not deleted.", DepartmentList),),
    ),
    Operation(
        "GET", "/api/v1/ticket-types", "listTicketTypes", "List the desk's ticket types", "catalog",
        reads.list_ticket_types,
        replies=(Reply(200, "Ticket types that are not archived.", TicketTypeList),),
    ),
    Operation(
        "GET", "/healthz", "healthz", "Liveness: the process answers", "operations", health.healthz, token=False,
        replies=(Reply(200, "Alive.", Health),),
    ),
    Operation(
        "GET", "/readyz", "readyz", "Readiness: the database answers", "operations", health.readyz, token=False,
        replies=(
            Reply(200, "Ready.", Health),
            Reply(503, "The database does not answer.", Health, headers=("RetryAfter",)),
        ),
    ),
    Operation(
        "GET", "/metrics", "metrics", "Prometheus metrics of every worker", "operations", observability.metrics,
        token=False,
        replies=(Reply(200, "Prometheus text exposition format.", None, "text/plain; version=0.0.4"),),
    ),
    Operation(
        "GET", openapi.OPENAPI_PATH, "openapi", "This document", "operations",
        openapi.document_handler(lambda: OPERATIONS),
        token=False,
        replies=(Reply(200, "The OpenAPI 3.1 document.", None),),
    ),
    Operation(
        "GET", openapi.DOCS_PATH, "docs", "This reference, as a web page", "operations", openapi.docs, token=False,
        replies=(Reply(200, "Swagger UI.", None, "text/html"),),
    ),
)


async def authorized(request: Request, scope: str | None) -> Token:
    """The request's token, for an operation that needs `scope` (see app/auth.py authorize)."""
    found = services(request)
    headers = request.headers
    # Read by the HTTP layer already (app/http.py); worked out here when the app runs without it.
    asgi = request.scope
    key = asgi[SCOPE_TOKEN_KEY] if SCOPE_TOKEN_KEY in asgi else token_key(headers.get("authorization"))
    token = await authorize(found.tokens, key, headers.get("host"), found.settings.base_domain, scope)
    request.scope[SCOPE_TOKEN] = token  # the access log's desk and token id
    return token


def _endpoint(op: Operation) -> Callable[[Request], Awaitable[Response]]:
    if not op.token:
        return op.handler

    async def with_token(request: Request) -> Response:
        return await op.handler(request, await authorized(request, op.scope))

    with_token.__name__ = op.handler.__name__
    return with_token


def routes() -> list[BaseRoute]:
    """The table's routes, and /docs' assets."""
    return [*(Route(op.path, _endpoint(op), methods=[op.method]) for op in OPERATIONS), openapi.assets()]
