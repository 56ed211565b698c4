"""POST /api/v1/tickets: the hot path. One statement writes the whole request, or nothing."""

from typing import Final

import asyncpg
import msgspec
from starlette.requests import Request
from starlette.responses import Response

from app import db, idempotency, observability
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


encode: Final = msgspec.json.Encoder().encode
BLOCKED_BODY: Final = encode(Accepted())
ROUTE: Final = "POST /api/v1/tickets"

# One round trip, one statement, atomically, for one or many tickets of one desk: skip everything if
# the Idempotency-Key was used before; resolve each item's department and ticket type; check the
# blocklist; find or create the requesters (once per email); bump the desk's counter once for all
# accepted items; insert tickets with consecutive numbers in item order, their first messages and
# created events; and remember the outcome under the Idempotency-Key, if one was sent.
#
# The counter row is locked last, only once everything else is known to succeed, so a failed item
# takes no number and the lock is held as briefly as possible. A requester committed by a concurrent
# request after this statement's snapshot is seen neither by known_user nor returned by new_user's
# ON CONFLICT DO NOTHING; headoni_take_numbers() then aborts the statement (SQLSTATE HD001) and the
# caller runs it again with a fresh snapshot. A concurrent request with the same key makes the
# insert into idempotency_keys wait for it and fail on the key; run again, the statement replays.
CREATE_TICKETS: Final = """
WITH existing AS (
    SELECT route, fingerprint, outcomes, ticket_ids FROM idempotency_keys
    WHERE desk_id = $1 AND token_id = $2 AND idem_key = $4
), item AS (
    SELECT * FROM unnest($7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[],
                         $13::bigint[], $14::bigint[], $15::bigint[], $16::bigint[], $17::bigint[], $18::bigint[])
        WITH ORDINALITY AS i(email, domain, name, subject, body, priority, department_id, ticket_type_id,
                             user_id, ticket_id, message_id, event_id, ord)
    WHERE NOT EXISTS (SELECT 1 FROM existing)
), resolved AS (
    SELECT i.*, d.department_id AS found_department, y.ticket_type_id AS found_type,
           EXISTS (SELECT 1 FROM blocklist_entries b
                   WHERE b.desk_id = $1 AND b.entry IN (i.email, i.domain)) AS blocked
    FROM item i
    LEFT JOIN departments d ON d.desk_id = $1 AND d.deleted_at IS NULL AND d.department_id = coalesce(
        i.department_id, (SELECT department_id FROM departments WHERE desk_id = $1 AND is_default))
    LEFT JOIN ticket_types y ON y.desk_id = $1 AND y.archived_at IS NULL AND y.ticket_type_id = coalesce(
        i.ticket_type_id, (SELECT ticket_type_id FROM ticket_types WHERE desk_id = $1 AND is_default))
), accepted AS (
    SELECT * FROM resolved WHERE found_department IS NOT NULL AND found_type IS NOT NULL AND NOT blocked
), known_user AS (
    SELECT email, user_id FROM users WHERE desk_id = $1 AND email IN (SELECT email FROM accepted)
), new_user AS (
    INSERT INTO users (desk_id, user_id, email, name)
    SELECT DISTINCT ON (email) $1, user_id, email, name FROM accepted
    WHERE email NOT IN (SELECT email FROM known_user)
    ORDER BY email, ord
    ON CONFLICT (desk_id, email) DO NOTHING
    RETURNING email, user_id
), ready AS (
    SELECT a.*, r.user_id AS requester_id, row_number() OVER (ORDER BY a.ord) AS seq
    FROM accepted a JOIN (SELECT * FROM known_user UNION ALL SELECT * FROM new_user) r USING (email)
), counter AS (
    UPDATE desk_counters SET last_number = last_number + (SELECT count(*) FROM ready)
    WHERE desk_id = $1 AND headoni_take_numbers((SELECT count(*) FROM ready), (SELECT count(*) FROM accepted))
    RETURNING last_number - (SELECT count(*) FROM ready) AS base
), ticket AS (
    INSERT INTO tickets (desk_id, ticket_id, number, subject, priority, channel,
                         requester_id, department_id, ticket_type_id)
    SELECT $1, r.ticket_id, c.base + r.seq, r.subject, r.priority, 'api',
           r.requester_id, r.found_department, r.found_type
    FROM ready r, counter c
    RETURNING ticket_id, number
), message AS (
    INSERT INTO messages (desk_id, message_id, ticket_id, author_id, body, public)
    SELECT $1, r.message_id, r.ticket_id, r.requester_id, r.body, true FROM ready r JOIN ticket USING (ticket_id)
), event AS (
    INSERT INTO ticket_events (desk_id, event_id, ticket_id, kind, channel, token_id)
    SELECT $1, r.event_id, r.ticket_id, 'ticket.created', $3, $2 FROM ready r JOIN ticket USING (ticket_id)
), outcome AS (
    SELECT coalesce(array_agg(CASE WHEN found_department IS NULL THEN 'department_not_found'
                                   WHEN found_type IS NULL THEN 'ticket_type_not_found'
                                   WHEN blocked THEN 'blocked'
                                   ELSE 'created' END ORDER BY ord), '{}') AS outcomes,
           (SELECT coalesce(array_agg(number ORDER BY number), '{}') FROM ticket) AS numbers,
           (SELECT coalesce(array_agg(ticket_id ORDER BY number), '{}') FROM ticket) AS ticket_ids
    FROM resolved
), remembered AS (
    INSERT INTO idempotency_keys (desk_id, token_id, idem_key, route, fingerprint, outcomes, ticket_ids)
    SELECT $1, $2, $4, $5, $6, outcomes, ticket_ids FROM outcome
    WHERE $4::text IS NOT NULL AND NOT EXISTS (SELECT 1 FROM existing)
)
SELECT o.outcomes, o.numbers, e.route, e.fingerprint, e.outcomes AS replay_outcomes, e.ticket_ids AS replay_ticket_ids
FROM outcome o LEFT JOIN existing e ON true
"""

# Each run of the statement either succeeds or aborts whole; a run that lost a race is run again.
_ATTEMPTS: Final = 5
_RETRY_CONSTRAINT: Final = "idempotency_keys_pkey"


class Written(msgspec.Struct):
    """What a request wrote or, replayed, had written: each valid item's outcome, in order
    ('created', 'blocked', 'department_not_found', 'ticket_type_not_found'), and the created tickets."""

    outcomes: list[str]
    tickets: list[CreatedTicket]
    replayed: bool = False

    def split(self) -> list["Written"]:
        """One Written per item, each with its own outcome and ticket."""
        tickets = iter(self.tickets)
        return [
            Written([outcome], [next(tickets)] if outcome == "created" else [], self.replayed)
            for outcome in self.outcomes
        ]


async def write_tickets(
    conn: asyncpg.Connection,
    ids: Snowflake,
    token: Token,
    items: list[NewTicket],
    key: idempotency.Key | None,
) -> Written:
    """Run CREATE_TICKETS for the items, or replay the outcome stored under the key."""
    count = len(items)
    new_ids = ids.next_ids(4 * count)
    args = (
        token.desk_id, token.token_id, token.channel,
        key.key if key else None, key.route if key else None, key.fingerprint if key else None,
        [t.email for t in items], [t.domain for t in items], [t.name for t in items],
        [t.subject for t in items], [t.body for t in items], [t.priority for t in items],
        [t.department_id for t in items], [t.ticket_type_id for t in items],
        new_ids[0:count], new_ids[count : 2 * count], new_ids[2 * count : 3 * count], new_ids[3 * count :],
    )
    for attempt in range(_ATTEMPTS):
        try:
            row = await conn.fetchrow(CREATE_TICKETS, *args)
            break
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name != _RETRY_CONSTRAINT or attempt == _ATTEMPTS - 1:
                raise
        except asyncpg.PostgresError as exc:
            if exc.sqlstate != "HD001" or attempt == _ATTEMPTS - 1:
                raise
    if row["route"] is not None:
        assert key is not None
        key.check_reuse(row["route"], row["fingerprint"])
        stored = await _stored_tickets(conn, token.desk_id, row["replay_ticket_ids"])
        return Written(row["replay_outcomes"], stored, replayed=True)
    observability.count_outcomes(row["outcomes"])
    ticket_ids = iter(new_ids[count : 2 * count])
    numbers = iter(row["numbers"])
    created = [
        CreatedTicket(str(ticket_id), next(numbers), item.subject, item.priority, Requester(item.email))
        for item, outcome, ticket_id in zip(items, row["outcomes"], ticket_ids, strict=True)
        if outcome == "created"
    ]
    return Written(row["outcomes"], created)


_STORED_TICKETS: Final = """
SELECT t.ticket_id, t.number, t.subject, t.priority, u.email
FROM unnest($2::bigint[]) WITH ORDINALITY AS k(ticket_id, ord)
JOIN tickets t ON t.desk_id = $1 AND t.ticket_id = k.ticket_id
JOIN users u ON u.desk_id = t.desk_id AND u.user_id = t.requester_id
ORDER BY k.ord
"""


async def _stored_tickets(conn: asyncpg.Connection, desk_id: int, ticket_ids: list[int]) -> list[CreatedTicket]:
    if not ticket_ids:
        return []
    rows = await conn.fetch(_STORED_TICKETS, desk_id, ticket_ids)
    return [CreatedTicket(str(r[0]), r[1], r[2], r[3], Requester(r[4])) for r in rows]


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


def json_response(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(body, status, headers, media_type="application/json")


def single_response(written: Written) -> Response:
    outcome = written.outcomes[0]
    replayed = idempotency.REPLAYED if written.replayed else None
    if outcome == "created":
        ticket = written.tickets[0]
        headers = {"Location": f"/api/v1/tickets/{ticket.id}", **(replayed or {})}
        return json_response(encode(TicketCreated(ticket)), 201, headers)
    if outcome == "blocked":
        return json_response(BLOCKED_BODY, 200, replayed)
    error = DepartmentNotFound() if outcome == "department_not_found" else TicketTypeNotFound()
    response = error.response()
    response.headers.update(replayed or {})
    return response


async def post_ticket(request: Request) -> Response:
    state = request.state
    token = await request_token(request, "tickets:create")
    body = await read_body(request)
    issues = content_type_issues(request)
    key = idempotency.from_request(request, ROUTE, body, issues)
    ticket = parse_ticket(body, issues)
    if key is None:
        return single_response(await state.coalescer.create(token, ticket))
    async with db.connection(state.pool, state.settings.pool_timeout) as conn:
        written = await write_tickets(conn, state.ids, token, [ticket], key)
    return single_response(written)
