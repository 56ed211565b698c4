"""POST /api/v1/tickets: decode, charge the rate limit (app/limiter.py), write (app/writer.py), encode."""

from typing import Final

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from app import idempotency
from app.auth import Token
from app.errors import DepartmentNotFound, TicketTypeNotFound
from app.intake import intake, json_response
from app.services import services
from app.statement import CreatedTicket, Outcome, Written
from app.validation import parse_ticket


class TicketCreated(msgspec.Struct):
    """The 201 body of POST /api/v1/tickets."""

    ticket: CreatedTicket


class Accepted(msgspec.Struct):
    """The 200 answer for a blocked requester: accepted, not created."""

    ok: bool = True


encode: Final = msgspec.json.Encoder().encode
BLOCKED_BODY: Final = encode(Accepted())


def single_response(written: Written) -> Response:
    """The answer to one create; an item the statement refused is raised as its error."""
    outcome = written.outcomes[0]
    replayed = idempotency.REPLAYED if written.replayed else None
    if outcome is Outcome.CREATED:
        ticket = written.tickets[0]
        headers = {"Location": f"/api/v1/tickets/{ticket.id}", **(replayed or {})}
        return json_response(encode(TicketCreated(ticket)), 201, headers)
    if outcome is Outcome.BLOCKED:
        return json_response(BLOCKED_BODY, 200, replayed)
    if outcome is Outcome.DEPARTMENT_NOT_FOUND:
        raise DepartmentNotFound(headers=replayed)
    raise TicketTypeNotFound(headers=replayed)


async def post_ticket(request: Request, token: Token) -> Response:
    _, body, issues, key, admission = await intake(request, token)
    ticket = parse_ticket(body, issues)
    await admission.charge(1)
    writer = services(request).writer
    written = await admission.shedding(
        writer.create(token, ticket) if key is None else writer.write(token, [ticket], key)
    )
    return single_response(written)
