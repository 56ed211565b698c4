"""sql/0006 on a plain PostgreSQL and on Citus alike: headoni_create_for_desk() writes what the one-desk
statement writes, a database holding data is distributed by the migration and goes on, a later
migration in the documented shape applies, and a desk is created whole or not at all."""

from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest

from app import admin, db, idempotency, writer
from app.auth import Token
from app.ids import Snowflake, WorkerLease
from bench import cluster
from tests.support.desks import Desk, make_desk
from tests.test_citus import DESK_DATA, item, key

# A ticket as it reads back, without ids: what each form of the create must write alike.
_WRITTEN = """
SELECT t.number, t.subject, t.priority, t.status, t.channel, u.email, u.name, d.name AS department,
       y.name AS ticket_type, m.body, m.public, m.author_id = t.requester_id AS by_requester,
       e.kind, e.channel AS event_channel, e.token_id IS NOT NULL AS with_token
FROM tickets t
JOIN users u ON u.desk_id = t.desk_id AND u.user_id = t.requester_id
JOIN departments d ON d.desk_id = t.desk_id AND d.department_id = t.department_id
JOIN ticket_types y ON y.desk_id = t.desk_id AND y.ticket_type_id = t.ticket_type_id
JOIN messages m ON m.desk_id = t.desk_id AND m.ticket_id = t.ticket_id
JOIN ticket_events e ON e.desk_id = t.desk_id AND e.ticket_id = t.ticket_id
WHERE t.desk_id = $1 ORDER BY t.number
"""
_KEYS = """
SELECT k.idem_key, k.route, k.fingerprint, k.outcomes,
       ARRAY(SELECT t.number FROM unnest(k.ticket_ids) WITH ORDINALITY AS x(id, ord)
             JOIN tickets t ON t.desk_id = $1 AND t.ticket_id = x.id ORDER BY x.ord) AS numbers
FROM idempotency_keys k WHERE k.desk_id = $1 ORDER BY k.idem_key
"""


async def snapshot(pool: asyncpg.Pool, desk_id: int) -> dict[str, Any]:
    return {
        "tickets": [dict(r) for r in await pool.fetch(_WRITTEN, desk_id)],
        "users": sorted(tuple(r) for r in await pool.fetch("SELECT email, name FROM users WHERE desk_id = $1",
                                                            desk_id)),
        "keys": [dict(r) for r in await pool.fetch(_KEYS, desk_id)],
        "counter": await pool.fetchval("SELECT last_number FROM desk_counters WHERE desk_id = $1", desk_id),
    }


async def furnished_desk(pool: asyncpg.Pool, ids: Snowflake) -> tuple[Desk, dict[str, str]]:
    """A desk with a blocked domain, a deleted department, an archived ticket type and a known user."""
    desk = await make_desk(pool, ids)
    async with pool.acquire() as conn:
        await admin.add_blocklist(conn, desk.subdomain, "spam.example")
        gone = await admin.create_department(conn, ids, desk.subdomain, "Gone", private=False, default=False)
        await admin.delete_department(conn, desk.subdomain, int(gone.id))
        old = await admin.create_ticket_type(conn, ids, desk.subdomain, "Old", default=False)
        await admin.archive_ticket_type(conn, desk.subdomain, int(old.id))
        private = await admin.create_department(conn, ids, desk.subdomain, "Private", private=True, default=False)
        await conn.execute(
            "INSERT INTO users (desk_id, user_id, email, name) VALUES ($1, $2, 'known@example.com', 'Known')",
            desk.desk_id, ids.next_id(),
        )
    return desk, {"gone": gone.id, "old": old.id, "private": private.id}


def requests(ids: dict[str, str]) -> Iterator[tuple[list[Any], idempotency.Key | None]]:
    """Creates in turn: a single one, a batch of every outcome (a blocked requester, a deleted department,
    an archived type, an email twice, a known requester, a private department), a keyed create and its
    replay, and a keyed batch of nothing."""
    yield [item(1)], None
    yield [
        item(2, name="Bob"), item(3, email="x@spam.example"), item(4, departmentId=ids["gone"]),
        item(5, ticketTypeId=ids["old"]), item(6, email="person2@example.com", name="Not Bob"),
        item(7, email="known@example.com", name="Not Known"), item(8, departmentId=ids["private"], priority="urgent"),
    ], None
    yield [item(9)], key("k-one")
    yield [item(9)], key("k-one")
    yield [], key("k-none")


def entries(desk: Desk, items: list[Any]) -> list[Any]:
    return [(desk.token(), one) for one in items]


async def test_the_create_function_writes_what_the_statement_of_one_desk_writes(
    pool: asyncpg.Pool, ids: Snowflake
) -> None:
    """headoni_create_for_desk() (the form the service uses on Citus) against CREATE_FOR_ONE_DESK, on two
    desks set up alike: the same outcomes and numbers, and the same rows."""
    (by_statement, ids_a), (by_function, ids_b) = [await furnished_desk(pool, ids) for _ in range(2)]
    async with pool.acquire() as conn:
        for (items, k), (items_b, _) in zip(requests(ids_a), requests(ids_b), strict=True):
            a = await writer.write(conn, ids, entries(by_statement, items), k, by_statement.token(), one_desk=True)
            b = await writer.write(conn, ids, entries(by_function, items_b), k, by_function.token(), citus=True)
            assert (a.outcomes, a.replayed) == (b.outcomes, b.replayed)
            assert [t.number for t in a.tickets] == [t.number for t in b.tickets]
    written = await snapshot(pool, by_statement.desk_id)
    assert len(written["tickets"]) == 6 and written["counter"] == 6
    assert written == await snapshot(pool, by_function.desk_id)


async def test_a_database_holding_data_is_distributed_by_the_migration_and_goes_on(
    server_url: str, on_citus: bool
) -> None:
    """The blocking path for an existing database (docs/scaling.md): a database as 0005 left it, with
    desks, tokens and tickets, migrated to 0006 (create_distributed_table copies the rows to the shards
    in the migration's transaction): every row is still there, and creates go on from the next number."""
    async with cluster.throwaway_database(server_url, "headoni_older", migrated=False) as url:
        conn = await asyncpg.connect(url)
        lease: WorkerLease | None = None
        try:
            assert (await db.migrate(conn, until="0005_requester_check_is_an_assertion.sql"))[-1].startswith("0005")
            lease = await WorkerLease.acquire(url)
            ids = lease.snowflake()
            desks = [await admin.create_desk(conn, ids, f"older{n}", None) for n in range(3)]
            for d in desks:
                token_id = ids.next_id()  # a token as 0005 stores it (admin.create_token writes later columns)
                await conn.execute(
                    "INSERT INTO api_tokens (desk_id, token_id, name, scopes, secret_sha256)"
                    " VALUES ($1, $2, 'Old', '{tickets:create}', $3)", int(d.id), token_id, bytes(32),
                )
                auth = Token(token_id, int(d.id), d.subdomain, "Old", frozenset(), "API Via Old")
                await writer.write(conn, ids, [(auth, item(n)) for n in range(4)])
            before = [await snapshot_of(conn, int(d.id)) for d in desks]
            assert (await db.migrate(conn))[0] == "0006_citus.sql"
            if on_citus:
                distributed = {r[0] for r in await conn.fetch(
                    "SELECT table_name::text FROM citus_tables WHERE citus_table_type = 'distributed'")}
                assert distributed == DESK_DATA
            assert [await snapshot_of(conn, int(d.id)) for d in desks] == before
            written = await writer.write(conn, ids, [(auth, item(9))], citus=on_citus, one_desk=True)
            assert [t.number for t in written.tickets] == [5]
        finally:
            if lease is not None:
                await lease.close()
            await conn.close()


async def snapshot_of(conn: asyncpg.Connection, desk_id: int) -> list[Any]:
    return [tuple(r) for r in await conn.fetch(_WRITTEN, desk_id)]


# A later migration in the shape docs/scaling.md asks of one: a column, an index, and a new table of a
# desk's data, distributed (a no-op on a plain PostgreSQL) before its foreign key to a distributed table.
LATER_MIGRATION = """
ALTER TABLE tickets ADD COLUMN later_note text;
CREATE INDEX tickets_later ON tickets (desk_id, status);
CREATE TABLE later_notes (
    desk_id    bigint NOT NULL REFERENCES desks (desk_id),
    note_id    bigint NOT NULL,
    ticket_id  bigint NOT NULL,
    body       text NOT NULL,
    PRIMARY KEY (desk_id, note_id)
);
SELECT headoni_distribute('later_notes');
ALTER TABLE later_notes ADD FOREIGN KEY (desk_id, ticket_id) REFERENCES tickets (desk_id, ticket_id);
"""


async def test_a_later_migration_in_the_documented_shape_applies_and_the_service_goes_on(
    server_url: str, on_citus: bool
) -> None:
    async with cluster.throwaway_database(server_url, "headoni_later", migrated=True) as url:
        conn = await asyncpg.connect(url)
        lease = await WorkerLease.acquire(url)
        try:
            async with conn.transaction():  # as the migration runner applies a file
                await db.apply(conn, LATER_MIGRATION)
            ids = lease.snowflake()
            desk = await admin.create_desk(conn, ids, "later", None)
            token = await admin.create_token(conn, ids, "later", "Later", ["tickets:create"])
            auth = Token(int(token.id), int(desk.id), "later", "Later", frozenset(), "API Via Later")
            written = await writer.write(conn, ids, [(auth, item(1))], one_desk=True, citus=on_citus)
            ticket_id = int(written.tickets[0].id)
            await conn.execute(
                "UPDATE tickets SET later_note = 'n' WHERE desk_id = $1 AND ticket_id = $2", int(desk.id), ticket_id
            )
            await conn.execute(
                "INSERT INTO later_notes (desk_id, note_id, ticket_id, body) VALUES ($1, $2, $3, 'b')",
                int(desk.id), ids.next_id(), ticket_id,
            )
            with pytest.raises(asyncpg.ForeignKeyViolationError):  # the key holds on every shard
                await conn.execute(
                    "INSERT INTO later_notes (desk_id, note_id, ticket_id, body) VALUES ($1, $2, 42, 'b')",
                    int(desk.id), ids.next_id(),
                )
            if on_citus:
                colocated = await conn.fetchval(
                    "SELECT count(DISTINCT colocation_id) FROM citus_tables WHERE table_name::text IN"
                    " ('later_notes', 'tickets')"
                )
                assert colocated == 1
        finally:
            await lease.close()
            await conn.close()


class _FailingIds:
    """Hands create_desk a NULL department id, so the desk's third insert fails after the desk row (a
    reference table on Citus) and its counter (a distributed one) were written."""

    def __init__(self, ids: Snowflake) -> None:
        self.desk_id = ids.next_id()
        self._last = ids.next_id()

    def next_ids(self, count: int) -> list[int | None]:
        return [self.desk_id, None, self._last]


async def test_a_desk_is_created_whole_or_not_at_all(
    pool: asyncpg.Pool, ids: Snowflake, database_url: str, citus_nodes: list[cluster.Node]
) -> None:
    failing = _FailingIds(ids)
    subdomain = f"t{failing.desk_id}"
    async with pool.acquire() as conn:
        with pytest.raises(asyncpg.NotNullViolationError):
            await admin.create_desk(conn, failing, subdomain, None)  # type: ignore[arg-type]
    assert await pool.fetchval("SELECT count(*) FROM desk_counters WHERE desk_id = $1", failing.desk_id) == 0
    # The desks row is gone from every node's copy of the reference table, not only the coordinator's.
    for url in [cluster.at_node(database_url, node) for node in citus_nodes] or [database_url]:
        conn = await asyncpg.connect(url)
        try:
            assert await conn.fetchval("SELECT count(*) FROM desks WHERE subdomain = $1", subdomain) == 0
        finally:
            await conn.close()
    async with pool.acquire() as conn:  # and the subdomain is free
        assert (await admin.create_desk(conn, ids, subdomain, None)).subdomain == subdomain
