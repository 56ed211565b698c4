"""POST /api/v1/tickets: the seed's success path, defaults, and what a ticket writes."""

import asyncpg
import httpx
import pytest

from app import ids as snowflake
from tests.support.desks import Desk, ticket_body

pytestmark = pytest.mark.each_create_form  # every test with `client`, against every form of the create


async def test_creates_ticket_with_seed_body_and_location(client: httpx.AsyncClient, desk: Desk) -> None:
    response = await client.post(
        "/api/v1/tickets", json=ticket_body(email="  Alice@Example.COM ", priority="high"), headers=desk.headers()
    )
    assert response.status_code == 201
    body = response.json()
    ticket = body["ticket"]
    assert set(body) == {"ticket"}
    assert set(ticket) == {"id", "number", "subject", "priority", "requester"}
    assert isinstance(ticket["id"], str) and ticket["id"].isdigit()
    assert ticket["number"] == 1
    assert ticket["subject"] == "Login broken on staging"
    assert ticket["priority"] == "high"
    assert ticket["requester"] == {"email": "alice@example.com"}
    assert response.headers["location"] == f"/api/v1/tickets/{ticket['id']}"
    assert response.headers["content-type"] == "application/json"


async def test_ticket_writes_user_ticket_message_and_event(
    client: httpx.AsyncClient, desk: Desk, pool: asyncpg.Pool
) -> None:
    response = await client.post(
        "/api/v1/tickets", json=ticket_body(body="  verbatim\n body  ", subject="  Padded  "), headers=desk.headers()
    )
    ticket_id = int(response.json()["ticket"]["id"])
    row = await pool.fetchrow(
        """SELECT t.*, u.email, u.name AS user_name FROM tickets t
           JOIN users u ON u.desk_id = t.desk_id AND u.user_id = t.requester_id
           WHERE t.desk_id = $1 AND t.ticket_id = $2""",
        desk.desk_id, ticket_id,
    )
    assert row["status"] == "open" and row["channel"] == "api" and row["subject"] == "Padded"
    assert row["priority"] == "normal"
    assert str(row["department_id"]) == desk.default_department_id
    assert str(row["ticket_type_id"]) == desk.default_ticket_type_id
    assert row["user_name"] == "alice"  # the local part, when no name is given
    messages = await pool.fetch("SELECT * FROM messages WHERE desk_id = $1 AND ticket_id = $2", desk.desk_id, ticket_id)
    assert [(m["body"], m["public"], m["author_id"]) for m in messages] == [
        ("  verbatim\n body  ", True, row["requester_id"])
    ]
    events = await pool.fetch(
        "SELECT * FROM ticket_events WHERE desk_id = $1 AND ticket_id = $2", desk.desk_id, ticket_id
    )
    assert [(e["kind"], e["channel"], e["token_id"]) for e in events] == [
        ("ticket.created", "API Via Test Suite", int(desk.token_id))
    ]


# A worker number's lease in this database (app/ids.py): its advisory lock held, and its reservation.
_LEASE = """
SELECT w.holder, w.reserved_until, EXISTS (
    SELECT 1 FROM pg_locks l JOIN pg_database d ON d.oid = l.database
    WHERE d.datname = current_database() AND l.locktype = 'advisory' AND l.granted
      AND l.classid = 18500 AND l.objid = $1::int::oid AND l.objsubid = 2  -- app/ids.py's key (0x4844, worker)
) AS locked
FROM snowflake_workers w WHERE w.worker = $1::int
"""


async def test_ids_are_snowflakes_of_now(client: httpx.AsyncClient, desk: Desk, pool: asyncpg.Pool) -> None:
    response = await client.post("/api/v1/tickets", json=ticket_body(), headers=desk.headers())
    unix_ms, worker, _ = snowflake.decode(int(response.json()["ticket"]["id"]))
    import time

    assert abs(unix_ms - time.time() * 1000) < 60_000
    # The id names the worker number the app leased: one held right now, whose committed reservation
    # reaches the id's millisecond (a wrong shift or mask gives a number nobody holds, or out of it).
    lease = await pool.fetchrow(_LEASE, worker)
    assert lease is not None and lease["locked"] and lease["holder"] is not None, (worker, lease)
    assert unix_ms - snowflake.EPOCH_MS <= lease["reserved_until"], (unix_ms, lease)


def test_seed_example_id_decodes_to_2026_04_05_worker_744() -> None:
    from datetime import UTC, datetime

    unix_ms, worker, _ = snowflake.decode(1490375649312800768)
    assert datetime.fromtimestamp(unix_ms / 1000, UTC).date().isoformat() == "2026-04-05"
    assert worker == 744
