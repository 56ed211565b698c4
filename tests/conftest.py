"""Fixtures: a real PostgreSQL (embedded by default), the app in-process, and a desk per test.

Each test run gets its own database, migrated (bench/cluster.py: a copy of a template migrated once from
sql/), so concurrent runs never meet. Each test makes its own desk, so tests never see each other's rows.
HEADONI_TEST_DATABASE_URL points the suite at another server (a URL whose user may create databases), or
at a database of a Citus cluster's coordinator, where each new database is made on every node and
migrated there.
"""

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from asgi_lifespan import LifespanManager

from app import admin, db, settings
from app.auth import Token
from app.ids import Snowflake, WorkerLease
from app.main import create_app
from bench import cluster

ROOT = Path(__file__).resolve().parent.parent
BASE_DOMAIN = "localhost"


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


# The forms of the create, as keyword arguments of writer.write and Writer: the two
# statements of HEADONI_STATEMENT_SCOPE, and headoni_create_for_desk(), the form the service uses on
# Citus (app/citus.py), which a plain PostgreSQL runs too.
CREATE_FORMS: dict[str, dict[str, Any]] = {
    "any-desks": {},
    "one-desk": {"one_desk": True},
    "citus-function": {"citus": True, "lock_timeout_ms": 10_000},
}


def create_form(name: str, on_citus: bool) -> dict[str, Any]:
    """The keyword arguments of one form; on Citus only the function runs, so the others are skipped."""
    if on_citus and name != "citus-function":
        pytest.skip(f"on Citus the service writes every create as headoni_create_for_desk(), not {name}")
    return CREATE_FORMS[name]


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


@asynccontextmanager
async def app_client(config: settings.Settings, database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """The app in-process, lifespan run, over httpx's ASGI transport."""
    app = create_app(config, database_url)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            yield c


@pytest.fixture(scope="session")
async def client(config: settings.Settings, database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """The app in-process, as configured by default."""
    async with app_client(config, database_url) as c:
        yield c


@dataclass
class Desk:
    """A desk made for one test, with a token holding both scopes."""

    subdomain: str
    desk_id: int
    default_department_id: str
    default_ticket_type_id: str
    token_id: str
    secret: str

    @property
    def host(self) -> str:
        return f"{self.subdomain}.{BASE_DOMAIN}"

    def headers(self, secret: str | None = None, **extra: str) -> dict[str, str]:
        return {"Host": self.host, "Authorization": f"Bearer {secret or self.secret}", **extra}

    def token(self) -> Token:
        """The desk's token as the service holds it once authenticated, for calling app code directly."""
        return Token(int(self.token_id), self.desk_id, self.subdomain, "Test Suite", frozenset(), "API Via Test Suite")


async def make_desk(pool: asyncpg.Pool, ids: Snowflake, token_name: str = "Test Suite") -> Desk:
    subdomain = f"t{uuid.uuid4().hex[:12]}"
    async with pool.acquire() as conn:
        desk = await admin.create_desk(conn, ids, subdomain, None)
        token = await admin.create_token(conn, ids, subdomain, token_name, ["tickets:create", "tickets:read"])
    assert token.secret is not None
    return Desk(
        subdomain, int(desk.id), desk.defaultDepartmentId, desk.defaultTicketTypeId, token.id, token.secret
    )


@pytest.fixture
async def desk(pool: asyncpg.Pool, ids: Snowflake) -> Desk:
    return await make_desk(pool, ids)


def ticket_body(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "email": "alice@example.com",
        "subject": "Login broken on staging",
        "body": "I loop back to /sign-in after typing my email.",
    }
    body.update(fields)
    return {k: v for k, v in body.items() if v is not ...}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """A real `headoni serve` process."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_server(database_url: str, log: Path, *args: str, **env: str) -> Server:
    port = free_port()
    environment = {**os.environ, "DATABASE_URL": database_url, "HEADONI_BASE_DOMAIN": BASE_DOMAIN, **env}
    with log.open("wb") as out:  # the child keeps its own descriptor
        process = subprocess.Popen(
            [sys.executable, "-m", "app", "serve", "--port", str(port), *args],
            cwd=ROOT, env=environment, stdout=out, stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"headoni serve exited: {log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return Server(process, port, log)
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"headoni serve did not get ready: {log.read_text()}")


def stop_server(server: Server) -> None:
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(20)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


@contextmanager
def serving(database_url: str, log: Path, *args: str, **env: str) -> Iterator[Server]:
    """A `headoni serve` process (see start_server) for the duration of the block."""
    srv = start_server(database_url, log, *args, **env)
    try:
        yield srv
    finally:
        stop_server(srv)


@pytest.fixture(scope="session")
def server(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One `headoni serve` process over real HTTP, shared by the end-to-end tests."""
    with serving(database_url, tmp_path_factory.mktemp("serve") / "serve.log") as srv:
        yield srv
