"""A desk made for one test (each test makes its own, so tests never see each other's rows), and a
ticket body to send to it."""

import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg

from app import admin
from app.auth import Token
from app.ids import Snowflake
from tests.support import BASE_DOMAIN


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


def ticket_body(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "email": "alice@example.com",
        "subject": "Login broken on staging",
        "body": "I loop back to /sign-in after typing my email.",
    }
    body.update(fields)
    return {k: v for k, v in body.items() if v is not ...}
