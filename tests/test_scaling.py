"""What docs/scaling.md relies on: every statement of a request touches one desk's rows only, through
indexes that lead with desk_id, so with every desk-keyed table distributed by desk_id (Citus) each
statement is routed to the one shard holding the desk.

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

from app import idempotency, reads, tickets
from app.auth import Token
from app.ids import Snowflake
from app.validation import parse_ticket
from tests.conftest import Desk

Plan = dict[str, Any]


class _Captured(Exception):
    pass


class _CaptureConnection:
    """Stands in for a connection to capture the statement and arguments write_tickets would run."""

    async def fetchrow(self, query: str, *args: Any, **kwargs: Any) -> Any:
        raise _Captured(query, args)


async def hot_statement(desk: Desk, ids: Snowflake) -> tuple[str, tuple[Any, ...]]:
    """The statement and arguments of a real create (with an Idempotency-Key, so its table is read too)."""
    token = Token(int(desk.token_id), desk.desk_id, desk.subdomain, "Test Suite", frozenset(), "API Via Test Suite")
    items = [parse_ticket(b'{"email": "a@example.com", "subject": "s", "body": "b", "departmentId": "9"}'),
             parse_ticket(b'{"email": "b@example.com", "subject": "s", "body": "b"}')]
    key = idempotency.Key("scaling-1", tickets.ROUTE, hashlib.sha256(b"body").digest())
    with pytest.raises(_Captured) as captured:
        await tickets.write_tickets(_CaptureConnection(), ids, token, items, key)
    query, args = captured.value.args
    assert query == tickets.CREATE_TICKETS
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
        plan: Plan = json.loads(await conn.fetchval("EXPLAIN (FORMAT JSON) " + query, *args))[0]["Plan"]
    return plan


def table_accesses(plan: Plan, desk_id: int, *, named: bool = True) -> dict[str, list[str]]:
    """Each table read, with the index conditions it is read by. Asserts that each leads with desk_id
    equal to this desk, or to the desk_id of a joined row (an item's desk), and, when named, that the
    desk itself is named."""
    condition = re.compile(rf"\(+desk_id = ('{desk_id}'::bigint|[a-z_0-9]+\.desk_id)\)?( AND |\)$)")
    accesses: dict[str, list[str]] = {}
    for node in nodes(plan):
        table, kind = node.get("Relation Name"), node["Node Type"]
        if table is None or kind == "ModifyTable":  # writes: their rows carry desk_id $1 (see the SQL)
            continue
        assert kind in ("Index Scan", "Index Only Scan", "Bitmap Heap Scan"), f"{kind} on {table}"
        if kind == "Bitmap Heap Scan":
            index_conditions = [n["Index Cond"] for n in nodes(node) if n["Node Type"] == "Bitmap Index Scan"]
        else:
            assert "Index Cond" in node, f"{kind} on {table} without an index condition: {node}"
            index_conditions = [node["Index Cond"]]
        assert index_conditions and all(condition.match(c) for c in index_conditions), (table, index_conditions)
        accesses.setdefault(table, []).extend(index_conditions)
    if named:
        assert f"desk_id = '{desk_id}'::bigint" in " ".join(c for cs in accesses.values() for c in cs)
    return accesses


def written_tables(plan: Plan) -> set[str]:
    return {n["Relation Name"] for n in nodes(plan) if n["Node Type"] == "ModifyTable"}


async def test_the_create_statement_reads_every_table_through_desk_id_indexes(
    pool: asyncpg.Pool, ids: Snowflake, desk: Desk
) -> None:
    query, args = await hot_statement(desk, ids)
    assert args[0] == desk.desk_id  # $1, the desk of the Idempotency-Key
    assert args[5] == [desk.desk_id, desk.desk_id]  # $6, each item's desk, which every table access keys on
    plan = await explain(pool, query, *args)
    accesses = table_accesses(plan, desk.desk_id, named=False)
    assert set(accesses) == {"idempotency_keys", "departments", "ticket_types", "blocklist_entries", "users"}
    # desk_counters is updated by headoni_bump_counters() (sql/0004), one desk_id at a time.
    assert written_tables(plan) == {"users", "tickets", "messages", "ticket_events", "idempotency_keys"}
    assert "desks" not in accesses  # the directory (a reference table when distributed) is not needed
    assert "Seq Scan" not in json.dumps(plan)


@pytest.mark.parametrize(
    ("name", "query", "second"),
    [
        ("ticket by number", reads.TICKET_BY_NUMBER, 1),
        ("ticket by id", reads.TICKET_BY_ID, 1 << 40),
        ("departments", reads.DEPARTMENTS, None),
        ("ticket types", reads.TICKET_TYPES, None),
    ],
)
async def test_the_read_statements_touch_one_desk_through_desk_id_indexes(
    pool: asyncpg.Pool, desk: Desk, name: str, query: str, second: int | None
) -> None:
    args = (desk.desk_id,) if second is None else (desk.desk_id, second)
    plan = await explain(pool, query, *args)
    assert table_accesses(plan, desk.desk_id), name
    assert written_tables(plan) == set()

