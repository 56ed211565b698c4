"""POST /api/v1/tickets/batch: up to 100 tickets in one request, one statement, one result each."""

from typing import Annotated, Any, Final

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from app import idempotency
from app.auth import Token
from app.errors import DepartmentNotFound, InvalidBody, Issue, TicketTypeNotFound
from app.intake import intake, json_response
from app.services import services
from app.statement import CreatedTicket, Outcome, Written
from app.tickets import encode
from app.validation import NewTicket, decode_object, parse_ticket, ticket_from_object

MAX_ITEMS: Final = 100


class BatchIn(msgspec.Struct):
    """The body of POST /api/v1/tickets/batch: 1 to 100 ticket bodies, each checked on its own."""

    # The item's schema is given on the item type: msgspec would overwrite an "items" given on the list.
    tickets: Annotated[
        list[Annotated[msgspec.Raw, msgspec.Meta(extra_json_schema={"$ref": "#/components/schemas/TicketIn"})]],
        msgspec.Meta(min_length=1, max_length=MAX_ITEMS),
    ]


class BatchCreated(msgspec.Struct, tag_field="status", tag=201):
    ticket: CreatedTicket


class BatchBlocked(msgspec.Struct, tag_field="status", tag=200):
    ok: bool = True


class BatchFailed(msgspec.Struct, tag_field="status", tag=400, omit_defaults=True):
    error: str
    message: str
    issues: list[Issue] | None = None


class BatchResults(msgspec.Struct):
    """The 200 body of POST /api/v1/tickets/batch: one result per item, in order."""

    results: list[BatchCreated | BatchBlocked | BatchFailed]


_decode_batch: Final = msgspec.json.Decoder(BatchIn).decode
Parsed = NewTicket | InvalidBody


def _item(parse: Any, value: Any) -> Parsed:
    try:
        result: NewTicket = parse(value)
        return result
    except InvalidBody as exc:
        return exc


def parse_batch(body: bytes, issues: list[Issue]) -> list[Parsed]:
    """Each item checked on its own; only a wrong envelope (or header) fails the whole request."""
    try:
        items = [_item(parse_ticket, bytes(raw)) for raw in _decode_batch(body).tickets]
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError):
        items = _parse_leniently(body, issues)
    if issues:
        raise InvalidBody(issues=issues)
    return items


def _parse_leniently(body: bytes, issues: list[Issue]) -> list[Parsed]:
    """The slow path: a decode error somewhere, reported precisely (see validation.decode_object)."""
    envelope = decode_object(body, issues)
    tickets = envelope.get("tickets")
    if tickets is None:
        issues.append(Issue(["tickets"], "required", "tickets is required."))
    elif not isinstance(tickets, list):
        issues.append(Issue(["tickets"], "invalid_type", "tickets must be a list."))
    elif not tickets:
        issues.append(Issue(["tickets"], "too_short", "tickets must hold at least 1 ticket."))
    elif len(tickets) > MAX_ITEMS:
        issues.append(Issue(["tickets"], "too_long", f"tickets must hold at most {MAX_ITEMS} tickets."))
    else:
        return [_item(ticket_from_object, value) for value in tickets]
    return []


def _results(items: list[Parsed], written: Written) -> BatchResults:
    outcomes, tickets = iter(written.outcomes), iter(written.tickets)
    results: list[BatchCreated | BatchBlocked | BatchFailed] = []
    for item in items:
        if isinstance(item, InvalidBody):
            results.append(BatchFailed(item.code, item.message, item.issues))
            continue
        outcome = next(outcomes)
        if outcome is Outcome.CREATED:
            results.append(BatchCreated(next(tickets)))
        elif outcome is Outcome.BLOCKED:
            results.append(BatchBlocked())
        else:
            error = DepartmentNotFound() if outcome is Outcome.DEPARTMENT_NOT_FOUND else TicketTypeNotFound()
            results.append(BatchFailed(error.code, error.message))
    return BatchResults(results)


async def post_batch(request: Request, token: Token) -> Response:
    _, body, issues, key, admission = await intake(request, token)
    items = parse_batch(body, issues)
    valid = [item for item in items if isinstance(item, NewTicket)]
    await admission.charge(len(valid))  # one unit per valid item: the invalid ones cost nothing
    written = Written([], [])
    if valid or key is not None:
        written = await admission.shedding(services(request).writer.write(token, valid, key))
    headers = idempotency.REPLAYED if written.replayed else None
    return json_response(encode(_results(items, written)), 200, headers)
