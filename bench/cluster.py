"""Fresh databases on a server that may be a Citus coordinator, for the benchmarks and the test suite.

Citus keeps its metadata per database: a new database on a Citus cluster needs the database and the
citus extension on every node, and the coordinator must learn its nodes again. Given the URL of a
database that already is a Citus cluster (its pg_dist_node lists the nodes), create_database does all
of that, with the same user on every node. On a plain PostgreSQL it is a CREATE DATABASE.
"""

from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import asyncpg

_NODES = """
SELECT nodename, nodeport, groupid = 0 AS coordinator FROM pg_dist_node
WHERE noderole = 'primary' AND isactive ORDER BY groupid, nodeid
"""


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


async def create_database(server_url: str, name: str) -> str:
    """Drop and create database `name` on the server (and, on Citus, on every node, as a cluster of the
    same nodes); return its URL."""
    nodes = await citus_nodes(server_url)
    await drop_database(server_url, name, nodes)
    url = with_database(server_url, name)
    if not nodes:
        await _execute(server_url, f'CREATE DATABASE "{name}"')  # our own names only, never user input
        return url
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
    return url


async def drop_database(server_url: str, name: str, nodes: list[Node] | None = None) -> None:
    """Drop database `name` wherever create_database made it."""
    if nodes is None:
        nodes = await citus_nodes(server_url)
    for node in reversed(nodes) if nodes else [None]:
        await _execute(
            at_node(server_url, node) if node else server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'
        )
