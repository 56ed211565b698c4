"""Fresh databases, empty or migrated, for the benchmarks and the test suite: the one factory of both.

On a plain PostgreSQL a migrated database is a copy (CREATE DATABASE ... TEMPLATE) of a template that
was migrated once from sql/: the template is named after a hash of the migrations' contents, so a change
in sql/ makes a new one, and it is made under an advisory lock and published whole (built under another
name, then renamed), so runs sharing a server never see half of one. Nothing ever connects to it (it
allows no connections), since CREATE DATABASE refuses a template that has sessions.

Citus keeps its metadata per database, and a template cannot be copied across nodes: a new database on
a Citus cluster needs the database and the citus extension on every node, and the coordinator must learn
its nodes again; a migrated one is then migrated. Given the URL of a database that already is a Citus
cluster (its pg_dist_node lists the nodes), create_database does all of that, with the same user on
every node.
"""

import hashlib
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from app import db

_NODES = """
SELECT nodename, nodeport, groupid = 0 AS coordinator FROM pg_dist_node
WHERE noderole = 'primary' AND isactive ORDER BY groupid, nodeid
"""
# pg_advisory_lock key held on the maintenance database while the template is looked for or made.
_TEMPLATE_LOCK = 0x6865_6164_5445_4D50  # "headTEMP"


@dataclass(frozen=True)
class Node:
    host: str
    port: int
    coordinator: bool


def with_database(url: str, name: str) -> str:
    """The same server URL, naming another database."""
    base, _, query = url.partition("?")
    scheme, _, rest = base.partition("://")
    authority = rest.split("/", 1)[0]
    return f"{scheme}://{authority}/{name}" + (f"?{query}" if query else "")


def at_node(url: str, node: Node) -> str:
    """The same URL (user, password, database, options) at another node's host and port."""
    parts = urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    netloc = (credentials + "@" if credentials else "") + f"{node.host}:{node.port}"
    return urlunsplit(parts._replace(netloc=netloc))


async def citus_nodes(url: str) -> list[Node]:
    """The primary nodes of the Citus cluster at url, coordinator first; [] on a plain PostgreSQL."""
    conn = await asyncpg.connect(url)
    try:
        if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus')"):
            return []
        rows = await conn.fetch(_NODES)
        nodes = [Node(r["nodename"], r["nodeport"], r["coordinator"]) for r in rows]
        if not any(n.coordinator for n in nodes):  # a coordinator not registered as a node: the URL's own
            parts = urlsplit(url)
            nodes.insert(0, Node(parts.hostname or "localhost", parts.port or 5432, True))
        return nodes
    finally:
        await conn.close()


async def _execute(url: str, *commands: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        for command in commands:
            await conn.execute(command)
    finally:
        await conn.close()


async def create_database(server_url: str, name: str, *, migrated: bool) -> str:
    """Drop and create database `name` on the server, empty or migrated from sql/ (on Citus, on every
    node, as a cluster of the same nodes); return its URL."""
    nodes = await citus_nodes(server_url)
    await drop_database(server_url, name, nodes)
    url = with_database(server_url, name)
    if nodes:
        await _create_on_nodes(server_url, name, nodes)
        if migrated:
            await _migrate(url)
    elif migrated:  # our own names only, never user input
        await _execute(server_url, f'CREATE DATABASE "{name}" TEMPLATE "{await _template(server_url)}"')
    else:
        await _execute(server_url, f'CREATE DATABASE "{name}"')
    return url


@asynccontextmanager
async def throwaway_database(server_url: str, prefix: str, *, migrated: bool) -> AsyncIterator[str]:
    """A new database (create_database) named `prefix`, this process and a random part, so that runs
    sharing a server never meet, for the duration of the block; dropped afterwards."""
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    try:
        yield await create_database(server_url, name, migrated=migrated)
    finally:
        await drop_database(server_url, name)


def template_name() -> str:
    """The template's name: a hash of what db.migrate applies (each migration's name and contents)."""
    digest = hashlib.sha256()
    for path in db.migration_files():
        data = path.read_bytes()
        digest.update(f"{path.name}\0{len(data)}\0".encode() + data)
    return f"headoni_template_{digest.hexdigest()[:16]}"


async def _template(server_url: str) -> str:
    """The migrated template of sql/ as it is now, on a plain PostgreSQL server; made if it is not there."""
    name = template_name()
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _TEMPLATE_LOCK)  # one maker at a time
        try:
            if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)", name):
                await _make_template(conn, server_url, name)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _TEMPLATE_LOCK)
    finally:
        await conn.close()
    return name


async def _make_template(conn: asyncpg.Connection, server_url: str, name: str) -> None:
    """Migrate a new database under a name of its own, its sessions closed, then publish it as `name`.
    (An advisory lock holds only within one database: a run whose maintenance database is another one of
    the server may have published it meanwhile. Then that one is kept, and this one dropped.)"""
    building = f"headoni_building_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    await conn.execute(f'CREATE DATABASE "{building}"')
    published = False
    try:
        await _migrate(with_database(server_url, building))
        await conn.execute(f'ALTER DATABASE "{building}" WITH IS_TEMPLATE true ALLOW_CONNECTIONS false')
        try:
            await conn.execute(f'ALTER DATABASE "{building}" RENAME TO "{name}"')
            published = True
        except asyncpg.DuplicateDatabaseError:
            pass
    finally:
        if not published:
            await conn.execute(f'ALTER DATABASE "{building}" WITH IS_TEMPLATE false')  # else it cannot be dropped
            await conn.execute(f'DROP DATABASE "{building}" WITH (FORCE)')


async def _migrate(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await db.migrate(conn)
    finally:
        await conn.close()


async def _create_on_nodes(server_url: str, name: str, nodes: list[Node]) -> None:
    """Database `name` on every node, with the extension, and the coordinator told its nodes."""
    url = with_database(server_url, name)
    for node in nodes:  # the coordinator first: it may pass CREATE DATABASE on (enable_create_database_propagation)
        conn = await asyncpg.connect(at_node(server_url, node))
        try:
            if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)", name):
                await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
    for node in nodes:
        await _execute(at_node(url, node), "SET client_min_messages = warning", "CREATE EXTENSION citus")
    coordinator = next(n for n in nodes if n.coordinator)
    conn = await asyncpg.connect(at_node(url, coordinator))
    try:
        await conn.execute("SELECT citus_set_coordinator_host($1, $2)", coordinator.host, coordinator.port)
        for node in nodes:
            if not node.coordinator:
                await conn.execute("SELECT citus_add_node($1, $2)", node.host, node.port)
    finally:
        await conn.close()


async def drop_database(server_url: str, name: str, nodes: list[Node] | None = None) -> None:
    """Drop database `name` wherever create_database made it."""
    if nodes is None:
        nodes = await citus_nodes(server_url)
    for node in reversed(nodes) if nodes else [None]:
        await _execute(
            at_node(server_url, node) if node else server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'
        )
