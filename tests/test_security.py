"""Security: token secrets (random, stored only as SHA-256, never logged or echoed), no reach from
one desk into another whatever the Host or ids, and 500 bodies that carry no trace or SQL."""

import base64
import hashlib
import json
import secrets
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest

from app import admin, auth
from app.ids import Snowflake, WorkerLease
from bench import cluster
from bench.server import Server
from tests.support import BASE_DOMAIN
from tests.support.api import TICKETS, assert_error, new_token
from tests.support.desks import Desk, make_desk, ticket_body
from tests.support.servers import serving


def test_secrets_are_32_random_bytes_from_the_secrets_module_prefixed_hd(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[int] = []
    real = secrets.token_urlsafe

    def recording(nbytes: int) -> str:
        asked.append(nbytes)
        return real(nbytes)

    monkeypatch.setattr(secrets, "token_urlsafe", recording)  # the module auth uses
    made = [auth.new_secret() for _ in range(1000)]
    assert asked == [32] * 1000
    assert len(set(made)) == len(made)
    for secret in made:
        assert secret.startswith("hd_")
        raw = base64.urlsafe_b64decode(secret[3:] + "=" * (-len(secret[3:]) % 4))
        assert len(raw) >= 32


async def test_a_secret_is_stored_only_as_its_sha256_nowhere_in_any_table(
    pool: asyncpg.Pool, ids: Snowflake, desk: Desk
) -> None:
    digest = await pool.fetchval(
        "SELECT secret_sha256 FROM api_tokens WHERE desk_id = $1 AND token_id = $2", desk.desk_id, int(desk.token_id)
    )
    assert digest == hashlib.sha256(desk.secret.encode()).digest()
    needles = [desk.secret, desk.secret[3:], desk.secret.encode().hex()]
    tables = await pool.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    assert len(tables) >= 9
    for table in tables:
        name = table["tablename"]
        for needle in needles:  # every column of every row, as text (bytea shows as hex)
            hits = await pool.fetchval(f'SELECT count(*) FROM "{name}" t WHERE strpos(t::text, $1) > 0', needle)
            assert hits == 0, f"{name} holds the secret"
    async with pool.acquire() as conn:
        listed = await admin.list_tokens(conn, desk.subdomain)
    listing = msgspec.json.encode(listed)
    assert desk.secret.encode() not in listing and b'"secret"' not in listing


# ---------------------------------------------------------------------------------------------------
# A real server on a database of its own, for its log, and for a fault that makes it answer 500.


@pytest.fixture(scope="module")
async def secured(server_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[Server, str]]:
    async with cluster.throwaway_database(server_url, "headoni_security", migrated=True) as url:
        with serving(url, tmp_path_factory.mktemp("secured") / "serve.log") as server:
            yield server, url


@pytest.fixture
async def secured_desk(secured: tuple[Server, str]) -> AsyncIterator[tuple[Server, asyncpg.Pool, Snowflake, Desk]]:
    server, url = secured
    lease = await WorkerLease.acquire(url)
    try:
        async with asyncpg.create_pool(url, min_size=1, max_size=2) as pool:
            ids = lease.snowflake()
            yield server, pool, ids, await make_desk(pool, ids)
    finally:
        await lease.close()


async def test_no_log_line_and_no_answer_ever_holds_a_secret(
    secured_desk: tuple[Server, asyncpg.Pool, Snowflake, Desk],
) -> None:
    server, pool, ids, desk = secured_desk
    other = await make_desk(pool, ids)
    reader = await new_token(pool, ids, desk, "tickets:read")
    revoked = await new_token(pool, ids, desk, "tickets:create")
    async with pool.acquire() as conn:
        token_id = await conn.fetchval(
            "SELECT token_id FROM api_tokens WHERE secret_sha256 = $1", hashlib.sha256(revoked.encode()).digest()
        )
        await admin.revoke_token(conn, desk.subdomain, token_id)
    sent = [desk.secret, reader, revoked, other.secret]
    answers: list[httpx.Response] = []
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
        for secret in sent:
            for host in (desk.host, other.host, "localhost", ""):
                headers = {"Host": host, "Authorization": f"Bearer {secret}"}
                answers.append(await http.post(TICKETS, json=ticket_body(), headers=headers))
                answers.append(await http.post(TICKETS, content=b"{", headers=headers))
                answers.append(await http.get(f"{TICKETS}/1", headers=headers))
                answers.append(await http.get(f"{TICKETS}/999", headers=headers))
                answers.append(await http.get("/api/v1/departments", headers=headers))
            for scheme in ("bearer", "Basic", "Token"):  # malformed uses of a real secret
                headers = {"Host": desk.host, "Authorization": f"{scheme}  {secret}x"}
                answers.append(await http.get("/api/v1/ticket-types", headers=headers))
            answers.append(await http.get("/api/v1/departments", headers={"Host": desk.host, "X-Api-Key": secret}))
    assert {a.status_code for a in answers} >= {200, 201, 400, 401, 403, 404}
    log = server.log.read_text()
    assert log.count("\n") >= len(answers)  # the requests were logged
    for secret in sent:
        assert secret not in log and secret[3:] not in log
        for answer in answers:
            assert secret not in answer.text and secret not in str(answer.headers)


async def test_a_500_body_holds_no_trace_or_sql_and_the_log_holds_the_cause_with_the_request_id(
    secured_desk: tuple[Server, asyncpg.Pool, Snowflake, Desk],
) -> None:
    """A real fault: the schema changes under the running server (a column renamed), so its SQL fails."""
    server, pool, _, desk = secured_desk
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
        assert (await http.post(TICKETS, json=ticket_body(), headers=desk.headers())).status_code == 201
        await pool.execute("ALTER TABLE tickets RENAME COLUMN subject TO subject_renamed")
        try:
            broken = [
                await http.post(TICKETS, json=ticket_body(), headers=desk.headers()),
                await http.get(f"{TICKETS}/1", headers=desk.headers()),
            ]
        finally:
            await pool.execute("ALTER TABLE tickets RENAME COLUMN subject_renamed TO subject")
        for answer in broken:
            assert answer.status_code == 500, answer.text
            body = answer.json()
            assert body["error"] == "internal_error"
            assert set(body) <= {"error", "message", "requestId"}
            text = answer.text.lower()
            for leak in ("traceback", "select", "insert", "subject", "column", "asyncpg", "postgres", ".py", "line "):
                assert leak not in text, (leak, answer.text)
            request_id = answer.headers.get("x-request-id")
            assert request_id and body.get("requestId") in (None, request_id)
            log = server.log.read_text()
            cause = [line for line in log.splitlines() if request_id in line and "unhandled error" in line]
            assert cause, f"no log line names request {request_id}"
        assert "UndefinedColumnError" in log and "Traceback" in log  # the cause is in the log
        again = await http.post(TICKETS, json=ticket_body(), headers=desk.headers())
        assert again.status_code == 201 and again.json()["ticket"]["number"] == 2  # the failures took no number


# ---------------------------------------------------------------------------------------------------
# No cross-desk reach: a token of desk A against desk B, on every route, whatever Host or ids it sends.


def _hosts_of(desk: Desk) -> list[str]:
    sub = desk.subdomain
    return [f"{sub}.{BASE_DOMAIN}", f"{sub}.{BASE_DOMAIN}:8000", f"{sub.upper()}.{BASE_DOMAIN.upper()}",
            f"{sub}.{BASE_DOMAIN}.", f" {sub}.{BASE_DOMAIN} "]


ELSEWHERE = ["", "localhost", "127.0.0.1", "[::1]:8000", f"x.y.{BASE_DOMAIN}", f"{BASE_DOMAIN}.evil.example"]


async def test_a_token_of_one_desk_reaches_nothing_of_another_on_any_route(
    client: httpx.AsyncClient, pool: asyncpg.Pool, ids: Snowflake
) -> None:
    a, b = await make_desk(pool, ids), await make_desk(pool, ids)
    b_ticket = await client.post(TICKETS, json=ticket_body(subject="B's secret subject"), headers=b.headers())
    b_id = b_ticket.json()["ticket"]["id"]
    b_before = await _holdings(pool, b)

    async def call(route: str, host: str, body: Any = None) -> httpx.Response:
        headers = {"Host": host, "Authorization": f"Bearer {a.secret}"}
        if route == "create":
            return await client.post(TICKETS, json=body or ticket_body(), headers=headers)
        if route == "batch":
            return await client.post(f"{TICKETS}/batch", json={"tickets": [body or ticket_body()]}, headers=headers)
        return await client.get(route, headers=headers)

    routes = ["create", "batch", f"{TICKETS}/1", f"{TICKETS}/{b_id}", "/api/v1/departments", "/api/v1/ticket-types"]
    for route in routes:
        for host in _hosts_of(b) + ELSEWHERE:  # B's host in every spelling, or no desk at all
            assert_error(await call(route, host), 403, "token_desk_mismatch")
    # A's own host, with B's ids: nothing of B is found, used or shown.
    assert_error(await call(f"{TICKETS}/1", a.host), 404, "ticket_not_found")
    assert_error(await call(f"{TICKETS}/{b_id}", a.host), 404, "ticket_not_found")
    assert_error(await call("create", a.host, ticket_body(departmentId=b.default_department_id)),
                 400, "department_not_found")
    assert_error(await call("create", a.host, ticket_body(ticketTypeId=b.default_ticket_type_id)),
                 400, "ticket_type_not_found")
    batch = (await call("batch", a.host, ticket_body(departmentId=b.default_department_id))).json()
    assert [r["error"] for r in batch["results"]] == ["department_not_found"]
    for route in ("/api/v1/departments", "/api/v1/ticket-types"):
        listed = (await call(route, a.host)).text
        assert b.default_department_id not in listed and b.default_ticket_type_id not in listed
    assert await _holdings(pool, b) == b_before  # B holds exactly what it held
    assert "B's secret subject" not in json.dumps(await _holdings(pool, a))


async def _holdings(pool: asyncpg.Pool, desk: Desk) -> dict[str, Any]:
    row = await pool.fetchrow(
        """SELECT (SELECT count(*) FROM tickets WHERE desk_id = $1) AS tickets,
                  (SELECT count(*) FROM users WHERE desk_id = $1) AS users,
                  (SELECT count(*) FROM messages WHERE desk_id = $1) AS messages,
                  (SELECT last_number FROM desk_counters WHERE desk_id = $1) AS last_number,
                  (SELECT array_agg(subject) FROM tickets WHERE desk_id = $1) AS subjects""",
        desk.desk_id,
    )
    return dict(row)


def test_hosts_only_name_a_desk_with_exactly_one_valid_label() -> None:
    assert auth.desk_from_host("acme.localhost:8000", "localhost") == "acme"
    for host in ["a.acme.localhost", "acme.localhost.evil", "acme-.localhost", "-acme.localhost", "ac_me.localhost",
                 "acme.localhost@evil", "acme%2elocalhost", "localhost", "", None, "[::1]", "acme.localhostx"]:
        assert auth.desk_from_host(host, "localhost") is None, host
