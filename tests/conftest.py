"""Fixtures and hooks only (the helpers that test modules import are in tests/support/): a real
PostgreSQL (embedded by default), the app in-process, and a desk per test.

Each test run gets its own database, migrated (bench/cluster.py: a copy of a template migrated once from
sql/), so concurrent runs never meet. Each test makes its own desk, so tests never see each other's rows.
HEADONI_TEST_DATABASE_URL points the suite at another server (a URL whose user may create databases), or
at a database of a Citus cluster's coordinator, where each new database is made on every node and
migrated there.

A module marked `each_create_form` (`pytestmark = pytest.mark.each_create_form`) runs each of its tests
that use `client` against every form of the create: the two HEADONI_STATEMENT_SCOPE statements and the
function the service uses on Citus, as `[any-desks]`, `[one-desk]` and `[citus-function]`.
"""

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from app import db, settings
from app.ids import Snowflake, WorkerLease
from bench import cluster
from bench.server import Server
from tests.support import BASE_DOMAIN, ROOT
from tests.support.app import CREATE_FORMS, app_client, configured_for
from tests.support.desks import Desk, make_desk
from tests.support.servers import serving


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Under the each_create_form marker, `client` is one app per form of the create, per module."""
    if metafunc.definition.get_closest_marker("each_create_form") and "client" in metafunc.fixturenames:
        metafunc.parametrize("client", list(CREATE_FORMS), indirect=True, scope="module")


@pytest.fixture(scope="session")
def server_url() -> str:
    """A URL of the PostgreSQL server the suite runs against (its maintenance database)."""
    url = os.environ.get("HEADONI_TEST_DATABASE_URL")
    if url:
        return url
    data_dir = Path(os.environ.get("HEADONI_TEST_DATA_DIR", ROOT / ".headoni-test"))
    return db.embedded_url(data_dir.resolve())


@pytest.fixture(scope="session")
async def citus_nodes(server_url: str) -> list[cluster.Node]:
    """The nodes of the suite's Citus cluster, coordinator first; [] on a plain PostgreSQL."""
    return await cluster.citus_nodes(server_url)


@pytest.fixture(scope="session")
def on_citus(citus_nodes: list[cluster.Node]) -> bool:
    return bool(citus_nodes)


@pytest.fixture
def citus_only(on_citus: bool) -> None:
    if not on_citus:
        pytest.skip("needs a Citus cluster: set HEADONI_TEST_DATABASE_URL to a database of its coordinator")


@pytest.fixture(scope="session")
async def database_url(server_url: str) -> AsyncIterator[str]:
    """A fresh database for this run, migrated from sql/."""
    async with cluster.throwaway_database(server_url, "headoni_test", migrated=True) as url:
        yield url


@pytest.fixture
async def empty_database(server_url: str) -> AsyncIterator[str]:
    """A throwaway database on the suite's server, with no schema at all (on Citus, just the extension)."""
    async with cluster.throwaway_database(server_url, "headoni_empty", migrated=False) as url:
        yield url


@pytest.fixture(scope="session")
def config(database_url: str) -> settings.Settings:
    return settings.Settings(
        database_url=database_url,
        base_domain=BASE_DOMAIN,
        data_dir=ROOT / ".headoni-test",
        pool_min_size=1,
        pool_max_size=8,
        pool_timeout=10.0,
        statement_timeout_ms=10_000,
        lock_timeout_ms=10_000,
        token_cache_seconds=1.0,
        metrics_max_age_seconds=0.0,  # every scrape fresh, so tests see each request counted at once
    )


@pytest.fixture(scope="session")
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool for checking what the database holds."""
    async with asyncpg.create_pool(database_url, min_size=1, max_size=4) as p:
        yield p


@pytest.fixture(scope="session")
async def ids(database_url: str) -> AsyncIterator[Snowflake]:
    lease = await WorkerLease.acquire(database_url)
    try:
        yield Snowflake(lease.worker)
    finally:
        await lease.close()


@pytest.fixture(scope="session")
async def client(
    request: pytest.FixtureRequest, config: settings.Settings, database_url: str
) -> AsyncIterator[httpx.AsyncClient]:
    """The app in-process, as configured by default; in a module marked each_create_form, one per module
    and form of the create (pytest_generate_tests), writing every create in that form."""
    form: str | None = getattr(request, "param", None)
    async with app_client(config if form is None else configured_for(config, form), database_url) as c:
        yield c


@pytest.fixture
async def desk(pool: asyncpg.Pool, ids: Snowflake) -> Desk:
    return await make_desk(pool, ids)


@pytest.fixture(scope="session")
def server(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One `headoni serve` process over real HTTP, shared by the end-to-end tests."""
    with serving(database_url, tmp_path_factory.mktemp("serve") / "serve.log") as srv:
        yield srv
