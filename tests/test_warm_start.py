"""A server that just started serves its first creates as fast as its later ones: its pool's connections
are open with the create statement prepared and planned, and the tokens that exist are already known.
(Before, a new server's first second had a p99 of about 50 ms against 20 ms after: docs/benchmark.md.)"""

import gc

import asyncpg
from asgi_lifespan import LifespanManager

from app import settings, statement
from app.auth import digest
from app.ids import Snowflake
from app.main import create_app
from app.services import of_state
from tests.support.desks import make_desk


async def test_a_new_server_has_its_create_statement_prepared_and_its_tokens_known(
    config: settings.Settings, database_url: str, pool: asyncpg.Pool, ids: Snowflake, on_citus: bool
) -> None:
    desk = await make_desk(pool, ids)  # before the server starts
    app = create_app(config, database_url)
    async with LifespanManager(app) as manager:
        found = of_state(manager._state)
        assert found is not None
        assert found.tokens.known(digest(desk.secret))  # no request has been made yet
        async with found.database.connection() as conn:
            plans = await conn.fetch(
                "SELECT generic_plans FROM pg_prepared_statements WHERE statement = $1",
                statement.CREATE_FOR_ANY_DESKS,
            )
    if on_citus:
        # There the call is only prepared, to learn its argument types (asyncpg's first look-up of them
        # took 600 ms on Citus, docs/scaling.md), and not kept: Citus plans it with its arguments each
        # time and routes it by its desk, which a warm-up has not (app/writer.py prepare).
        assert plans == []
    else:
        assert [row["generic_plans"] for row in plans] == [1]  # prepared once, its plan made, before any create


async def test_what_a_started_server_holds_is_left_out_of_the_garbage_collectors_scans(
    config: settings.Settings, database_url: str
) -> None:
    gc.unfreeze()
    app = create_app(config, database_url)
    async with LifespanManager(app):
        assert gc.get_freeze_count() > 10_000  # the modules, pools and caches of the process
