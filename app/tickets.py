"""POST /api/v1/tickets: the hot path. One statement writes the whole request, or nothing."""

import asyncio
import random
import re
from typing import Any, Final

import asyncpg
import msgspec
from starlette.requests import Request
from starlette.responses import Response

from app import db, idempotency, observability
from app.auth import Token, request_token
from app.errors import (
    DepartmentNotFound,
    Issue,
    PayloadTooLarge,
    RequestTimeout,
    ServiceUnavailable,
    TicketTypeNotFound,
)
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

# One round trip, one statement, atomically, for one or many tickets: skip everything if the
# Idempotency-Key was used before; resolve each item's department and ticket type; check the
# blocklist; find or create the requesters (once per desk and email); bump the counter of each desk
# involved once for all its accepted items; insert tickets with consecutive numbers per desk in item
# order, their first messages and created events; and remember the outcome under the Idempotency-Key,
# if one was sent.
#
# The statement comes in two forms, made from one text. DESK(x) marks each place where a table is read
# or written by desk:
# - CREATE_FOR_ANY_DESKS, the default (HEADONI_STATEMENT_SCOPE=any-desks): items of any desks, as the
#   coalescer groups them. DESK(x) is x.desk_id, the item's own desk. headoni_bump_counters()
#   (sql/0004) locks and bumps the desks' counters in desk order, one desk_id at a time, so two such
#   statements cannot deadlock. On one PostgreSQL this form is the faster one even for one desk:
#   creates on a hot desk went about 25% slower with the counter bumped by the statement's own UPDATE
#   (docs/benchmark.md).
# - CREATE_FOR_ONE_DESK (HEADONI_STATEMENT_SCOPE=one-desk): items of one desk, $1. DESK(x) is $1, so
#   every table is read, updated and inserted into at one constant desk_id, which is what lets Citus
#   route the whole statement to the desk's shard (docs/scaling.md). Its counter is bumped by a plain
#   UPDATE, since Citus refuses a function that writes a distributed table inside a routed statement.
#
# Lock order (docs/locking.md has every statement's, the admin commands' too). Every run takes its row
# locks in one global order, whatever order PostgreSQL evaluates the CTEs in, so two runs cannot deadlock:
#   1. users: its new requesters, in (desk_id, email) order (new_user's ORDER BY). The insert waits for a
#      concurrent insert of the same email; a requester committed since this statement's snapshot (which
#      known_user cannot see) is taken by ON CONFLICT DO UPDATE of a non-key column, FOR NO KEY UPDATE,
#      and returned, so every accepted item has its requester. Never FOR UPDATE: that would block other
#      creates' foreign-key checks on the row (FOR KEY SHARE), which run at the end of their statements
#      while they hold their counters.
#   2. desk_counters: the desks with accepted items, in desk_id order, FOR NO KEY UPDATE. ready joins
#      users_written, a count that reads new_user to its end (finishing its INSERT), so no row of ready,
#      and so no counter, is reached before step 1 is complete. A failed item takes no number.
#   3. New rows only (tickets, messages, events, the Idempotency-Key's record): nothing to wait for, but
#      a concurrent request with the same key, whose insert makes this one wait and then fail on the key;
#      run again, the statement replays.
#   4. Foreign-key checks, at the end of the statement: FOR KEY SHARE on the rows referenced. Nothing the
#      service runs takes FOR UPDATE on those rows (no deletes, no key updates), so these never wait.
# Reads (departments, ticket types, blocklist, known requesters, the key) take no locks: a create sees
# them as of its statement's start. headoni_bump_counters() still checks that every accepted item found
# its requester, aborting the statement with SQLSTATE HD001 if not (a bug; never retried).
_CREATE_TEMPLATE: Final = """
WITH existing AS (
    SELECT route, fingerprint, outcomes, ticket_ids FROM idempotency_keys
    WHERE desk_id = $1 AND token_id = $2 AND idem_key = $3
), item AS (
    SELECT * FROM unnest($6::bigint[], $7::bigint[], $8::text[], $9::text[], $10::text[], $11::text[],
                         $12::text[], $13::text[], $14::text[], $15::bigint[], $16::bigint[],
                         $17::bigint[], $18::bigint[], $19::bigint[], $20::bigint[])
        WITH ORDINALITY AS i(desk_id, token_id, channel, email, domain, name, subject, body, priority,
                             department_id, ticket_type_id, user_id, ticket_id, message_id, event_id, ord)
    WHERE NOT EXISTS (SELECT 1 FROM existing)
), resolved AS (
    SELECT i.*,
           (SELECT d.department_id FROM departments d
            WHERE d.desk_id = DESK(i) AND d.deleted_at IS NULL AND d.department_id = coalesce(
                i.department_id,
                (SELECT dd.department_id FROM departments dd WHERE dd.desk_id = DESK(i) AND dd.is_default))
           ) AS found_department,
           (SELECT y.ticket_type_id FROM ticket_types y
            WHERE y.desk_id = DESK(i) AND y.archived_at IS NULL AND y.ticket_type_id = coalesce(
                i.ticket_type_id,
                (SELECT yy.ticket_type_id FROM ticket_types yy WHERE yy.desk_id = DESK(i) AND yy.is_default))
           ) AS found_type,
           EXISTS (SELECT 1 FROM blocklist_entries b
                   WHERE b.desk_id = DESK(i) AND b.entry IN (i.email, i.domain)) AS blocked
    FROM item i
), accepted AS (
    SELECT * FROM resolved WHERE found_department IS NOT NULL AND found_type IS NOT NULL AND NOT blocked
), known_user AS (
    SELECT desk_id, email, user_id FROM (
        SELECT DISTINCT a.desk_id, a.email,
               (SELECT u.user_id FROM users u WHERE u.desk_id = DESK(a) AND u.email = a.email) AS user_id
        FROM accepted a
    ) found
    WHERE user_id IS NOT NULL
), new_user AS (
    INSERT INTO users (desk_id, user_id, email, name)
    SELECT DISTINCT ON (a.desk_id, a.email) DESK(a), a.user_id, a.email, a.name FROM accepted a
    WHERE NOT EXISTS (SELECT 1 FROM known_user k WHERE k.desk_id = a.desk_id AND k.email = a.email)
    ORDER BY a.desk_id, a.email, a.ord
    ON CONFLICT (desk_id, email) DO UPDATE SET name = users.name
    RETURNING desk_id, email, user_id
), users_written AS (
    SELECT count(*) AS n FROM new_user  -- read to its end: new_user's INSERT, and its every lock, is done
), ready AS (
    SELECT a.*, r.user_id AS requester_id, row_number() OVER (PARTITION BY a.desk_id ORDER BY a.ord) AS seq
    FROM users_written w, accepted a
    JOIN (SELECT * FROM known_user UNION ALL SELECT * FROM new_user) r USING (desk_id, email)
COUNTER
), ticket AS (
    INSERT INTO tickets (desk_id, ticket_id, number, subject, priority, channel,
                         requester_id, department_id, ticket_type_id)
    SELECT DESK(r), r.ticket_id, c.base + r.seq, r.subject, r.priority, 'api',
           r.requester_id, r.found_department, r.found_type
    FROM ready r JOIN counter c USING (desk_id)
    RETURNING desk_id, ticket_id, number
), message AS (
    INSERT INTO messages (desk_id, message_id, ticket_id, author_id, body, public)
    SELECT DESK(r), r.message_id, r.ticket_id, r.requester_id, r.body, true
    FROM ready r JOIN ticket USING (desk_id, ticket_id)
), event AS (
    INSERT INTO ticket_events (desk_id, event_id, ticket_id, kind, channel, token_id)
    SELECT DESK(r), r.event_id, r.ticket_id, 'ticket.created', r.channel, r.token_id
    FROM ready r JOIN ticket USING (desk_id, ticket_id)
), outcome AS (
    SELECT coalesce(array_agg(CASE WHEN found_department IS NULL THEN 'department_not_found'
                                   WHEN found_type IS NULL THEN 'ticket_type_not_found'
                                   WHEN blocked THEN 'blocked'
                                   ELSE 'created' END ORDER BY ord), '{}') AS outcomes,
           (SELECT coalesce(array_agg(t.number ORDER BY r.ord), '{}')
            FROM ticket t JOIN ready r USING (desk_id, ticket_id)) AS numbers,
           (SELECT coalesce(array_agg(t.ticket_id ORDER BY r.ord), '{}')
            FROM ticket t JOIN ready r USING (desk_id, ticket_id)) AS ticket_ids
    FROM resolved
), remembered AS (
    INSERT INTO idempotency_keys (desk_id, token_id, idem_key, route, fingerprint, outcomes, ticket_ids)
    SELECT $1, $2, $3, $4, $5, outcomes, ticket_ids FROM outcome
    WHERE $3::text IS NOT NULL AND NOT EXISTS (SELECT 1 FROM existing)
)
SELECT o.outcomes, o.numbers, e.route, e.fingerprint, e.outcomes AS replay_outcomes, e.ticket_ids AS replay_ticket_ids,
       (SELECT count(*) FROM counter) AS desks
FROM outcome o LEFT JOIN existing e ON true
"""

# One desk's counter, bumped in place: skipped when nothing is accepted, so the row is not even locked.
_ONE_COUNTER: Final = """\
), counter AS (
    UPDATE desk_counters SET last_number = last_number + (SELECT count(*) FROM ready)
    WHERE desk_id = $1 AND EXISTS (SELECT 1 FROM ready)
    RETURNING desk_id, last_number - (SELECT count(*) FROM ready) AS base"""

# Several desks' counters, bumped in desk order by a function, each UPDATE a command of its own.
_COUNTERS_IN_DESK_ORDER: Final = """\
), taken AS (
    SELECT desk_id, count(*) AS n FROM ready GROUP BY desk_id
), counter AS (
    SELECT * FROM headoni_bump_counters(
        (SELECT array_agg(desk_id ORDER BY desk_id) FROM taken), (SELECT array_agg(n ORDER BY desk_id) FROM taken),
        (SELECT count(*) FROM ready), (SELECT count(*) FROM accepted))"""


def _create_statement(desk: str, counter: str) -> str:
    return re.sub(r"DESK\((\w)\)", desk, _CREATE_TEMPLATE).replace("COUNTER", counter)


CREATE_FOR_ONE_DESK: Final = _create_statement("$1", _ONE_COUNTER)
CREATE_FOR_ANY_DESKS: Final = _create_statement(r"\1.desk_id", _COUNTERS_IN_DESK_ORDER)

# Each run of the statement either succeeds or aborts whole, so running it again is always safe. A run
# that lost the race for its Idempotency-Key to a concurrent request with the same key is run again, and
# replays. A deadlock or serialization failure should not happen (the lock order above rules deadlocks out;
# the statement runs in READ COMMITTED), but if the database reports one anyway the statement is run again,
# a bounded number of times after a short random pause, before the write gives up with Contended.
_KEY_ATTEMPTS: Final = 5
_KEY_CONSTRAINT: Final = "idempotency_keys_pkey"
_ABORTED: Final = (asyncpg.exceptions.DeadlockDetectedError, asyncpg.exceptions.SerializationError)
ABORTED_ATTEMPTS: Final = 3
_PAUSE_SECONDS: Final = 0.002  # the first pause is up to 2 ms, then up to 4 ms, ...


class Contended(ServiceUnavailable):
    """The database aborted the statement (deadlock or serialization failure) on every attempt."""

    default_message = "The database could not complete the write under contention; retry shortly."


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


Entry = tuple[Token, NewTicket]


async def write_tickets(
    conn: asyncpg.Connection,
    ids: Snowflake,
    token: Token,
    items: list[NewTicket],
    key: idempotency.Key | None,
    *,
    one_desk: bool = False,
) -> Written:
    """Create one request's items, or replay the outcome stored under its key."""
    return await write_entries(conn, ids, [(token, item) for item in items], key, token, one_desk=one_desk)


async def write_entries(
    conn: asyncpg.Connection,
    ids: Snowflake,
    entries: list[Entry],
    key: idempotency.Key | None = None,
    owner: Token | None = None,
    *,
    one_desk: bool = False,
) -> Written:
    """Create entries of any desks and tokens in one statement, CREATE_FOR_ANY_DESKS, or with one_desk,
    CREATE_FOR_ONE_DESK (the entries must share a desk). With a key (of owner, the token of the
    request, whose desk the entries are), or replay the outcome stored under it."""
    count = len(entries)
    new_ids = ids.next_ids(4 * count)
    tokens = [token for token, _ in entries]
    items = [item for _, item in entries]
    desk_ids = [t.desk_id for t in tokens]
    desk = None  # $1: the statement's one desk, needed only by a key and by CREATE_FOR_ONE_DESK
    if key is not None or one_desk:
        desk = owner.desk_id if owner is not None else desk_ids[0] if desk_ids else None
        if desk is None or any(d != desk for d in desk_ids):
            raise ValueError("an Idempotency-Key, or a statement of one desk, covers creates of one desk only")
    args = (
        desk, owner.token_id if key and owner else None,
        key.key if key else None, key.route if key else None, key.fingerprint if key else None,
        desk_ids, [t.token_id for t in tokens], [t.channel for t in tokens],
        [t.email for t in items], [t.domain for t in items], [t.name for t in items],
        [t.subject for t in items], [t.body for t in items], [t.priority for t in items],
        [t.department_id for t in items], [t.ticket_type_id for t in items],
        new_ids[0:count], new_ids[count : 2 * count], new_ids[2 * count : 3 * count], new_ids[3 * count :],
    )
    statement = CREATE_FOR_ONE_DESK if one_desk else CREATE_FOR_ANY_DESKS
    row = await _run(conn, statement, args)
    if row["route"] is not None:
        assert key is not None and owner is not None
        key.check_reuse(row["route"], row["fingerprint"])
        stored = await _stored_tickets(conn, owner.desk_id, row["replay_ticket_ids"])
        return Written(row["replay_outcomes"], stored, replayed=True)
    if len(row["numbers"]) != row["outcomes"].count("created"):  # would be a bug in the statement
        raise RuntimeError("the create statement numbered another count of tickets than it created")
    observability.count_outcomes(row["outcomes"])
    ticket_ids = iter(new_ids[count : 2 * count])
    numbers = iter(row["numbers"])
    created = [
        CreatedTicket(str(ticket_id), next(numbers), item.subject, item.priority, Requester(item.email))
        for item, outcome, ticket_id in zip(items, row["outcomes"], ticket_ids, strict=True)
        if outcome == "created"
    ]
    return Written(row["outcomes"], created)


async def _run(conn: asyncpg.Connection, statement: str, args: tuple[Any, ...]) -> asyncpg.Record:
    """Run the create statement, again where a run aborted whole for a reason that a rerun can outlive."""
    key_attempts = aborted_attempts = 0
    while True:
        try:
            return await conn.fetchrow(statement, *args)
        except asyncpg.UniqueViolationError as exc:
            key_attempts += 1
            if exc.constraint_name != _KEY_CONSTRAINT or key_attempts == _KEY_ATTEMPTS:
                raise
        except _ABORTED as exc:
            aborted_attempts += 1
            observability.count_aborted(exc.sqlstate)
            if aborted_attempts == ABORTED_ATTEMPTS:
                raise Contended() from exc
            await asyncio.sleep(random.uniform(0, _PAUSE_SECONDS * 2**aborted_attempts))


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
    try:
        async with asyncio.timeout(request.state.settings.body_timeout_seconds):  # no slow-loris hold
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


async def intake(request: Request, route: str) -> tuple[Token, bytes, list[Issue], idempotency.Key | None]:
    """What every create route does first, in the contract's order: the token and its scope, the body
    (within its size and time), then the headers' issues, to be listed with the body's."""
    token = await request_token(request, "tickets:create")
    body = await read_body(request)
    issues = content_type_issues(request)
    return token, body, issues, idempotency.from_request(request, route, body, issues)


async def post_ticket(request: Request) -> Response:
    state = request.state
    token, body, issues, key = await intake(request, ROUTE)
    ticket = parse_ticket(body, issues)
    if key is None:
        return single_response(await state.coalescer.create(token, ticket))
    one_desk = state.settings.one_desk_statements
    async with db.connection(state.pool, state.settings.pool_timeout) as conn:
        written = await write_tickets(conn, state.ids, token, [ticket], key, one_desk=one_desk)
    return single_response(written)
