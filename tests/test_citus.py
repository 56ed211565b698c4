"""On a Citus cluster: the schema distributed by desk, and every hot statement routed as one task to one
node, as Citus's EXPLAIN shows it on the coordinator. Skipped without a cluster (run the suite with
HEADONI_TEST_DATABASE_URL naming a database of the coordinator, docs/scaling.md)."""

import asyncio
import hashlib
import json
import re
from typing import Any

import asyncpg
import pytest

from app import admin, auth, citus, db, idempotency, limiter, settings, statement
from app.auth import Token
from app.ids import Snowflake
from app.validation import parse_ticket
from bench import cluster
from tests.support.desks import Desk
from tests.support.reads import DESK_READS
from tests.test_scaling import captured_statement

pytestmark = pytest.mark.usefixtures("citus_only")

DESK_DATA = {
    "desk_counters", "departments", "ticket_types", "users", "blocklist_entries",
    "tickets", "messages", "ticket_events", "idempotency_keys", "rate_limit_buckets",
}
REFERENCE = {"desks", "api_tokens"}
COORDINATOR_ONLY = {"schema_migrations", "snowflake_workers"}

Plan = dict[str, Any]


async def create_statement(entries: list[statement.Entry], key: idempotency.Key | None) -> tuple[str, tuple[Any, ...]]:
    """What the service sends on Citus to write these creates (of one desk), and its arguments: the one
    place these tests get a create's statement from."""
    return await captured_statement(entries, key, one_desk=True, citus=True)


async def explain(pool: asyncpg.Pool, query: str, *args: Any) -> Plan:
    """Citus's plan on the coordinator (EXPLAIN without ANALYZE runs nothing)."""
    plan: Plan = json.loads(await pool.fetchval("EXPLAIN (FORMAT JSON) " + query, *args))[0]["Plan"]
    return plan


def route(plan: Plan) -> str:
    """The node (host:port) of the plan's one task; fails unless Citus sends the statement whole to one
    node: one task, and no subplan run before it."""
    assert plan.get("Custom Plan Provider") == "Citus Adaptive", plan
    distributed = plan["Distributed Query"]
    assert "Subplans" not in distributed, "Citus runs parts of the statement as steps of their own"
    job = distributed["Job"]
    assert job["Task Count"] == 1 and len(job["Tasks"]) == 1, f"{job['Task Count']} tasks"
    found = re.search(r"host=(\S+) port=(\d+)", job["Tasks"][0]["Node"])
    assert found is not None
    return f"{found[1]}:{found[2]}"


async def node_of(pool: asyncpg.Pool, desk_id: int) -> str:
    """The node holding the desk's shards (host:port)."""
    row = await pool.fetchrow(
        "SELECT nodename, nodeport FROM citus_shards WHERE table_name = 'desk_counters'::regclass"
        " AND shardid = get_shard_id_for_distribution_column('desk_counters', $1::bigint)",
        desk_id,
    )
    return f"{row['nodename']}:{row['nodeport']}"


def item(n: int, **fields: str) -> Any:
    body = {"email": f"person{n}@example.com", "subject": f"s{n}", "body": "b", **fields}
    return parse_ticket(json.dumps(body).encode())


def key(name: str) -> idempotency.Key:
    return idempotency.Key(name, "POST /api/v1/tickets", hashlib.sha256(name.encode()).digest())


async def test_desks_and_tokens_are_reference_tables_and_the_rest_is_colocated_by_desk(pool: asyncpg.Pool) -> None:
    """sql/0006: what each table is on Citus. A table a later migration adds must be one of these too."""
    rows = await pool.fetch(
        "SELECT table_name::text AS name, citus_table_type AS kind, distribution_column AS column, colocation_id"
        " FROM citus_tables"
    )
    tables = {r["tablename"] for r in await pool.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert tables - {r["name"] for r in rows} == COORDINATOR_ONLY
    assert {r["name"] for r in rows if r["kind"] == "reference"} == REFERENCE
    distributed = [r for r in rows if r["kind"] == "distributed"]
    assert {r["name"] for r in distributed} == DESK_DATA
    assert {r["column"] for r in distributed} == {"desk_id"}
    assert len({r["colocation_id"] for r in distributed}) == 1
    function = await pool.fetchrow(
        "SELECT distribution_argument_index, colocationid FROM pg_dist_object"
        " WHERE objid = 'headoni_create_for_desk'::regproc"
    )
    assert (function["distribution_argument_index"], function["colocationid"]) == (0, distributed[0]["colocation_id"])


@pytest.mark.parametrize("case", ["single", "shared", "batch", "keyed", "keyed batch"])
async def test_every_create_is_one_task_on_the_node_of_its_desk(
    pool: asyncpg.Pool, ids: Snowflake, desk: Desk, case: str
) -> None:
    """A single create, a shared one (the coalescer's: several requests, here of two tokens of the desk),
    a batch, a keyed create and a keyed batch: each is one call, sent whole to the desk's worker."""
    token = desk.token()
    async with pool.acquire() as conn:
        second = await admin.create_token(conn, ids, desk.subdomain, "Second", ["tickets:create"])
    other = Token(int(second.id), desk.desk_id, desk.subdomain, "Second", frozenset(), "API Via Second")
    entries = {
        "single": [(token, item(1))],
        "shared": [(token, item(1)), (other, item(2)), (token, item(3, priority="high"))],
        "batch": [(token, item(n)) for n in range(5)],
        "keyed": [(token, item(1))],
        "keyed batch": [(token, item(n)) for n in range(5)],
    }[case]
    text, args = await create_statement(entries, key(case) if "keyed" in case else None)
    assert text == statement.CREATE_ON_CITUS
    assert route(await explain(pool, text, *args)) == await node_of(pool, desk.desk_id)


@pytest.mark.parametrize(
    ("name", "query", "second"),
    [*DESK_READS, ("stored tickets of a replay", statement.STORED_TICKETS, [1 << 40, 1 << 41])],
)
async def test_every_read_of_a_desk_is_one_task_on_the_node_of_its_desk(
    pool: asyncpg.Pool, desk: Desk, name: str, query: str, second: Any
) -> None:
    args = (desk.desk_id,) if second is None else (desk.desk_id, second)
    assert route(await explain(pool, query, *args)) == await node_of(pool, desk.desk_id), name


async def test_the_rate_limit_lease_is_one_task_on_the_node_of_its_desk(pool: asyncpg.Pool, desk: Desk) -> None:
    plan = await explain(pool, limiter.LEASE, desk.desk_id, int(desk.token_id), 1000, 10_000, 5)
    assert route(plan) == await node_of(pool, desk.desk_id)


async def test_the_token_lookup_is_one_task_on_one_node(pool: asyncpg.Pool, citus_nodes: list[cluster.Node]) -> None:
    """api_tokens and desks are reference tables: any one node answers the lookup by digest alone."""
    node = route(await explain(pool, auth._LOOKUP, auth.digest("hd_" + "x" * 43)))
    assert node in {f"{n.host}:{n.port}" for n in citus_nodes}


async def test_the_statement_of_one_desk_is_not_routed_which_is_why_creates_are_a_function(desk: Desk,
                                                                                           pool: asyncpg.Pool) -> None:
    """Citus plans no INSERT inside a WITH as part of one task: CREATE_FOR_ONE_DESK runs as a chain of
    steps (and, it was seen, with each step's rows sent to every worker and a two-phase commit over all
    of them). Should a Citus release route it, this fails, and the function may go."""
    text, args = await captured_statement([(desk.token(), item(1))], None, one_desk=True)
    assert text == statement.CREATE_FOR_ONE_DESK
    plan = await explain(pool, text, *args)
    assert "Subplans" in plan["Distributed Query"]


async def test_the_create_function_reaches_no_node_but_its_own(
    pool: asyncpg.Pool, database_url: str, desk: Desk
) -> None:
    """What the routed call does on the desk's worker: every statement of headoni_create_for_desk()
    reads and writes shards of that node only. Run there directly with Citus's command log on, it
    executes everything locally and sends nothing to any other node."""
    host, port = (await node_of(pool, desk.desk_id)).split(":")
    conn = await asyncpg.connect(cluster.at_node(database_url, cluster.Node(host, int(port), False)))
    try:
        notices: list[str] = []
        conn.add_log_listener(lambda _conn, message: notices.append(message.message))
        await conn.execute(
            "SET client_min_messages = notice; SET citus.log_remote_commands = on; SET citus.log_local_commands = on"
        )
        text, args = await create_statement([(desk.token(), item(n)) for n in range(3)], key("local"))
        row = await conn.fetchrow(text, *args)
        await asyncio.sleep(0.05)  # notices are handed to listeners by the event loop
    finally:
        await conn.close()
    assert row["outcomes"] == ["created"] * 3 and list(row["numbers"]) == [1, 2, 3]
    assert any(n.startswith("executing the command locally") for n in notices), notices
    assert [n for n in notices if n.startswith("issuing")] == []


async def test_the_services_own_sessions_keep_sending_the_create_call_whole(
    config: settings.Settings, database_url: str, ids: Snowflake, desk: Desk
) -> None:
    """Citus sends the call to the worker whole only when it plans it with its arguments: the service's
    pool must not force generic plans there (app/db.py). Seen on a session of the service's own pool,
    past PostgreSQL's five custom plans, in the commands the coordinator sends (citus.log_remote_commands)."""
    served = await citus.settle_at(database_url, config)
    assert served.citus
    database = await db.Database.open(served, database_url)
    try:
        async with database.connection() as conn:
            notices: list[str] = []

            def listen(_conn: Any, message: Any) -> None:
                notices.append(message.message)

            conn.add_log_listener(listen)
            await conn.execute("SET client_min_messages = notice; SET citus.log_remote_commands = on")
            for n in range(7):
                notices.clear()
                text, args = await create_statement([(desk.token(), item(n))], None)
                row = await conn.fetchrow(text, *args)
                await asyncio.sleep(0.05)  # notices are handed to listeners by the event loop
                assert list(row["numbers"]) == [n + 1]
            await conn.execute("RESET citus.log_remote_commands; RESET client_min_messages")
            conn.remove_log_listener(listen)
    finally:
        await database.close()
    sent = [n for n in notices if n.startswith("issuing")]
    assert len(sent) == 1 and "headoni_create_for_desk(" in sent[0], sent
