"""POST /api/v1/tickets/batch: one result per item, consecutive numbers, failures write nothing."""

import asyncio
from typing import Any

import asyncpg
import httpx
import pytest

from app import admin
from app.ids import Snowflake
from tests.support.api import written
from tests.support.desks import Desk, ticket_body

pytestmark = pytest.mark.each_create_form  # every test with `client`, against every form of the create

BATCH = "/api/v1/tickets/batch"


async def test_mixed_100_item_batch_reports_every_item_and_numbers_valid_ones_consecutively(
    client: httpx.AsyncClient, desk: Desk, pool: asyncpg.Pool, ids: Snowflake
) -> None:
    async with pool.acquire() as conn:
        await admin.add_blocklist(conn, desk.subdomain, "spam.example")
    items: list[Any] = []
    expected: list[int] = []
    for i in range(100):
        if i % 10 == 3:
            items.append(ticket_body(email="not an email", subject=""))
            expected.append(400)
        elif i % 10 == 5:
            items.append(ticket_body(email=f"bot{i}@SPAM.example"))
            expected.append(200)
        elif i % 10 == 7:
            items.append(ticket_body(departmentId="12345"))
            expected.append(400)
        elif i == 99:
            items.append("not an object")
            expected.append(400)
        else:
            items.append(ticket_body(email=f"user{i % 4}@example.com", subject=f"Item {i}"))
            expected.append(201)
    response = await client.post(BATCH, json={"tickets": items}, headers=desk.headers())
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["status"] for r in results] == expected
    created = [r["ticket"] for r in results if r["status"] == 201]
    assert [t["number"] for t in created] == list(range(1, len(created) + 1))
    assert [t["subject"] for t in created] == [f"Item {i}" for i, s in enumerate(expected) if s == 201]
    assert results[3]["error"] == "invalid_body"
    assert {i["path"][0] for i in results[3]["issues"]} == {"email", "subject"}
    assert results[5] == {"status": 200, "ok": True}
    assert results[7]["error"] == "department_not_found" and "issues" not in results[7]
    assert results[99]["issues"] == [{"path": [], "code": "not_an_object", "message": "Expected an object."}]
    # Four distinct requesters, each created once though each appears in many items.
    assert await written(pool, desk) == {
        "users": 4, "tickets": len(created), "messages": len(created), "events": len(created),
        "last_number": len(created),
    }


async def test_batch_ticket_is_the_single_create_ticket(client: httpx.AsyncClient, desk: Desk) -> None:
    response = await client.post(
        BATCH, json={"tickets": [ticket_body(email="Ann@Example.com", priority="urgent")]}, headers=desk.headers()
    )
    (result,) = response.json()["results"]
    ticket = result["ticket"]
    assert set(ticket) == {"id", "number", "subject", "priority", "requester"}
    assert ticket["requester"] == {"email": "ann@example.com"} and ticket["priority"] == "urgent"
    read = await client.get(f"/api/v1/tickets/{ticket['id']}", headers=desk.headers())
    assert read.json()["ticket"]["number"] == ticket["number"]
    assert read.json()["ticket"]["events"][0]["channel"] == "API Via Test Suite"


@pytest.mark.parametrize(
    ("body", "code", "path"),
    [
        ({"tickets": []}, "too_short", ["tickets"]),
        ({"tickets": [ticket_body()] * 101}, "too_long", ["tickets"]),
        ({}, "required", ["tickets"]),
        ({"tickets": {"email": "a@example.com"}}, "invalid_type", ["tickets"]),
        ([ticket_body()], "not_an_object", []),
    ],
)
async def test_wrong_envelope_fails_whole_request_and_writes_nothing(
    client: httpx.AsyncClient, desk: Desk, pool: asyncpg.Pool, body: Any, code: str, path: list[str]
) -> None:
    response = await client.post(BATCH, json=body, headers=desk.headers())
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_body"
    assert [(i["code"], i["path"]) for i in response.json()["issues"]] == [(code, path)]
    assert (await written(pool, desk))["tickets"] == 0


async def test_malformed_batch_json_is_invalid_body(client: httpx.AsyncClient, desk: Desk) -> None:
    headers = desk.headers(**{"Content-Type": "application/json"})
    response = await client.post(BATCH, content=b'{"tickets": [', headers=headers)
    assert response.status_code == 400
    assert response.json()["issues"][0]["code"] == "malformed_json"


async def test_lone_surrogate_in_one_item_fails_only_that_item(client: httpx.AsyncClient, desk: Desk) -> None:
    content = b'{"tickets": [{"email": "a@example.com", "subject": "\\ud800", "body": "x"},' \
        b' {"email": "b@example.com", "subject": "fine", "body": "x"}]}'
    response = await client.post(BATCH, content=content, headers=desk.headers(**{"Content-Type": "application/json"}))
    results = response.json()["results"]
    assert [(i["path"], i["code"]) for i in results[0]["issues"]] == [(["subject"], "invalid_character")]
    assert results[1]["status"] == 201 and results[1]["ticket"]["number"] == 1


async def test_batch_needs_create_scope_and_desk_token(
    client: httpx.AsyncClient, desk: Desk, pool: asyncpg.Pool, ids: Snowflake
) -> None:
    async with pool.acquire() as conn:
        reader = await admin.create_token(conn, ids, desk.subdomain, "Reader", ["tickets:read"])
    body = {"tickets": [ticket_body()]}
    assert (await client.post(BATCH, json=body, headers=desk.headers(reader.secret))).status_code == 403
    assert (await client.post(BATCH, json=body, headers={"Host": desk.host})).status_code == 401
    assert (await written(pool, desk))["tickets"] == 0


async def test_concurrent_batches_get_disjoint_consecutive_runs(
    client: httpx.AsyncClient, desk: Desk, pool: asyncpg.Pool
) -> None:
    async def send(n: int) -> list[int]:
        items = [ticket_body(email=f"shared{i % 3}@example.com", subject=f"{n}-{i}") for i in range(20)]
        response = await client.post(BATCH, json={"tickets": items}, headers=desk.headers())
        return [r["ticket"]["number"] for r in response.json()["results"]]

    runs = await asyncio.gather(*(send(n) for n in range(10)))
    for run in runs:
        assert run == list(range(run[0], run[0] + 20))
    assert sorted(n for run in runs for n in run) == list(range(1, 201))
    assert (await written(pool, desk))["users"] == 3
