"""POST /api/v1/tickets: the hot path. One statement writes the whole ticket, or nothing."""

from typing import Final

import asyncpg
import msgspec
from starlette.requests import Request
from starlette.responses import Response

from app import db
from app.auth import Token, request_token
from app.errors import DepartmentNotFound, Issue, PayloadTooLarge, TicketTypeNotFound
from app.ids import Snowflake
from app.validation import MAX_BODY_BYTES, NewTicket, parse_ticket


class Requester(msgspec.Struct):
    email: str


class CreatedTicket(msgspec.Struct):
    id: str
    number: int
    subject: str
    priority: str
    requester: Requester


class TicketCreated(msgspec.Struct):
    """The 201 body of POST /api/v1/tickets."""

    ticket: CreatedTicket


class Accepted(msgspec.Struct):
    """The 200 answer for a blocked requester: accepted, not created."""

    ok: bool = True


_encode: Final = msgspec.json.Encoder().encode
BLOCKED_BODY: Final = _encode(Accepted())

# One round trip, one statement, atomically: resolve the department and ticket type, check the
# blocklist, find or create the requester, bump the desk's counter, and insert the ticket, its first
# message and its created event. The counter row is locked last, only once everything else is known
# to succeed, so a failed request takes no number and the lock is held as briefly as possible.
#
# The requester: a user committed by a concurrent request after this statement's snapshot is seen
# neither by known_user nor (ON CONFLICT DO NOTHING) returned by new_user. Then requester is empty,
# nothing is written, and the caller runs the statement again with a fresh snapshot.
CREATE_TICKET: Final = """
WITH department AS (
    SELECT department_id FROM departments
    WHERE desk_id = $1 AND deleted_at IS NULL
      AND department_id = COALESCE($8::bigint,
            (SELECT department_id FROM departments WHERE desk_id = $1 AND is_default))
), ticket_type AS (
    SELECT ticket_type_id FROM ticket_types
    WHERE desk_id = $1 AND archived_at IS NULL
      AND ticket_type_id = COALESCE($9::bigint,
            (SELECT ticket_type_id FROM ticket_types WHERE desk_id = $1 AND is_default))
), blocked AS (
    SELECT 1 FROM blocklist_entries WHERE desk_id = $1 AND entry IN ($2::text, $3::text)
), accepted AS (
    SELECT department_id, ticket_type_id FROM department, ticket_type
    WHERE NOT EXISTS (SELECT 1 FROM blocked)
), known_user AS (
    SELECT user_id FROM users WHERE desk_id = $1 AND email = $2
), new_user AS (
    INSERT INTO users (desk_id, user_id, email, name)
    SELECT $1, $12, $2, $4 FROM accepted
    WHERE NOT EXISTS (SELECT 1 FROM known_user)
    ON CONFLICT (desk_id, email) DO NOTHING
    RETURNING user_id
), requester AS (
    SELECT user_id FROM known_user UNION ALL SELECT user_id FROM new_user
), counter AS (
    UPDATE desk_counters SET last_number = last_number + 1
    WHERE desk_id = $1 AND EXISTS (SELECT 1 FROM accepted) AND EXISTS (SELECT 1 FROM requester)
    RETURNING last_number
), ticket AS (
    INSERT INTO tickets (desk_id, ticket_id, number, subject, priority, channel,
                         requester_id, department_id, ticket_type_id)
    SELECT $1, $13, counter.last_number, $5, $7, 'api',
           requester.user_id, accepted.department_id, accepted.ticket_type_id
    FROM counter, requester, accepted
    RETURNING ticket_id, number, requester_id
), message AS (
    INSERT INTO messages (desk_id, message_id, ticket_id, author_id, body, public)
    SELECT $1, $14, ticket_id, requester_id, $6, true FROM ticket
), event AS (
    INSERT INTO ticket_events (desk_id, event_id, ticket_id, kind, channel, token_id)
    SELECT $1, $15, ticket_id, 'ticket.created', $11, $10 FROM ticket
)
SELECT EXISTS (SELECT 1 FROM department) AS department_found,
       EXISTS (SELECT 1 FROM ticket_type) AS ticket_type_found,
       EXISTS (SELECT 1 FROM blocked) AS blocked,
       (SELECT number FROM ticket) AS number
"""

# A statement that lost the race to create a requester writes nothing and is run again; a second
# loss would need the same email to be created twice, which the unique key forbids.
_ATTEMPTS: Final = 3


async def create_ticket(
    conn: asyncpg.Connection, ids: Snowflake, token: Token, ticket: NewTicket
) -> CreatedTicket | None:
    """Write one ticket and return it, or None when the requester is blocked."""
    user_id, ticket_id, message_id, event_id = ids.next_ids(4)
    for _ in range(_ATTEMPTS):
        row = await conn.fetchrow(
            CREATE_TICKET,
            token.desk_id,
            ticket.email,
            ticket.domain,
            ticket.name,
            ticket.subject,
            ticket.body,
            ticket.priority,
            ticket.department_id,
            ticket.ticket_type_id,
            token.token_id,
            token.channel,
            user_id,
            ticket_id,
            message_id,
            event_id,
        )
        if not row["department_found"]:
            raise DepartmentNotFound()
        if not row["ticket_type_found"]:
            raise TicketTypeNotFound()
        if row["blocked"]:
            return None
        if row["number"] is not None:
            return CreatedTicket(
                str(ticket_id), row["number"], ticket.subject, ticket.priority, Requester(ticket.email)
            )
    raise RuntimeError("the requester could not be found or created")


def content_type_issues(request: Request) -> list[Issue]:
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type == "application/json":
        return []
    return [Issue(["Content-Type"], "invalid_header", "Content-Type must be application/json.")]


async def read_body(request: Request) -> bytes:
    """The request body, refusing to read past 1 MiB."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise PayloadTooLarge()
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise PayloadTooLarge()
        chunks.append(chunk)
    return b"".join(chunks)


async def post_ticket(request: Request) -> Response:
    state = request.state
    token = await request_token(request, "tickets:create")
    body = await read_body(request)
    ticket = parse_ticket(body, content_type_issues(request))
    async with db.connection(state.pool, state.settings.pool_timeout) as conn:
        created = await create_ticket(conn, state.ids, token, ticket)
    if created is None:
        return Response(BLOCKED_BODY, 200, media_type="application/json")
    return Response(
        _encode(TicketCreated(created)),
        201,
        {"Location": f"/api/v1/tickets/{created.id}"},
        media_type="application/json",
    )
