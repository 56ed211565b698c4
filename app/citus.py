"""Citus, noticed at start: which node the service may use, and how it writes creates there.

On a database with the citus extension (docs/scaling.md) every create statement is of one desk and
runs as headoni_create_for_desk() (sql/0006), which Citus routes whole to the worker holding the desk.
The default statement, of any desks, cannot run there, so an explicit HEADONI_STATEMENT_SCOPE=any-desks
is refused; left unset, the scope is one-desk.
"""

from typing import Final

import asyncpg
import msgspec

from app.settings import Settings

_CITUS: Final = "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus')"
# Workers (and the coordinator's standbys) answer queries too, but the migrations, the worker leases'
# advisory locks and their table (snowflake_workers) live on the coordinator, and only there.
_COORDINATOR: Final = "SELECT citus_is_coordinator() AND NOT pg_is_in_recovery()"


class Unsupported(Exception):
    """This database cannot serve the configuration given: one line for the user, exit code 1."""


async def present(conn: asyncpg.Connection) -> bool:
    return bool(await conn.fetchval(_CITUS))


async def require_coordinator(conn: asyncpg.Connection) -> None:
    """Refuse a Citus node other than the coordinator (nothing to check on a plain PostgreSQL)."""
    if await present(conn) and not await conn.fetchval(_COORDINATOR):
        raise Unsupported(
            "DATABASE_URL names a Citus worker node: point it at the coordinator (docs/scaling.md)"
        )


async def settle(conn: asyncpg.Connection, settings: Settings) -> Settings:
    """The settings to serve this database with: on Citus, creates of one desk through the routed
    function; an explicit HEADONI_STATEMENT_SCOPE=any-desks there is Unsupported."""
    if not await present(conn):
        return settings
    if settings.statement_scope_set and not settings.one_desk_statements:
        raise Unsupported(
            "HEADONI_STATEMENT_SCOPE=any-desks cannot run on Citus (the database has the citus extension):"
            " set it to one-desk, or leave it unset"
        )
    return msgspec.structs.replace(settings, one_desk_statements=True, citus=True)


async def settle_at(url: str, settings: Settings) -> Settings:
    """settle() on a connection of its own, before the pool is made (whose settings depend on it)."""
    conn = await asyncpg.connect(url)
    try:
        return await settle(conn, settings)
    finally:
        await conn.close()
