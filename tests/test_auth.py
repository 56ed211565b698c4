"""Who may call: bearer tokens, the Host that names the desk, scopes, and the contract's check order."""

import asyncio

import asyncpg
import httpx
import pytest

from app import admin
from app.ids import Snowflake
from tests.support.api import TICKETS, assert_error, issues, new_token, written
from tests.support.desks import Desk, make_desk, ticket_body


def assert_unauthenticated(response: httpx.Response) -> None:
    assert_error(response, 401, "unauthenticated")
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "Token {secret}", "{secret}", "Bearer{secret}",
     "Bearer hd_", "Bearer hd_short", "Bearer {secret}x", "Bearer {secret_upper}", "Bearer hd_{digits}",
     "Bearer {secret} extra", "Bearer " + "hd_" + "a" * 300],
)
async def test_missing_malformed_or_unknown_tokens_are_unauthenticated(
    client: httpx.AsyncClient, desk: Desk, authorization: str | None
) -> None:
    headers = {"Host": desk.host}
    if authorization is not None:
        headers["Authorization"] = authorization.format(
            secret=desk.secret, secret_upper=desk.secret.upper(), digits="1" * 43
        )
    assert_unauthenticated(await client.post(TICKETS, json=ticket_body(), headers=headers))
    assert_unauthenticated(await client.get(f"{TICKETS}/1", headers=headers))
    assert_unauthenticated(await client.get("/api/v1/departments", headers=headers))
    assert_unauthenticated(await client.get("/api/v1/ticket-types", headers=headers))


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
async def test_bearer_scheme_is_case_insensitive(client: httpx.AsyncClient, desk: Desk, scheme: str) -> None:
    headers = {"Host": desk.host, "Authorization": f"{scheme} {desk.secret}"}
    assert (await client.post(TICKETS, json=ticket_body(), headers=headers)).status_code == 201


async def test_revoked_token_is_refused_once_the_cache_expires(
    client: httpx.AsyncClient, desk: Desk, pool: asyncpg.Pool, ids: Snowflake
) -> None:
    async with pool.acquire() as conn:
        token = await admin.create_token(conn, ids, desk.subdomain, "Doomed", ["tickets:create", "tickets:read"])
    assert token.secret is not None
    headers = desk.headers(token.secret)
    assert (await client.post(TICKETS, json=ticket_body(), headers=headers)).status_code == 201
    async with pool.acquire() as conn:
        await admin.revoke_token(conn, desk.subdomain, int(token.id))
    await asyncio.sleep(1.2)  # the token cache keeps an answer for at most 1 s in tests
    assert_unauthenticated(await client.post(TICKETS, json=ticket_body(), headers=headers))
    assert_unauthenticated(await client.get(f"{TICKETS}/1", headers=headers))
    assert_unauthenticated(await client.get("/api/v1/departments", headers=headers))
    assert (await client.post(TICKETS, json=ticket_body(), headers=desk.headers())).status_code == 201
    assert (await written(pool, desk))["tickets"] == 2


async def test_another_desks_host_is_token_desk_mismatch(
    client: httpx.AsyncClient, desk: Desk, pool: asyncpg.Pool, ids: Snowflake
) -> None:
    other = await make_desk(pool, ids)
    headers = {"Host": other.host, "Authorization": f"Bearer {desk.secret}"}
    assert_error(await client.post(TICKETS, json=ticket_body(), headers=headers), 403, "token_desk_mismatch")
    assert_error(await client.get(f"{TICKETS}/1", headers=headers), 403, "token_desk_mismatch")
    assert_error(await client.get("/api/v1/departments", headers=headers), 403, "token_desk_mismatch")
    assert_error(await client.get("/api/v1/ticket-types", headers=headers), 403, "token_desk_mismatch")
    assert (await written(pool, other))["tickets"] == 0


@pytest.mark.parametrize(
    "host",
    ["localhost", "testserver", "127.0.0.1", "[::1]:8000", "a.{sub}.localhost", "{sub}.b.localhost",
     "{sub}.localhost.evil.example", "{sub}.example.com", "{sub}localhost", "x{sub}.localhost", "{sub}",
     "-{sub}.localhost", ".localhost", "{sub}..localhost", "{sub}.localhost:8000:1"],
)
async def test_a_host_naming_no_desk_or_another_is_token_desk_mismatch(
    client: httpx.AsyncClient, desk: Desk, host: str
) -> None:
    headers = {"Host": host.format(sub=desk.subdomain), "Authorization": f"Bearer {desk.secret}"}
    assert_error(await client.post(TICKETS, json=ticket_body(), headers=headers), 403, "token_desk_mismatch")


@pytest.mark.parametrize("host", ["{sub}.localhost", "{sub}.localhost:8000", "{sub}.localhost:443", "{SUB}.LOCALHOST"])
async def test_the_desk_host_may_carry_a_port_and_any_case(client: httpx.AsyncClient, desk: Desk, host: str) -> None:
    host = host.format(sub=desk.subdomain, SUB=desk.subdomain.upper())
    headers = {"Host": host, "Authorization": f"Bearer {desk.secret}"}
    assert (await client.post(TICKETS, json=ticket_body(), headers=headers)).status_code == 201
    assert (await client.get("/api/v1/departments", headers=headers)).status_code == 200


async def test_a_token_without_tickets_create_cannot_post(
    client: httpx.AsyncClient, desk: Desk, pool: asyncpg.Pool, ids: Snowflake
) -> None:
    reader = await new_token(pool, ids, desk, "tickets:read")
    response = await client.post(TICKETS, json=ticket_body(), headers=desk.headers(reader))
    assert_error(response, 403, "insufficient_scope")
    assert "tickets:create" in response.json()["message"]
    assert await written(pool, desk) == {"users": 0, "tickets": 0, "messages": 0, "events": 0, "last_number": 0}


async def test_a_token_without_tickets_read_cannot_get_a_ticket(
    client: httpx.AsyncClient, desk: Desk, pool: asyncpg.Pool, ids: Snowflake
) -> None:
    creator = await new_token(pool, ids, desk, "tickets:create")
    created = await client.post(TICKETS, json=ticket_body(), headers=desk.headers(creator))
    assert created.status_code == 201
    response = await client.get(created.headers["location"], headers=desk.headers(creator))
    assert_error(response, 403, "insufficient_scope")
    assert "tickets:read" in response.json()["message"]


async def test_check_order_on_post(
    client: httpx.AsyncClient, desk: Desk, pool: asyncpg.Pool, ids: Snowflake
) -> None:
    """401 -> 403 token_desk_mismatch -> 403 insufficient_scope -> 400 invalid_body -> 400 not found
    -> blocklist 200 -> 201: each step is reached only when every earlier check passes."""
    reader = await new_token(pool, ids, desk, "tickets:read")
    async with pool.acquire() as conn:
        await admin.add_blocklist(conn, desk.subdomain, "spam.example")
    bad_body = ticket_body(email="nope", subject="", departmentId="123", ticketTypeId="456")
    wrong_host = {"Host": "a.b.localhost"}

    no_token = await client.post(TICKETS, json=bad_body, headers=wrong_host)
    assert_unauthenticated(no_token)
    mismatch = await client.post(TICKETS, json=bad_body, headers={**desk.headers(reader), **wrong_host})
    assert_error(mismatch, 403, "token_desk_mismatch")
    scope = await client.post(TICKETS, json=bad_body, headers=desk.headers(reader))
    assert_error(scope, 403, "insufficient_scope")
    body = await client.post(TICKETS, json=bad_body, headers=desk.headers())
    assert issues(body) == [(["email"], "invalid_email"), (["subject"], "too_short")]
    blocked_unknown = ticket_body(email="bob@spam.example", departmentId="123", ticketTypeId="456")
    department = await client.post(TICKETS, json=blocked_unknown, headers=desk.headers())
    assert_error(department, 400, "department_not_found")
    blocked_unknown["departmentId"] = desk.default_department_id
    ticket_type = await client.post(TICKETS, json=blocked_unknown, headers=desk.headers())
    assert_error(ticket_type, 400, "ticket_type_not_found")
    blocked_unknown["ticketTypeId"] = desk.default_ticket_type_id
    blocked = await client.post(TICKETS, json=blocked_unknown, headers=desk.headers())
    assert (blocked.status_code, blocked.json()) == (200, {"ok": True})
    created = await client.post(TICKETS, json=ticket_body(), headers=desk.headers())
    assert created.status_code == 201 and created.json()["ticket"]["number"] == 1


async def test_check_order_on_get(
    client: httpx.AsyncClient, desk: Desk, pool: asyncpg.Pool, ids: Snowflake
) -> None:
    creator = await new_token(pool, ids, desk, "tickets:create")
    path = f"{TICKETS}/not-a-ref"
    assert_unauthenticated(await client.get(path, headers={"Host": "localhost"}))
    assert_error(await client.get(path, headers={**desk.headers(creator), "Host": "localhost"}), 403,
                 "token_desk_mismatch")
    assert_error(await client.get(path, headers=desk.headers(creator)), 403, "insufficient_scope")
    assert_error(await client.get(path, headers=desk.headers()), 404, "ticket_not_found")


async def test_auth_errors_have_the_contract_shape(client: httpx.AsyncClient, desk: Desk) -> None:
    response = await client.post(TICKETS, json=ticket_body(), headers={"Host": desk.host})
    assert response.headers["content-type"] == "application/json"
    assert set(response.json()) == {"error", "message"}
    assert desk.secret not in response.text
