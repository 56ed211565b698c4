"""Administration: desks, tokens, departments, ticket types and blocklist entries.

The `headoni` command line calls these; so do the tests. Each returns the struct it prints.
"""

from datetime import datetime

import asyncpg
import email_validator
import msgspec

from app.auth import SCOPES, SUBDOMAIN, digest, new_secret
from app.ids import Snowflake


class AdminError(Exception):
    """Wrong input to an administration command: one line for the user, exit code 1."""


class DeskOut(msgspec.Struct):
    id: str
    subdomain: str
    name: str
    defaultDepartmentId: str
    defaultTicketTypeId: str


class TokenOut(msgspec.Struct, omit_defaults=True):
    id: str
    name: str
    scopes: list[str]
    secret: str | None = None  # only in the answer to `token create`
    revoked: bool = False
    createdAt: datetime | None = None


class DepartmentOut(msgspec.Struct):
    id: str
    name: str
    public: bool
    default: bool


class TicketTypeOut(msgspec.Struct):
    id: str
    name: str
    default: bool


def _name(value: str, what: str) -> str:
    value = value.strip()
    if not value:
        raise AdminError(f"{what} must not be empty")
    if len(value) > 200:
        raise AdminError(f"{what} must be at most 200 characters")
    return value


async def desk_id(conn: asyncpg.Connection, subdomain: str) -> int:
    found = await conn.fetchval("SELECT desk_id FROM desks WHERE subdomain = $1", subdomain.lower())
    if found is None:
        raise AdminError(f"no desk {subdomain!r}")
    return int(found)


async def create_desk(conn: asyncpg.Connection, ids: Snowflake, subdomain: str, name: str | None) -> DeskOut:
    """A desk with its counter, default department and default ticket type."""
    subdomain = subdomain.strip().lower()
    if not SUBDOMAIN.fullmatch(subdomain):
        raise AdminError(f"bad subdomain {subdomain!r}: use 1-63 of a-z 0-9 -, not starting or ending with -")
    desk_name = _name(name or subdomain, "name")
    desk, department, ticket_type = ids.next_ids(3)
    async with conn.transaction():
        inserted = await conn.fetchval(
            "INSERT INTO desks (desk_id, subdomain, name) VALUES ($1, $2, $3)"
            " ON CONFLICT (subdomain) DO NOTHING RETURNING desk_id",
            desk, subdomain, desk_name,
        )
        if inserted is None:
            raise AdminError(f"desk {subdomain!r} already exists")
        await conn.execute("INSERT INTO desk_counters (desk_id) VALUES ($1)", desk)
        await conn.execute(
            "INSERT INTO departments (desk_id, department_id, name, is_default) VALUES ($1, $2, 'General', true)",
            desk, department,
        )
        await conn.execute(
            "INSERT INTO ticket_types (desk_id, ticket_type_id, name, is_default) VALUES ($1, $2, 'General', true)",
            desk, ticket_type,
        )
    return DeskOut(str(desk), subdomain, desk_name, str(department), str(ticket_type))


async def create_token(
    conn: asyncpg.Connection, ids: Snowflake, subdomain: str, name: str, scopes: list[str]
) -> TokenOut:
    unknown = sorted(set(scopes) - SCOPES)
    if unknown or not scopes:
        raise AdminError(f"bad scope {', '.join(unknown) or '(none)'}: choose from {', '.join(sorted(SCOPES))}")
    desk = await desk_id(conn, subdomain)
    token, secret, scope_list = ids.next_id(), new_secret(), sorted(set(scopes))
    await conn.execute(
        "INSERT INTO api_tokens (desk_id, token_id, name, scopes, secret_sha256) VALUES ($1, $2, $3, $4, $5)",
        desk, token, _name(name, "token name"), scope_list, digest(secret),
    )
    return TokenOut(str(token), name.strip(), scope_list, secret)


async def revoke_token(conn: asyncpg.Connection, subdomain: str, token_id: int) -> None:
    desk = await desk_id(conn, subdomain)
    found = await conn.fetchval(
        "UPDATE api_tokens SET revoked_at = coalesce(revoked_at, now())"
        " WHERE desk_id = $1 AND token_id = $2 RETURNING token_id",
        desk, token_id,
    )
    if found is None:
        raise AdminError(f"no token {token_id} on desk {subdomain!r}")


async def list_tokens(conn: asyncpg.Connection, subdomain: str) -> list[TokenOut]:
    desk = await desk_id(conn, subdomain)
    rows = await conn.fetch(
        "SELECT token_id, name, scopes, revoked_at IS NOT NULL AS revoked, created_at"
        " FROM api_tokens WHERE desk_id = $1 ORDER BY token_id",
        desk,
    )
    return [TokenOut(str(r[0]), r[1], list(r[2]), None, r[3], r[4]) for r in rows]


async def _lock_desk(conn: asyncpg.Connection, desk: int) -> None:
    """Serialize changes to a desk's defaults (in the caller's transaction): two `--default` creates,
    or a create and a delete, must not both read the old default."""
    await conn.execute("SELECT 1 FROM desks WHERE desk_id = $1 FOR NO KEY UPDATE", desk)


async def create_department(
    conn: asyncpg.Connection, ids: Snowflake, subdomain: str, name: str, *, private: bool, default: bool
) -> DepartmentOut:
    desk, department = await desk_id(conn, subdomain), ids.next_id()
    async with conn.transaction():
        if default:
            await _lock_desk(conn, desk)
            await conn.execute("UPDATE departments SET is_default = false WHERE desk_id = $1 AND is_default", desk)
        await conn.execute(
            "INSERT INTO departments (desk_id, department_id, name, public, is_default) VALUES ($1, $2, $3, $4, $5)",
            desk, department, _name(name, "department name"), not private, default,
        )
    return DepartmentOut(str(department), name.strip(), not private, default)


async def delete_department(conn: asyncpg.Connection, subdomain: str, department_id: int) -> None:
    """Soft delete: the department stays on its tickets but takes no new ones."""
    desk = await desk_id(conn, subdomain)
    row = await conn.fetchrow(
        "SELECT is_default FROM departments WHERE desk_id = $1 AND department_id = $2 AND deleted_at IS NULL",
        desk, department_id,
    )
    if row is None:
        raise AdminError(f"no department {department_id} on desk {subdomain!r}")
    if row["is_default"]:
        raise AdminError("the default department cannot be deleted; make another one the default first")
    await conn.execute(
        "UPDATE departments SET deleted_at = now() WHERE desk_id = $1 AND department_id = $2", desk, department_id
    )


async def create_ticket_type(
    conn: asyncpg.Connection, ids: Snowflake, subdomain: str, name: str, *, default: bool
) -> TicketTypeOut:
    desk, ticket_type = await desk_id(conn, subdomain), ids.next_id()
    async with conn.transaction():
        if default:
            await _lock_desk(conn, desk)
            await conn.execute("UPDATE ticket_types SET is_default = false WHERE desk_id = $1 AND is_default", desk)
        await conn.execute(
            "INSERT INTO ticket_types (desk_id, ticket_type_id, name, is_default) VALUES ($1, $2, $3, $4)",
            desk, ticket_type, _name(name, "ticket type name"), default,
        )
    return TicketTypeOut(str(ticket_type), name.strip(), default)


async def archive_ticket_type(conn: asyncpg.Connection, subdomain: str, ticket_type_id: int) -> None:
    desk = await desk_id(conn, subdomain)
    row = await conn.fetchrow(
        "SELECT is_default FROM ticket_types WHERE desk_id = $1 AND ticket_type_id = $2 AND archived_at IS NULL",
        desk, ticket_type_id,
    )
    if row is None:
        raise AdminError(f"no ticket type {ticket_type_id} on desk {subdomain!r}")
    if row["is_default"]:
        raise AdminError("the default ticket type cannot be archived; make another one the default first")
    await conn.execute(
        "UPDATE ticket_types SET archived_at = now() WHERE desk_id = $1 AND ticket_type_id = $2",
        desk, ticket_type_id,
    )


def blocklist_entry(entry: str) -> str:
    """A whole address or an exact domain, lowercased, its domain spelled as validation.py spells
    requesters' domains (Unicode, not xn--); anything else is refused."""
    entry = entry.strip().lower()
    address = entry if "@" in entry else f"x@{entry}"
    try:
        valid = email_validator.validate_email(address, check_deliverability=False)
    except email_validator.EmailNotValidError as exc:
        if "@" in entry:
            raise AdminError(f"bad blocklist address {entry!r}: {exc}") from None
        raise AdminError(f"bad blocklist entry {entry!r}: give an address or a domain ({exc})") from None
    return str(valid.normalized if "@" in entry else valid.domain).lower()


async def add_blocklist(conn: asyncpg.Connection, subdomain: str, entry: str) -> str:
    desk, entry = await desk_id(conn, subdomain), blocklist_entry(entry)
    await conn.execute(
        "INSERT INTO blocklist_entries (desk_id, entry) VALUES ($1, $2) ON CONFLICT DO NOTHING", desk, entry
    )
    return entry


async def remove_blocklist(conn: asyncpg.Connection, subdomain: str, entry: str) -> str:
    desk, entry = await desk_id(conn, subdomain), blocklist_entry(entry)
    removed = await conn.fetchval(
        "DELETE FROM blocklist_entries WHERE desk_id = $1 AND entry = $2 RETURNING entry", desk, entry
    )
    if removed is None:
        raise AdminError(f"{entry!r} is not on the blocklist of desk {subdomain!r}")
    return entry


async def list_blocklist(conn: asyncpg.Connection, subdomain: str) -> list[str]:
    desk = await desk_id(conn, subdomain)
    rows = await conn.fetch("SELECT entry FROM blocklist_entries WHERE desk_id = $1 ORDER BY entry", desk)
    return [r[0] for r in rows]
