"""The GET routes: a ticket in full, and the desk's departments and ticket types."""

from datetime import datetime
from typing import Final

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from app.auth import Token
from app.errors import TicketNotFound
from app.services import services
from app.validation import MAX_ID


class UserRef(msgspec.Struct):
    id: str
    email: str
    name: str


class NamedRef(msgspec.Struct):
    id: str
    name: str


class Message(msgspec.Struct):
    id: str
    body: str
    public: bool
    authorId: str
    createdAt: datetime


class Event(msgspec.Struct):
    id: str
    kind: str
    channel: str
    createdAt: datetime


class Ticket(msgspec.Struct):
    id: str
    number: int
    subject: str
    priority: str
    status: str
    channel: str
    createdAt: datetime
    requester: UserRef
    department: NamedRef
    ticketType: NamedRef
    messages: list[Message]
    events: list[Event]


class TicketBody(msgspec.Struct):
    """The 200 body of GET /api/v1/tickets/{ref}."""

    ticket: Ticket


class Department(msgspec.Struct):
    id: str
    name: str
    public: bool
    default: bool


class DepartmentList(msgspec.Struct):
    departments: list[Department]


class TicketType(msgspec.Struct):
    id: str
    name: str
    default: bool


class TicketTypeList(msgspec.Struct):
    ticketTypes: list[TicketType]


_encode: Final = msgspec.json.Encoder().encode
_decode_messages: Final = msgspec.json.Decoder(list[Message]).decode
_decode_events: Final = msgspec.json.Decoder(list[Event]).decode

# The subqueries name the desk ($1) rather than t.desk_id: Citus routes a statement to one shard only
# when every correlated subquery has the distribution key as a constant (else on every shard).
_TICKET_SELECT: Final = """
SELECT t.ticket_id, t.number, t.subject, t.priority, t.status, t.channel, t.created_at,
       u.user_id, u.email, u.name AS user_name,
       d.department_id, d.name AS department_name,
       y.ticket_type_id, y.name AS ticket_type_name,
       (SELECT coalesce(json_agg(json_build_object(
                   'id', m.message_id::text, 'body', m.body, 'public', m.public,
                   'authorId', m.author_id::text, 'createdAt', m.created_at) ORDER BY m.message_id), '[]')
        FROM messages m WHERE m.desk_id = $1 AND m.ticket_id = t.ticket_id) AS messages,
       (SELECT coalesce(json_agg(json_build_object(
                   'id', e.event_id::text, 'kind', e.kind, 'channel', e.channel,
                   'createdAt', e.created_at) ORDER BY e.event_id), '[]')
        FROM ticket_events e WHERE e.desk_id = $1 AND e.ticket_id = t.ticket_id) AS events
FROM tickets t
JOIN users u ON u.desk_id = t.desk_id AND u.user_id = t.requester_id
JOIN departments d ON d.desk_id = t.desk_id AND d.department_id = t.department_id
JOIN ticket_types y ON y.desk_id = t.desk_id AND y.ticket_type_id = t.ticket_type_id
"""
TICKET_BY_NUMBER: Final = _TICKET_SELECT + "WHERE t.desk_id = $1 AND t.number = $2"
TICKET_BY_ID: Final = _TICKET_SELECT + "WHERE t.desk_id = $1 AND t.ticket_id = $2"

DEPARTMENTS: Final = """
SELECT department_id, name, public, is_default FROM departments
WHERE desk_id = $1 AND deleted_at IS NULL ORDER BY department_id
"""
TICKET_TYPES: Final = """
SELECT ticket_type_id, name, is_default FROM ticket_types
WHERE desk_id = $1 AND archived_at IS NULL ORDER BY ticket_type_id
"""


def _json(body: msgspec.Struct) -> Response:
    return Response(_encode(body), 200, media_type="application/json")


async def get_ticket(request: Request, token: Token) -> Response:
    desk_id = token.desk_id
    ref: str = request.path_params["ref"]
    # A number has at most 10 digits; anything longer is an id (the contract's rule).
    if not (ref.isascii() and ref.isdigit()) or len(ref) > 19 or int(ref) > MAX_ID:
        raise TicketNotFound()
    query = TICKET_BY_NUMBER if len(ref) <= 10 else TICKET_BY_ID
    async with services(request).database.connection() as conn:
        row = await conn.fetchrow(query, desk_id, int(ref))
    if row is None:
        raise TicketNotFound()
    ticket = Ticket(
        id=str(row["ticket_id"]),
        number=row["number"],
        subject=row["subject"],
        priority=row["priority"],
        status=row["status"],
        channel=row["channel"],
        createdAt=row["created_at"],
        requester=UserRef(str(row["user_id"]), row["email"], row["user_name"]),
        department=NamedRef(str(row["department_id"]), row["department_name"]),
        ticketType=NamedRef(str(row["ticket_type_id"]), row["ticket_type_name"]),
        messages=_decode_messages(row["messages"]),
        events=_decode_events(row["events"]),
    )
    return _json(TicketBody(ticket))


async def list_departments(request: Request, token: Token) -> Response:
    desk_id = token.desk_id
    async with services(request).database.connection() as conn:
        rows = await conn.fetch(DEPARTMENTS, desk_id)
    return _json(DepartmentList([Department(str(r[0]), r[1], r[2], r[3]) for r in rows]))


async def list_ticket_types(request: Request, token: Token) -> Response:
    desk_id = token.desk_id
    async with services(request).database.connection() as conn:
        rows = await conn.fetch(TICKET_TYPES, desk_id)
    return _json(TicketTypeList([TicketType(str(r[0]), r[1], r[2]) for r in rows]))
