"""Migrations: they build an empty database, apply once, never race, and key every table by desk."""

import asyncio
from pathlib import Path

import asyncpg
import pytest

from app import db
from bench import cluster

# The directory of desks (a reference table when distributed), the migration runner's bookkeeping, and
# the snowflake worker numbers (per process, not per desk).
NOT_DESK_DATA = {"desks", "schema_migrations", "snowflake_workers"}




def all_migrations() -> list[str]:
    return [path.name for path in db.migration_files()]


async def test_migrations_apply_to_an_empty_database_and_rerunning_applies_nothing(empty_database: str) -> None:
    names = all_migrations()
    assert names and names[0] == "0001_init.sql"
    assert names == sorted(names) and len({name[:4] for name in names}) == len(names)  # one file per number
    conn = await asyncpg.connect(empty_database)
    try:
        assert await db.migrate(conn) == names
        recorded = await conn.fetch("SELECT name FROM schema_migrations ORDER BY name")
        assert [r["name"] for r in recorded] == names
        tables = {r[0] for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        assert {"desks", "desk_counters", "departments", "ticket_types", "api_tokens", "users", "tickets",
                "messages", "ticket_events", "blocklist_entries"} <= tables
        assert await db.migrate(conn) == []
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == len(names)
    finally:
        await conn.close()


async def test_two_concurrent_migrate_runs_do_not_race(empty_database: str) -> None:
    first, second = await asyncpg.connect(empty_database), await asyncpg.connect(empty_database)
    try:
        results = await asyncio.gather(db.migrate(first), db.migrate(second))
        assert sorted(results, key=len) == [[], all_migrations()]
        assert await first.fetchval("SELECT count(*) FROM schema_migrations") == len(all_migrations())
        # The advisory lock was released by both: a third run takes it at once and applies nothing.
        assert await db.migrate(first) == []
        held = await second.fetchval(
            "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database"
            " WHERE l.locktype = 'advisory' AND d.datname = current_database()"
        )
        assert held == 0
    finally:
        await first.close()
        await second.close()


async def test_a_migrated_database_is_a_copy_of_a_template_named_after_the_migrations(
    database_url: str, server_url: str, on_citus: bool, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The suite's database comes from bench/cluster.py's factory with every migration applied; on a
    plain PostgreSQL it is copied from a template that nobody may connect to, named after the migrations'
    names and contents (not where they lie), so that a change in sql/ makes (and uses) another one."""
    conn = await asyncpg.connect(database_url)
    try:
        assert [r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations ORDER BY name")] == (
            all_migrations()
        )
        assert await db.migrate(conn) == []
        name = cluster.template_name()
        template = await conn.fetchrow("SELECT datistemplate, datallowconn FROM pg_database WHERE datname = $1", name)
    finally:
        await conn.close()
    if not on_citus:
        assert template is not None and (template["datistemplate"], template["datallowconn"]) == (True, False)
    copies = []
    for path in db.migration_files():
        copy = tmp_path / path.name
        copy.write_bytes(path.read_bytes())
        copies.append(copy)
    monkeypatch.setattr(db, "migration_files", lambda: copies)
    assert cluster.template_name() == name
    copies[-1].write_bytes(copies[-1].read_bytes() + b"\n-- changed\n")
    assert cluster.template_name() != name


_TABLES = """
SELECT c.oid, c.relname,
       (SELECT a.attnum FROM pg_attribute a
        WHERE a.attrelid = c.oid AND a.attname = 'desk_id' AND a.attnotnull AND NOT a.attisdropped) AS desk_column
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p')
ORDER BY c.relname
"""
_KEYS = """
SELECT con.conname, con.contype::text AS contype,
       con.conkey::int[] AS columns, con.confkey::int[] AS referenced_columns,
       (SELECT a.attnum FROM pg_attribute a
        WHERE a.attrelid = con.confrelid AND a.attname = 'desk_id' AND NOT a.attisdropped) AS referenced_desk_column
FROM pg_constraint con
WHERE con.conrelid = $1 AND con.contype IN ('p', 'u', 'f')
"""
_UNIQUE_INDEXES = """
SELECT i.indexrelid::regclass::text AS name, i.indkey::int2[]::int[] AS columns
FROM pg_index i WHERE i.indrelid = $1 AND i.indisunique
"""


async def test_every_table_is_keyed_by_desk(pool: asyncpg.Pool) -> None:
    """Every table of a desk's data has desk_id, and every primary, unique and foreign key (and every
    unique index) includes it, a foreign key matching desk_id to desk_id: distributable by desk."""
    problems: list[str] = []
    tables = await pool.fetch(_TABLES)
    checked = [t for t in tables if t["relname"] not in NOT_DESK_DATA]
    assert len(checked) >= 9
    for table in checked:
        name, desk_column = table["relname"], table["desk_column"]
        if desk_column is None:
            problems.append(f"{name} has no NOT NULL desk_id column")
            continue
        keys = await pool.fetch(_KEYS, table["oid"])
        assert any(key["contype"] == "p" for key in keys), f"{name} has no primary key"
        for key in keys:
            columns = list(key["columns"])
            if desk_column not in columns:
                problems.append(f"{name}.{key['conname']} does not include desk_id")
            elif key["contype"] == "f":
                referenced = list(key["referenced_columns"])[columns.index(desk_column)]
                if referenced != key["referenced_desk_column"]:
                    problems.append(f"{name}.{key['conname']} does not match desk_id to the referenced desk_id")
        for index in await pool.fetch(_UNIQUE_INDEXES, table["oid"]):
            if desk_column not in index["columns"]:
                problems.append(f"{name}: unique index {index['name']} does not include desk_id")
    assert problems == [], "\n".join(problems)
