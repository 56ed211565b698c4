"""Helpers shared by the HTTP API tests: posting tickets, reading issues, counting what a desk holds."""

import json
from typing import Any

import asyncpg
import httpx

from app import admin
from app.ids import Snowflake
from tests.support.desks import Desk, ticket_body

TICKETS = "/api/v1/tickets"


async def post(client: httpx.AsyncClient, desk: Desk, **fields: Any) -> httpx.Response:
    """POST a ticket_body(**fields) to the desk with its full-scope token."""
    return await client.post(TICKETS, json=ticket_body(**fields), headers=desk.headers())


async def post_raw(
    client: httpx.AsyncClient, desk: Desk, content: bytes | str, content_type: str | None = "application/json"
) -> httpx.Response:
    """POST bytes exactly as given (for escapes and malformed JSON the json= argument cannot send)."""
    headers = desk.headers()
    if content_type is not None:
        headers["Content-Type"] = content_type
    data = content.encode() if isinstance(content, str) else content
    return await client.post(TICKETS, content=data, headers=headers)


def raw_body(**fields: Any) -> str:
    """A ticket body as JSON text; string values given as `RAW:<json>` are inserted verbatim."""
    parts = []
    for key, value in ticket_body(**fields).items():
        if isinstance(value, str) and value.startswith("RAW:"):
            parts.append(f"{json.dumps(key)}: {value[4:]}")
        else:
            parts.append(f"{json.dumps(key)}: {json.dumps(value)}")
    return "{" + ", ".join(parts) + "}"


def issues(response: httpx.Response) -> list[tuple[list[Any], str]]:
    """The (path, code) pairs of a 400 invalid_body answer, checking its shape on the way."""
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error"] == "invalid_body"
    assert isinstance(body["message"], str) and body["message"]
    assert set(body) == {"error", "message", "issues"}
    for issue in body["issues"]:
        assert set(issue) == {"path", "code", "message"}
        assert isinstance(issue["message"], str) and issue["message"]
    return [(issue["path"], issue["code"]) for issue in body["issues"]]


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    """A contract error: the status and exactly {"error", "message"} in JSON."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error", "message"}, body
    assert body["error"] == code
    assert isinstance(body["message"], str) and body["message"]


async def new_token(pool: asyncpg.Pool, ids: Snowflake, desk: Desk, *scopes: str, name: str = "Extra") -> str:
    """Another token on the desk with exactly these scopes; returns its secret."""
    async with pool.acquire() as conn:
        token = await admin.create_token(conn, ids, desk.subdomain, name, list(scopes))
    assert token.secret is not None
    return token.secret


async def written(pool: asyncpg.Pool, desk: Desk) -> dict[str, int]:
    """How many users, tickets, messages and events the desk holds, and its last ticket number."""
    row = await pool.fetchrow(
        """SELECT (SELECT count(*) FROM users WHERE desk_id = $1) AS users,
                  (SELECT count(*) FROM tickets WHERE desk_id = $1) AS tickets,
                  (SELECT count(*) FROM messages WHERE desk_id = $1) AS messages,
                  (SELECT count(*) FROM ticket_events WHERE desk_id = $1) AS events,
                  (SELECT last_number FROM desk_counters WHERE desk_id = $1) AS last_number""",
        desk.desk_id,
    )
    return dict(row)
