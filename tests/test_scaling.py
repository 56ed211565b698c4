"""What docs/scaling.md relies on: the create statement of one desk (every create's, with
HEADONI_STATEMENT_SCOPE=one-desk) and every read statement reach each table at one constant desk_id, the
desk's, through indexes that lead with desk_id. With every desk-keyed table distributed by desk_id
(Citus), such a statement is routed to the one shard holding the desk.

That every table but the directories has desk_id, and every primary, unique and foreign key includes
it, is checked by tests/test_migrations.py::test_every_table_is_keyed_by_desk.
"""

import hashlib
import json
import re
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest

from app import idempotency, statement, writer
from app.ids import Snowflake
from app.validation import parse_ticket
from tests.support.desks import Desk, make_desk
from tests.support.reads import DESK_READS

Plan = dict[str, Any]


@pytest.fixture(autouse=True)
def one_postgresql(on_citus: bool) -> None:
    if on_citus:
        pytest.skip("plans of one PostgreSQL; on Citus tests/test_citus.py checks how Citus routes each statement")


async def captured_statement(
    entries: list[statement.Entry], key: idempotency.Key | None, *, one_desk: bool, citus: bool = False
) -> tuple[str, tuple[Any, ...]]:
    """The statement and arguments the writer would run for these entries (app/statement.py's builder)."""
    owner = entries[0][0] if key else None
    new_ids = Snowflake(1).next_ids(statement.IDS_PER_ITEM * len(entries))
    return statement.build(entries, key, owner, new_ids, one_desk=one_desk, citus=citus, lock_timeout_ms=3000)


ITEMS = [
    b'{"email": "a@example.com", "subject": "s", "body": "b", "departmentId": "9"}',
    b'{"email": "b@example.com", "subject": "s", "body": "b"}',
]


async def hot_statement(desk: Desk) -> tuple[str, tuple[Any, ...]]:
    """The statement of a create of two tickets of one desk with HEADONI_STATEMENT_SCOPE=one-desk, with
    an Idempotency-Key so that its table is read too."""
    key = idempotency.Key("scaling-1", "POST /api/v1/tickets", hashlib.sha256(b"body").digest())
    items = [(desk.token(), parse_ticket(item)) for item in ITEMS]
    query, args = await captured_statement(items, key, one_desk=True)
    assert query == statement.CREATE_FOR_ONE_DESK
    return query, args


def nodes(plan: Plan) -> Iterator[Plan]:
    yield plan
    for child in plan.get("Plans", []):
        yield from nodes(child)


async def explain(pool: asyncpg.Pool, query: str, *args: Any) -> Plan:
    """The plan PostgreSQL picks with sequential scans ruled out: a table without an index for the
    query's conditions would still show a Seq Scan. EXPLAIN without ANALYZE runs nothing."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL enable_seqscan = off")
        plan: Plan = json.loads(await conn.fetchval("EXPLAIN (VERBOSE, FORMAT JSON) " + query, *args))[0]["Plan"]
    return plan


def table_accesses(plan: Plan, desk_id: int, *, joined: bool = False) -> dict[str, list[str]]:
    """Each table read (by a scan or to update it), with the index conditions it is read by. Asserts
    that each leads with desk_id equal to this desk or, when joined, to the desk_id of a joined row
    (an item's, or a row found by this desk)."""
    desk = rf"'{desk_id}'::bigint" + (r"|[a-z_0-9]+\.desk_id" if joined else "")
    condition = re.compile(rf"\(+([a-z_0-9]+\.)?desk_id = ({desk})\)?( AND |\)$|$)")
    accesses: dict[str, list[str]] = {}
    for node in nodes(plan):
        table, kind = node.get("Relation Name"), node["Node Type"]
        if table is None or kind == "ModifyTable":  # writes: see written_desks()
            continue
        assert kind in ("Index Scan", "Index Only Scan", "Bitmap Heap Scan"), f"{kind} on {table}"
        if kind == "Bitmap Heap Scan":
            index_conditions = [n["Index Cond"] for n in nodes(node) if n["Node Type"] == "Bitmap Index Scan"]
        else:
            assert "Index Cond" in node, f"{kind} on {table} without an index condition: {node}"
            index_conditions = [node["Index Cond"]]
        assert index_conditions and all(condition.match(c) for c in index_conditions), (table, index_conditions)
        accesses.setdefault(table, []).extend(index_conditions)
    return accesses


def written_desks(plan: Plan) -> dict[str, str]:
    """Each table inserted into, with the expression its rows' desk_id comes from (the first column
    of each table, and of each insert's column list), followed down through subqueries."""
    written: dict[str, str] = {}
    for node in nodes(plan):
        if node["Node Type"] != "ModifyTable" or node["Operation"] != "Insert":
            continue
        source = next(child for child in node["Plans"] if child["Parent Relationship"] == "Outer")
        expression = source["Output"][0]
        while expression.startswith('"*SELECT*".'):  # a column of a subquery: its first output
            source = next(child for child in source["Plans"] if child["Parent Relationship"] == "Subquery")
            expression = source["Output"][0]
        written[node["Relation Name"]] = expression
    return written


def updated_tables(plan: Plan) -> set[str]:
    return {n["Relation Name"] for n in nodes(plan) if n["Node Type"] == "ModifyTable" and n["Operation"] != "Insert"}


async def test_the_create_statement_of_one_desk_reads_and_writes_that_desk_only(pool: asyncpg.Pool, desk: Desk) -> None:
    """What lets Citus route the statement to the desk's shard: every distributed table it reads,
    updates or inserts into is reached at one constant desk_id, this desk's."""
    query, args = await hot_statement(desk)
    assert args[0] == desk.desk_id  # $1, the statement's desk (also the Idempotency-Key's)
    plan = await explain(pool, query, *args)
    accesses = table_accesses(plan, desk.desk_id)
    assert set(accesses) == {
        "idempotency_keys", "departments", "ticket_types", "blocklist_entries", "users", "desk_counters"
    }
    this_desk = f"'{desk.desk_id}'::bigint"
    assert written_desks(plan) == dict.fromkeys(
        ["users", "tickets", "messages", "ticket_events", "idempotency_keys"], this_desk
    )
    assert updated_tables(plan) == {"desk_counters"}  # read above, by this desk_id
    assert "desks" not in accesses  # the directory (a reference table when distributed) is not needed
    assert "Seq Scan" not in json.dumps(plan)


async def test_the_create_statement_of_several_desks_finds_every_row_by_its_items_desk(
    pool: asyncpg.Pool, ids: Snowflake, desk: Desk
) -> None:
    """The default statement, here for creates of two desks coalesced together: each table access is
    an index lookup by the item's own desk_id, and each row is written with it."""
    other = await make_desk(pool, ids)
    entries = [(d.token(), parse_ticket(item)) for d, item in zip([desk, other], ITEMS, strict=True)]
    query, args = await captured_statement(entries, None, one_desk=False)
    assert query == statement.CREATE_FOR_ANY_DESKS
    assert args[0] is None and args[5] == [desk.desk_id, other.desk_id]  # $6, each item's desk
    plan = await explain(pool, query, *args)
    accesses = table_accesses(plan, desk.desk_id, joined=True)
    # No key ($3 and $1 NULL): idempotency_keys is not read (and below, its insert writes nothing).
    assert set(accesses) == {"departments", "ticket_types", "blocklist_entries", "users"}
    written = written_desks(plan)
    assert set(written) == {"users", "tickets", "messages", "ticket_events", "idempotency_keys"}
    assert all(re.fullmatch(r"[a-z_0-9]+\.desk_id", written[t]) for t in written if t != "idempotency_keys")
    # desk_counters is updated by headoni_bump_counters() (sql/0005), one desk_id at a time, in desk order.
    assert updated_tables(plan) == set()
    assert "Seq Scan" not in json.dumps(plan)


@pytest.mark.parametrize(
    ("name", "query", "second"),
    DESK_READS,
)
async def test_the_read_statements_touch_one_desk_through_desk_id_indexes(
    pool: asyncpg.Pool, desk: Desk, name: str, query: str, second: int | None
) -> None:
    args = (desk.desk_id,) if second is None else (desk.desk_id, second)
    plan = await explain(pool, query, *args)
    accesses = table_accesses(plan, desk.desk_id, joined=True)
    # The desk itself is named; joined tables match desk_id to desk_id (Citus routes those joins too).
    assert f"desk_id = '{desk.desk_id}'::bigint" in " ".join(c for cs in accesses.values() for c in cs), name
    assert not [n for n in nodes(plan) if n["Node Type"] == "ModifyTable"]



async def test_a_statement_of_one_desk_refuses_creates_of_two(pool: asyncpg.Pool, ids: Snowflake, desk: Desk) -> None:
    other = await make_desk(pool, ids)
    entries = [(d.token(), parse_ticket(item)) for d, item in zip([desk, other], ITEMS, strict=True)]
    async with pool.acquire() as conn:
        with pytest.raises(ValueError, match="one desk"):
            await writer.write(conn, ids, entries, one_desk=True)
        assert await conn.fetchval("SELECT count(*) FROM tickets WHERE desk_id = ANY($1::bigint[])",
                                   [desk.desk_id, other.desk_id]) == 0


async def test_no_part_of_a_batch_statement_runs_again_for_each_row_of_another(
    pool: asyncpg.Pool, ids: Snowflake, desk: Desk
) -> None:
    """new_user, the requesters a statement inserts, is read once by each part that reads it, however many
    items the statement carries: in the generic plan the service's sessions run (app/db.py), run and
    rolled back. users_written's count of new_user, inlined, sat inside ready's nested loop and counted
    again for every row of ready: 100 counts of 100 rows for a batch of 100 (docs/benchmark.md)."""
    items = [(desk.token(), parse_ticket(b'{"email": "v%d@example.com", "subject": "s", "body": "b"}' % i))
             for i in range(40)]
    query, args = statement.build(items, None, None, ids.next_ids(statement.IDS_PER_ITEM * len(items)),
                                  one_desk=False)
    async with pool.acquire() as conn:
        await conn.execute(f"PREPARE batch_check AS {query}")
        transaction = conn.transaction()
        await transaction.start()
        try:
            await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
            types = await conn.fetchval("SELECT parameter_types::text[] FROM pg_prepared_statements "
                                        "WHERE name = 'batch_check'")
            # EXECUTE takes no bind parameters: each argument as a literal, as PostgreSQL quotes it
            literals = [await conn.fetchval(f"SELECT quote_nullable($1::{t}::text)", a)
                        for t, a in zip(types, args, strict=True)]
            explained = await conn.fetchval(
                f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE batch_check({', '.join(literals)})"
            )
        finally:
            await transaction.rollback()
            await conn.execute("DEALLOCATE batch_check")
    plan: Plan = json.loads(explained)[0]["Plan"]
    reads = [n for n in nodes(plan) if n.get("CTE Name") == "new_user"]
    assert len(reads) >= 2  # ready's join and users_written's count
    assert [n["Actual Loops"] for n in reads] == [1] * len(reads)
    assert sum(n["Actual Rows"] for n in reads) == len(items) * len(reads)  # every new requester, once each
