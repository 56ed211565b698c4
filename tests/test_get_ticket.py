"""GET /api/v1/tickets/{ref}: the whole ticket by number or by id, only on its own desk."""

import re
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import pytest

from app.ids import Snowflake
from tests.support.api import TICKETS, assert_error, new_token, post
from tests.support.desks import Desk, make_desk

RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|\+00:00)")


def parse_utc(value: str) -> datetime:
    assert RFC3339_UTC.fullmatch(value), value
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    assert parsed.utcoffset() == timedelta(0)
    return parsed


async def test_ticket_by_number_and_by_id_is_the_whole_ticket(client: httpx.AsyncClient, desk: Desk) -> None:
    body_text = "  Line one\n\tline two  " + "\U0001f600"
    created = await post(
        client, desk, email=" Grace@Example.com ", name="Grace Hopper", subject=" Printer on fire ",
        body=body_text, priority="urgent",
    )
    assert created.status_code == 201
    ticket_id = created.json()["ticket"]["id"]
    by_number = await client.get(f"{TICKETS}/1", headers=desk.headers())
    by_id = await client.get(f"{TICKETS}/{ticket_id}", headers=desk.headers())
    by_location = await client.get(created.headers["location"], headers=desk.headers())
    assert by_number.status_code == by_id.status_code == by_location.status_code == 200
    assert by_number.headers["content-type"] == "application/json"
    assert by_number.json() == by_id.json() == by_location.json()

    ticket = by_number.json()["ticket"]
    assert set(by_number.json()) == {"ticket"}
    assert set(ticket) == {"id", "number", "subject", "priority", "status", "channel", "createdAt", "requester",
                           "department", "ticketType", "messages", "events"}
    assert (ticket["id"], ticket["number"], ticket["subject"], ticket["priority"]) == (
        ticket_id, 1, "Printer on fire", "urgent"
    )
    assert (ticket["status"], ticket["channel"]) == ("open", "api")
    requester = ticket["requester"]
    assert set(requester) == {"id", "email", "name"}
    assert (requester["email"], requester["name"]) == ("grace@example.com", "Grace Hopper")
    assert isinstance(requester["id"], str) and requester["id"].isdigit()
    assert ticket["department"] == {"id": desk.default_department_id, "name": "General"}
    assert ticket["ticketType"] == {"id": desk.default_ticket_type_id, "name": "General"}

    [message] = ticket["messages"]
    assert set(message) == {"id", "body", "public", "authorId", "createdAt"}
    assert (message["body"], message["public"], message["authorId"]) == (body_text, True, requester["id"])
    assert isinstance(message["id"], str) and message["id"].isdigit()
    [event] = ticket["events"]
    assert set(event) == {"id", "kind", "channel", "createdAt"}
    assert (event["kind"], event["channel"]) == ("ticket.created", "API Via Test Suite")
    assert isinstance(event["id"], str) and event["id"].isdigit()

    now = datetime.now(UTC)
    for stamp in (ticket["createdAt"], message["createdAt"], event["createdAt"]):
        assert abs(parse_utc(stamp) - now) < timedelta(minutes=5)


async def test_numbers_pick_the_desks_own_ticket(client: httpx.AsyncClient, desk: Desk) -> None:
    subjects = ["first", "second", "third"]
    for subject in subjects:
        assert (await post(client, desk, subject=subject)).status_code == 201
    for number, subject in enumerate(subjects, 1):
        for ref in (str(number), str(number).zfill(10)):
            response = await client.get(f"{TICKETS}/{ref}", headers=desk.headers())
            assert response.status_code == 200, ref
            assert (response.json()["ticket"]["number"], response.json()["ticket"]["subject"]) == (number, subject)


async def test_another_desks_ticket_is_not_found(
    client: httpx.AsyncClient, desk: Desk, pool: asyncpg.Pool, ids: Snowflake
) -> None:
    other = await make_desk(pool, ids)
    theirs = await post(client, other)
    assert theirs.status_code == 201
    for ref in ("1", theirs.json()["ticket"]["id"]):
        assert_error(await client.get(f"{TICKETS}/{ref}", headers=desk.headers()), 404, "ticket_not_found")
    assert (await client.get(f"{TICKETS}/1", headers=other.headers())).status_code == 200


@pytest.mark.parametrize(
    "ref",
    ["0", "2", "9999999999", "00000000001", "12345678901", "9223372036854775807", "9223372036854775808",
     "99999999999999999999999999", "abc", "-1", "1.0", "1e3", "+1", "%201", "1%20", "\u0661", "%EF%BC%91",
     "0x1", "batch", "1%00"],
)
async def test_unknown_or_non_numeric_refs_are_ticket_not_found(
    client: httpx.AsyncClient, desk: Desk, ref: str
) -> None:
    assert (await post(client, desk)).status_code == 201  # the desk has ticket 1, and only it
    assert_error(await client.get(f"{TICKETS}/{ref}", headers=desk.headers()), 404, "ticket_not_found")


async def test_an_eleven_digit_ref_is_an_id_not_a_number(client: httpx.AsyncClient, desk: Desk) -> None:
    assert (await post(client, desk)).status_code == 201
    # "00000000001" has 11 digits, so it is read as the id 1, which no ticket has.
    assert_error(await client.get(f"{TICKETS}/00000000001", headers=desk.headers()), 404, "ticket_not_found")
    assert (await client.get(f"{TICKETS}/0000000001", headers=desk.headers())).status_code == 200


async def test_a_read_only_token_can_read_and_a_create_only_token_cannot(
    client: httpx.AsyncClient, desk: Desk, pool: asyncpg.Pool, ids: Snowflake
) -> None:
    assert (await post(client, desk)).status_code == 201
    reader = await new_token(pool, ids, desk, "tickets:read")
    creator = await new_token(pool, ids, desk, "tickets:create")
    assert (await client.get(f"{TICKETS}/1", headers=desk.headers(reader))).status_code == 200
    assert_error(await client.get(f"{TICKETS}/1", headers=desk.headers(creator)), 403, "insufficient_scope")
    assert_error(await client.get(f"{TICKETS}/999", headers=desk.headers(creator)), 403, "insufficient_scope")


async def test_the_event_names_the_token_that_created_the_ticket(
    client: httpx.AsyncClient, desk: Desk, pool: asyncpg.Pool, ids: Snowflake
) -> None:
    importer = await new_token(pool, ids, desk, "tickets:create", name="Zendesk Import")
    created = await client.post(TICKETS, json={"email": "h@example.com", "subject": "s", "body": "b"},
                                headers=desk.headers(importer))
    assert created.status_code == 201
    ticket = (await client.get(created.headers["location"], headers=desk.headers())).json()["ticket"]
    assert [e["channel"] for e in ticket["events"]] == ["API Via Zendesk Import"]
    assert ticket["channel"] == "api"
