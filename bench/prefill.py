"""A fresh, migrated database (bench/cluster.py) pre-filled with desks, tokens, users and tickets, set-based and fast.

Desks, tokens and their defaults have deterministic ids so both load generators can address them
without asking the database: desk i (FIRST_DESK <= i < FIRST_DESK + desks) has subdomain `d<i>`, one
token whose id is i, and a default department and ticket type whose ids are also i. Each desk holds the
same number of tickets (numbers 1..n, its counter set to n), each with a first message and a created
event, from a pool of requesters, like the rows the service writes.
"""

import secrets
from dataclasses import dataclass
from typing import Final

import asyncpg

FIRST_DESK: Final = 1001
BASE_DOMAIN: Final = "localhost"
TOKEN_NAME: Final = "Bench"
# Pre-filled rows get snowflake-shaped ids from the past (1 << 60 decodes to 2023), below anything the
# service generates now: desk i's k-th row of a table has id PAST + i * 10**7 + k.
_PAST: Final = 1 << 60
_USERS_PER_DESK: Final = 300


@dataclass(frozen=True)
class Fill:
    """What the bench database holds, and how to address it."""

    desks: int
    tickets_per_desk: int
    secret_prefix: str  # desk i's token secret is secret_prefix + str(i); kept in memory only

    @property
    def last_desk(self) -> int:
        return FIRST_DESK + self.desks - 1

    def host(self, desk: int) -> str:
        return f"d{desk}.{BASE_DOMAIN}"

    def secret(self, desk: int) -> str:
        return f"{self.secret_prefix}{desk}"


_FILL: Final = """
INSERT INTO desks (desk_id, subdomain, name)
SELECT d, 'd' || d, 'Bench desk ' || d FROM generate_series({first}::bigint, {last}::bigint) AS d;

INSERT INTO desk_counters (desk_id, last_number)
SELECT d, {per_desk} FROM generate_series({first}::bigint, {last}::bigint) AS d;

INSERT INTO departments (desk_id, department_id, name, public, is_default)
SELECT d, d, 'General', true, true FROM generate_series({first}::bigint, {last}::bigint) AS d
UNION ALL
SELECT d, {past} + d * 10000000 + k, 'Department ' || k, k % 2 = 0, false
FROM generate_series({first}::bigint, {last}::bigint) AS d, generate_series(1, 3) AS k;

INSERT INTO ticket_types (desk_id, ticket_type_id, name, is_default)
SELECT d, d, 'General', true FROM generate_series({first}::bigint, {last}::bigint) AS d
UNION ALL
SELECT d, {past} + d * 10000000 + k, 'Type ' || k, false
FROM generate_series({first}::bigint, {last}::bigint) AS d, generate_series(1, 3) AS k;

INSERT INTO api_tokens (desk_id, token_id, name, scopes, secret_sha256)
SELECT d, d, {token_name}, ARRAY['tickets:create', 'tickets:read'], sha256(convert_to({prefix} || d, 'UTF8'))
FROM generate_series({first}::bigint, {last}::bigint) AS d;

INSERT INTO blocklist_entries (desk_id, entry)
SELECT d, e FROM generate_series({first}::bigint, {last}::bigint) AS d,
       unnest(ARRAY['spam.example', 'mallory@evil.example']) AS e;

"""
_TICKETS: Final = """
INSERT INTO users (desk_id, user_id, email, name, created_at)
SELECT d, {past} + d * 10000000 + u, 'user' || u || '@customer' || d || '.example', 'User ' || u,
       now() - interval '400 days'
FROM generate_series({first}::bigint, {last}::bigint) AS d, generate_series(1::bigint, {users}::bigint) AS u;

INSERT INTO tickets (desk_id, ticket_id, number, subject, priority, channel, requester_id,
                     department_id, ticket_type_id, created_at)
SELECT d, {past} + d * 10000000 + n, n, 'Pre-filled ticket ' || n || ' of desk ' || d,
       (ARRAY['low', 'normal', 'high', 'urgent'])[1 + n % 4], 'api',
       {past} + d * 10000000 + 1 + n % {users}, d, d, now() - make_interval(mins => ({per_desk} - n)::int)
FROM generate_series({first}::bigint, {last}::bigint) AS d, generate_series(1::bigint, {per_desk}::bigint) AS n;

INSERT INTO messages (desk_id, message_id, ticket_id, author_id, body, public, created_at)
SELECT desk_id, ticket_id, ticket_id, requester_id,
       'Pre-filled message of ticket ' || number || '. ' || repeat('Lorem ipsum dolor sit amet. ', 8),
       true, created_at
FROM tickets;

INSERT INTO ticket_events (desk_id, event_id, ticket_id, kind, channel, token_id, created_at)
SELECT desk_id, ticket_id, ticket_id, 'ticket.created', 'API Via ' || {token_name}, desk_id, created_at
FROM tickets;
"""


async def fill(url: str, desks: int, tickets: int, secret_prefix: str | None = None) -> Fill:
    """Pre-fill the migrated, empty database at url; return how to address what it holds. With
    tickets=0, only the desks (with their defaults, token and blocklist), as a new deployment starts: no
    tickets, no requesters, no statistics gathered yet."""
    tickets_per_desk = -(-tickets // desks)
    # The secrets only have to be unguessable for this run's database; none is printed or saved.
    prefix = secret_prefix or "hd_bench" + secrets.token_urlsafe(12).replace("-", "x").replace("_", "y") + "d"
    conn = await asyncpg.connect(url)
    try:
        # Several commands in one string cannot take parameters; all values are our own ints and constants.
        sql = (_FILL + (_TICKETS if tickets_per_desk else "")).format(
            first=FIRST_DESK, last=FIRST_DESK + desks - 1, per_desk=tickets_per_desk, users=_USERS_PER_DESK,
            past=_PAST, prefix=_literal(prefix), token_name=_literal(TOKEN_NAME),
        )
        async with conn.transaction():
            await conn.execute(sql)
        if tickets_per_desk:
            await conn.execute("VACUUM (ANALYZE)")
    finally:
        await conn.close()
    return Fill(desks, tickets_per_desk, prefix)


def _literal(text: str) -> str:
    """A SQL string literal of our own constants (never user input)."""
    assert "'" not in text and "\\" not in text
    return f"'{text}'"
