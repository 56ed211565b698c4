"""The desk blocklist: whole addresses and exact domains, an indistinguishable 200, nothing written."""

import asyncpg
import httpx
import pytest

from app import admin
from app.ids import Snowflake
from tests.support.api import post, written
from tests.support.desks import Desk, make_desk

pytestmark = pytest.mark.each_create_form  # every test with `client`, against every form of the create

NOTHING = {"users": 0, "tickets": 0, "messages": 0, "events": 0, "last_number": 0}


async def block(pool: asyncpg.Pool, desk: Desk, *entries: str) -> None:
    async with pool.acquire() as conn:
        for entry in entries:
            await admin.add_blocklist(conn, desk.subdomain, entry)


def assert_accepted_not_created(response: httpx.Response) -> None:
    assert response.status_code == 200, response.text
    assert response.content == b'{"ok":true}'
    assert response.headers["content-type"] == "application/json"
    assert "location" not in response.headers


@pytest.mark.parametrize(
    ("entry", "email"),
    [("bob@spam.example", "bob@spam.example"), ("bob@spam.example", "  BOB@Spam.EXAMPLE "),
     ("Bob@SPAM.example", "bob@spam.example"), ("spam.example", "anyone@spam.example"),
     ("SPAM.Example", "Someone.Else@spam.EXAMPLE"), ("spam.example", "bob@spam.example")],
)
async def test_blocked_email_gets_ok_and_writes_nothing(
    client: httpx.AsyncClient, desk: Desk, pool: asyncpg.Pool, entry: str, email: str
) -> None:
    await block(pool, desk, entry)
    assert_accepted_not_created(await post(client, desk, email=email, name="Bob"))
    assert await written(pool, desk) == NOTHING
    good = await post(client, desk, email="alice@example.com")
    assert good.status_code == 201 and good.json()["ticket"]["number"] == 1


@pytest.mark.parametrize(
    ("entry", "email"),
    [("spam.example", "bob@sub.spam.example"), ("spam.example", "bob@notspam.example"),
     ("spam.example", "bob@spam.example.org"), ("sub.spam.example", "bob@spam.example"),
     ("bob@spam.example", "alice@spam.example"), ("bob@spam.example", "bob@sub.spam.example"),
     ("bob@spam.example", "bob.x@spam.example"), ("spam.example", "spam.example@example.com")],
)
async def test_only_the_exact_address_or_domain_is_blocked(
    client: httpx.AsyncClient, desk: Desk, pool: asyncpg.Pool, entry: str, email: str
) -> None:
    await block(pool, desk, entry)
    response = await post(client, desk, email=email)
    assert response.status_code == 201, response.text


async def test_blocked_answers_are_byte_identical(
    client: httpx.AsyncClient, desk: Desk, pool: asyncpg.Pool
) -> None:
    await block(pool, desk, "bob@spam.example", "junk.example")
    assert (await post(client, desk, email="known@junk.example.org")).status_code == 201
    await block(pool, desk, "known@junk.example.org")
    answers = [
        await post(client, desk, email="bob@spam.example"),  # whole address, never seen
        await post(client, desk, email="eve@junk.example", priority="urgent", name="Eve"),  # domain
        await post(client, desk, email="known@junk.example.org", subject="Again"),  # an existing requester
    ]
    for answer in answers:
        assert_accepted_not_created(answer)
    # Per-response headers (a request id, a date) differ on every answer, blocked or not; the rest may not.
    varying = {"x-request-id", "date"}
    shapes = {
        (a.status_code, a.content, tuple(sorted((k, "" if k in varying else v) for k, v in a.headers.items())))
        for a in answers
    }
    assert len(shapes) == 1
    counts = await written(pool, desk)
    assert (counts["users"], counts["tickets"], counts["last_number"]) == (1, 1, 1)


async def test_removing_an_entry_is_case_insensitive_and_unblocks(
    client: httpx.AsyncClient, desk: Desk, pool: asyncpg.Pool
) -> None:
    await block(pool, desk, "Spam.Example")
    assert_accepted_not_created(await post(client, desk, email="bob@spam.example"))
    async with pool.acquire() as conn:
        assert await admin.list_blocklist(conn, desk.subdomain) == ["spam.example"]
        await admin.remove_blocklist(conn, desk.subdomain, "SPAM.EXAMPLE")
    response = await post(client, desk, email="bob@spam.example")
    assert response.status_code == 201 and response.json()["ticket"]["number"] == 1


async def test_another_desks_blocklist_does_not_apply(
    client: httpx.AsyncClient, desk: Desk, pool: asyncpg.Pool, ids: Snowflake
) -> None:
    other = await make_desk(pool, ids)
    await block(pool, other, "spam.example", "bob@example.com")
    assert (await post(client, desk, email="bob@spam.example")).status_code == 201
    assert (await post(client, desk, email="bob@example.com")).status_code == 201


async def test_blocked_email_with_a_bad_body_is_still_invalid_body(
    client: httpx.AsyncClient, desk: Desk, pool: asyncpg.Pool
) -> None:
    await block(pool, desk, "spam.example")
    response = await post(client, desk, email="bob@spam.example", subject="", priority="meh")
    assert response.status_code == 400 and response.json()["error"] == "invalid_body"


async def test_blocked_email_with_a_private_department_and_type_still_gets_ok(
    client: httpx.AsyncClient, desk: Desk, pool: asyncpg.Pool, ids: Snowflake
) -> None:
    await block(pool, desk, "spam.example")
    async with pool.acquire() as conn:
        department = await admin.create_department(conn, ids, desk.subdomain, "Hidden", private=True, default=False)
        ticket_type = await admin.create_ticket_type(conn, ids, desk.subdomain, "Kind", default=False)
    response = await post(client, desk, email="bob@spam.example", departmentId=department.id,
                          ticketTypeId=ticket_type.id)
    assert_accepted_not_created(response)
    assert await written(pool, desk) == NOTHING


async def test_punycode_and_unicode_spellings_of_a_domain_are_one(
    client: httpx.AsyncClient, desk: Desk, pool: asyncpg.Pool
) -> None:
    await block(pool, desk, "xn--bcher-kva.de")
    for email in ("a@bücher.de", "b@xn--bcher-kva.de", "C@XN--BCHER-KVA.DE"):
        response = await post(client, desk, email=email)
        assert (response.status_code, response.json()) == (200, {"ok": True}), email
    created = await post(client, desk, email="d@xn--mnchen-3ya.de")
    assert created.status_code == 201
    assert created.json()["ticket"]["requester"] == {"email": "d@münchen.de"}
