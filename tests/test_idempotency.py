"""Idempotency-Key: a retry replays the stored outcome exactly and writes nothing new."""

import asyncio
import json

import asyncpg
import httpx
import pytest

from app import admin, idempotency
from app.ids import Snowflake
from tests.support.desks import Desk, ticket_body

pytestmark = pytest.mark.each_create_form  # every test with `client`, against every form of the create

TICKETS = "/api/v1/tickets"
BATCH = "/api/v1/tickets/batch"


def keyed(desk: Desk, key: str, secret: str | None = None) -> dict[str, str]:
    return desk.headers(secret, **{"Idempotency-Key": key, "Content-Type": "application/json"})


async def ticket_count(pool: asyncpg.Pool, desk: Desk) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM tickets WHERE desk_id = $1", desk.desk_id))


async def test_same_key_same_body_replays_status_body_and_location(
    client: httpx.AsyncClient, desk: Desk, pool: asyncpg.Pool
) -> None:
    body = json.dumps(ticket_body()).encode()
    first = await client.post(TICKETS, content=body, headers=keyed(desk, "order-1"))
    again = await client.post(TICKETS, content=body, headers=keyed(desk, "order-1"))
    assert first.status_code == again.status_code == 201
    assert again.content == first.content
    assert again.headers["location"] == first.headers["location"]
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert await ticket_count(pool, desk) == 1
    nxt = await client.post(TICKETS, content=body, headers=keyed(desk, "order-2"))
    assert nxt.json()["ticket"]["number"] == 2


async def test_same_key_other_body_is_422_and_writes_nothing(
    client: httpx.AsyncClient, desk: Desk, pool: asyncpg.Pool
) -> None:
    await client.post(TICKETS, json=ticket_body(), headers=keyed(desk, "k"))
    response = await client.post(TICKETS, json=ticket_body(subject="Other"), headers=keyed(desk, "k"))
    assert response.status_code == 422
    assert response.json()["error"] == "idempotency_key_reused"
    same_key_batch = await client.post(BATCH, json={"tickets": [ticket_body()]}, headers=keyed(desk, "k"))
    assert same_key_batch.status_code == 422
    assert await ticket_count(pool, desk) == 1


async def test_keys_are_scoped_to_the_token(
    client: httpx.AsyncClient, desk: Desk, pool: asyncpg.Pool, ids: Snowflake
) -> None:
    async with pool.acquire() as conn:
        other = await admin.create_token(conn, ids, desk.subdomain, "Other", ["tickets:create"])
    a = await client.post(TICKETS, json=ticket_body(), headers=keyed(desk, "shared-key"))
    b = await client.post(TICKETS, json=ticket_body(), headers=keyed(desk, "shared-key", other.secret))
    assert (a.json()["ticket"]["number"], b.json()["ticket"]["number"]) == (1, 2)
    assert "idempotent-replayed" not in b.headers


@pytest.mark.parametrize("outcome", ["blocked", "department_not_found", "ticket_type_not_found"])
async def test_blocked_and_not_found_outcomes_are_stored_and_replayed(
    client: httpx.AsyncClient, desk: Desk, pool: asyncpg.Pool, outcome: str
) -> None:
    async with pool.acquire() as conn:
        await admin.add_blocklist(conn, desk.subdomain, "blocked@example.com")
    fields = {
        "blocked": {"email": "blocked@example.com"},
        "department_not_found": {"departmentId": "42"},
        "ticket_type_not_found": {"ticketTypeId": "42"},
    }[outcome]
    body = json.dumps(ticket_body(**fields)).encode()
    first = await client.post(TICKETS, content=body, headers=keyed(desk, "x"))
    if outcome == "blocked":
        # Unblocking must not change the replayed answer: the outcome is stored, not recomputed.
        async with pool.acquire() as conn:
            await admin.remove_blocklist(conn, desk.subdomain, "blocked@example.com")
    again = await client.post(TICKETS, content=body, headers=keyed(desk, "x"))
    assert first.status_code == again.status_code == (200 if outcome == "blocked" else 400)
    assert again.content == first.content
    assert again.headers["idempotent-replayed"] == "true"
    assert await ticket_count(pool, desk) == 0
    stored = await pool.fetchval("SELECT outcomes FROM idempotency_keys WHERE desk_id = $1", desk.desk_id)
    assert stored == [outcome]


async def test_invalid_body_stores_nothing(client: httpx.AsyncClient, desk: Desk, pool: asyncpg.Pool) -> None:
    bad = await client.post(TICKETS, json=ticket_body(email="nope"), headers=keyed(desk, "retry-me"))
    assert bad.status_code == 400
    assert await pool.fetchval("SELECT count(*) FROM idempotency_keys WHERE desk_id = $1", desk.desk_id) == 0
    good = await client.post(TICKETS, json=ticket_body(), headers=keyed(desk, "retry-me"))
    assert good.status_code == 201 and "idempotent-replayed" not in good.headers


@pytest.mark.parametrize("key", ["", "x" * 256, "has space", "tab\there", "caf\u00e9"])
async def test_malformed_key_is_invalid_header(client: httpx.AsyncClient, desk: Desk, key: str) -> None:
    headers = [(k, v) for k, v in desk.headers().items()] + [("Idempotency-Key", key)]
    raw_headers = [(k.encode(), v.encode("utf-8")) for k, v in headers]
    response = await client.post(TICKETS, json=ticket_body(), headers=raw_headers)
    assert response.status_code == 400
    assert response.json()["issues"] == [
        {
            "path": ["Idempotency-Key"],
            "code": "invalid_header",
            "message": "Idempotency-Key must be 1 to 255 visible ASCII characters.",
        }
    ]


async def test_longest_key_is_accepted(client: httpx.AsyncClient, desk: Desk) -> None:
    response = await client.post(TICKETS, json=ticket_body(), headers=keyed(desk, "~" * 255))
    assert response.status_code == 201


async def test_concurrent_requests_with_one_key_make_one_ticket_and_all_replay_it(
    client: httpx.AsyncClient, desk: Desk, pool: asyncpg.Pool
) -> None:
    body = json.dumps(ticket_body(email="new-person@example.com")).encode()
    responses = await asyncio.gather(
        *(client.post(TICKETS, content=body, headers=keyed(desk, "burst")) for _ in range(20))
    )
    assert {r.status_code for r in responses} == {201}
    assert len({r.content for r in responses}) == 1
    assert sum("idempotent-replayed" in r.headers for r in responses) == 19
    assert await ticket_count(pool, desk) == 1
    assert await pool.fetchval("SELECT count(*) FROM users WHERE desk_id = $1", desk.desk_id) == 1


@pytest.mark.parametrize(
    ("items", "created"),
    [
        ([ticket_body(subject=f"s{i}") for i in range(5)] + [ticket_body(email="bad")], 5),
        ([ticket_body(email="bad"), ticket_body(subject="")], 0),  # only invalid items: the key still stores
    ],
)
async def test_batch_with_key_replays_every_result(
    client: httpx.AsyncClient, desk: Desk, pool: asyncpg.Pool, items: list[dict[str, object]], created: int
) -> None:
    body = json.dumps({"tickets": items}).encode()
    first = await client.post(BATCH, content=body, headers=keyed(desk, "import-7"))
    again = await client.post(BATCH, content=body, headers=keyed(desk, "import-7"))
    assert first.status_code == again.status_code == 200
    assert [r["status"] for r in first.json()["results"]] == [201] * created + [400] * (len(items) - created)
    assert again.content == first.content
    assert again.headers["idempotent-replayed"] == "true"
    assert await ticket_count(pool, desk) == created


async def test_expired_keys_are_purged_and_fresh_ones_kept(
    client: httpx.AsyncClient, desk: Desk, pool: asyncpg.Pool
) -> None:
    await client.post(TICKETS, json=ticket_body(), headers=keyed(desk, "old"))
    await client.post(TICKETS, json=ticket_body(), headers=keyed(desk, "new"))
    await pool.execute(
        "UPDATE idempotency_keys SET created_at = now() - interval '25 hours' WHERE desk_id = $1 AND idem_key = 'old'",
        desk.desk_id,
    )
    async with pool.acquire() as conn:
        assert await idempotency.purge_expired(conn, 24 * 3600) >= 1
    left = await pool.fetch("SELECT idem_key FROM idempotency_keys WHERE desk_id = $1", desk.desk_id)
    assert [r[0] for r in left] == ["new"]
    # Once purged, the key is new again.
    response = await client.post(TICKETS, json=ticket_body(), headers=keyed(desk, "old"))
    assert response.status_code == 201 and "idempotent-replayed" not in response.headers
