"""Administration: desks, tokens, departments, ticket types and blocklist entries.

The `headoni` command line calls these; so do the tests. Each returns the struct it prints.
"""

import re
from datetime import datetime
from typing import Final, NamedTuple

import asyncpg
import email_validator
import msgspec

from app.auth import RESERVED_SUBDOMAINS, SCOPES, SUBDOMAIN, digest, new_secret
from app.ids import Snowflake
from app.rates import Limit, from_columns, parse_rate


class AdminError(Exception):
    """Wrong input to an administration command: one line for the user, exit code 1."""


class DeskOut(msgspec.Struct):
    id: str
    subdomain: str
    name: str
    defaultDepartmentId: str
    defaultTicketTypeId: str


class TokenOut(msgspec.Struct, omit_defaults=True):
    """A new token, as `token create` prints it: the only time its secret is shown."""

    id: str
    name: str
    scopes: list[str]
    secret: str
    rate: str | None = None  # the token's own rate limit, e.g. 600/min (docs/limits.md)
    burst: int | None = None
    limitFrom: str | None = None  # "token" when it has a limit of its own


class TokenListed(msgspec.Struct, omit_defaults=True):
    id: str
    name: str
    scopes: list[str]
    revoked: bool
    createdAt: datetime
    rate: str | None = None  # the token's rate limit: its own, else its desk's default
    burst: int | None = None
    limitFrom: str | None = None  # "token" or "desk": where the limit comes from (docs/limits.md)


class LimitOut(msgspec.Struct, omit_defaults=True):
    """A desk's default limit, or a token's own, as `desk limit` and `token limit` set it."""

    desk: str
    token: str | None = None
    rate: str | None = None  # None: no limit of its own (a token then has its desk's; a desk, the service's)
    burst: int | None = None
    changed: bool = True  # False: it was so already (a repeat is a no-op)


class DepartmentOut(msgspec.Struct):
    id: str
    name: str
    public: bool
    default: bool


class DepartmentListed(DepartmentOut):
    deleted: bool


class TicketTypeOut(msgspec.Struct):
    id: str
    name: str
    default: bool


class TicketTypeListed(TicketTypeOut):
    archived: bool


# What a command that sets a state did: the object, its state now, and whether this call changed it.
# Asking for a state that already holds is a repeat: it changes nothing and is no error.
class TokenRevoked(msgspec.Struct):
    id: str
    revoked: bool
    changed: bool


class DepartmentDeleted(msgspec.Struct):
    id: str
    deleted: bool
    changed: bool


class TicketTypeArchived(msgspec.Struct):
    id: str
    archived: bool
    changed: bool


class BlocklistChange(msgspec.Struct):
    entry: str
    blocked: bool
    changed: bool


class BlocklistListed(msgspec.Struct):
    entry: str


def _name(value: str, what: str) -> str:
    """A required name: trimmed, not blank, at most 200 characters."""
    value = value.strip()
    if not value:
        raise AdminError(f"{what} must not be empty or blank")
    if len(value) > 200:
        raise AdminError(f"{what} must be at most 200 characters")
    return value


async def desk_id(conn: asyncpg.Connection, subdomain: str) -> int:
    found = await conn.fetchval("SELECT desk_id FROM desks WHERE subdomain = $1", subdomain.strip().lower())
    if found is None:
        raise AdminError(f"no desk {subdomain!r} (see headoni desk list)")
    return int(found)


async def create_desk(conn: asyncpg.Connection, ids: Snowflake, subdomain: str, name: str | None) -> DeskOut:
    """A desk with its counter, default department and default ticket type. A blank name, like none,
    means the subdomain (as a blank `name` means none in a ticket)."""
    given, subdomain = subdomain, subdomain.strip().lower()
    if not SUBDOMAIN.fullmatch(subdomain):
        raise AdminError(f"bad subdomain {given!r}: use 1-63 of a-z 0-9 -, not starting or ending with -")
    if subdomain in RESERVED_SUBDOMAINS:
        raise AdminError(f"subdomain {given!r} is reserved for the service's own hosts; reserved are "
                         + ", ".join(sorted(RESERVED_SUBDOMAINS)))
    desk_name = _name(name, "name") if name and name.strip() else subdomain
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


async def list_desks(conn: asyncpg.Connection) -> list[DeskOut]:
    rows = await conn.fetch(
        """
        SELECT d.desk_id, d.subdomain, d.name, dep.department_id, tt.ticket_type_id
        FROM desks d
        JOIN departments dep ON dep.desk_id = d.desk_id AND dep.is_default
        JOIN ticket_types tt ON tt.desk_id = dep.desk_id AND tt.is_default  -- dep.desk_id: Citus joins shards on it
        ORDER BY d.subdomain
        """
    )
    return [DeskOut(str(r[0]), r[1], r[2], str(r[3]), str(r[4])) for r in rows]


def rate_limit(rate: str | None, burst: int | None) -> Limit | None:
    """A limit from `--rate` and `--burst` (None without --rate; --burst alone is wrong input)."""
    if rate is None:
        if burst is not None:
            raise AdminError("--burst needs --rate")
        return None
    try:
        return parse_rate(rate, burst)
    except ValueError as exc:
        raise AdminError(str(exc)) from None


def _columns(limit: Limit | None) -> tuple[int | None, int | None, int | None]:
    return (limit.units, limit.seconds, limit.burst) if limit else (None, None, None)


async def create_token(
    conn: asyncpg.Connection, ids: Snowflake, subdomain: str, name: str, scopes: list[str],
    limit: Limit | None = None,
) -> TokenOut:
    unknown = sorted(set(scopes) - SCOPES)
    if unknown or not scopes:
        raise AdminError(f"bad scope {', '.join(unknown) or '(none)'}: choose from {', '.join(sorted(SCOPES))}")
    desk = await desk_id(conn, subdomain)
    token, secret, scope_list = ids.next_id(), new_secret(), sorted(set(scopes))
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO api_tokens (desk_id, token_id, name, scopes, secret_sha256, rate_units, rate_seconds,"
            " rate_burst) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            desk, token, _name(name, "token name"), scope_list, digest(secret), *_columns(limit),
        )
        await conn.execute("INSERT INTO rate_limit_buckets (desk_id, token_id) VALUES ($1, $2)", desk, token)
    out = TokenOut(str(token), name.strip(), scope_list, secret)
    if limit is not None:
        out.rate, out.burst, out.limitFrom = limit.rate, limit.burst, "token"
    return out


def _shown(limit: Limit | None) -> tuple[str | None, int | None]:
    return (limit.rate, limit.burst) if limit else (None, None)


async def set_desk_limit(conn: asyncpg.Connection, subdomain: str, limit: Limit | None) -> LimitOut:
    """The desk's default limit for its tokens without one of their own (None: no default)."""
    desk = await desk_id(conn, subdomain)
    changed = await conn.fetchval(
        "UPDATE desks SET rate_units = $2, rate_seconds = $3, rate_burst = $4 WHERE desk_id = $1"
        " AND (rate_units, rate_seconds, rate_burst) IS DISTINCT FROM ($2::int, $3::int, $4::int) RETURNING true",
        desk, *_columns(limit),
    )
    return LimitOut(subdomain.lower(), None, *_shown(limit), changed=bool(changed))


async def set_token_limit(conn: asyncpg.Connection, subdomain: str, token_id: int, limit: Limit | None) -> LimitOut:
    """The token's own limit (None: it takes its desk's default again)."""
    desk = await desk_id(conn, subdomain)
    async with conn.transaction():
        found = await conn.fetchrow(
            "SELECT rate_units, rate_seconds, rate_burst FROM api_tokens WHERE desk_id = $1 AND token_id = $2"
            " FOR NO KEY UPDATE",
            desk, token_id,
        )
        if found is None:
            raise AdminError(f"no token {token_id} on desk {subdomain!r} (see headoni token list --desk {subdomain})")
        changed = tuple(found) != _columns(limit)
        if changed:
            await conn.execute(
                "UPDATE api_tokens SET rate_units = $3, rate_seconds = $4, rate_burst = $5"
                " WHERE desk_id = $1 AND token_id = $2",
                desk, token_id, *_columns(limit),
            )
    return LimitOut(subdomain.lower(), str(token_id), *_shown(limit), changed=changed)


async def revoke_token(conn: asyncpg.Connection, subdomain: str, token_id: int) -> TokenRevoked:
    desk = await desk_id(conn, subdomain)
    async with conn.transaction():
        revoked = await conn.fetchval(
            "SELECT revoked_at IS NOT NULL FROM api_tokens WHERE desk_id = $1 AND token_id = $2 FOR NO KEY UPDATE",
            desk, token_id,
        )
        if revoked is None:
            raise AdminError(f"no token {token_id} on desk {subdomain!r} (see headoni token list --desk {subdomain})")
        if not revoked:
            await conn.execute(
                "UPDATE api_tokens SET revoked_at = now() WHERE desk_id = $1 AND token_id = $2", desk, token_id
            )
    return TokenRevoked(str(token_id), revoked=True, changed=not revoked)


async def list_tokens(conn: asyncpg.Connection, subdomain: str) -> list[TokenListed]:
    desk = await desk_id(conn, subdomain)
    rows = await conn.fetch(
        "SELECT t.token_id, t.name, t.scopes, t.revoked_at IS NOT NULL AS revoked, t.created_at,"
        " t.rate_units, t.rate_seconds, t.rate_burst, d.rate_units, d.rate_seconds, d.rate_burst"
        " FROM api_tokens t JOIN desks d USING (desk_id) WHERE t.desk_id = $1 ORDER BY t.token_id",
        desk,
    )
    tokens = []
    for r in rows:
        own, default = from_columns(r[5], r[6], r[7]), from_columns(r[8], r[9], r[10])
        limit = own or default
        tokens.append(TokenListed(
            str(r[0]), r[1], list(r[2]), r[3], r[4],
            limit.rate if limit else None, limit.burst if limit else None,
            ("token" if own else "desk") if limit else None,
        ))
    return tokens


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


async def list_departments(conn: asyncpg.Connection, subdomain: str) -> list[DepartmentListed]:
    desk = await desk_id(conn, subdomain)
    rows = await conn.fetch(
        "SELECT department_id, name, public, is_default, deleted_at IS NOT NULL"
        " FROM departments WHERE desk_id = $1 ORDER BY department_id",
        desk,
    )
    return [DepartmentListed(str(r[0]), r[1], r[2], r[3], r[4]) for r in rows]


class _Retirable(NamedTuple):
    """Departments are deleted and ticket types archived alike: softly, never the desk's default."""

    what: str
    verb: str
    state: str  # (is_default, already retired) of ($1 desk, $2 id)
    retire: str  # retires ($1 desk, $2 id)


_DEPARTMENT: Final = _Retirable(
    "department", "deleted",
    "SELECT is_default, deleted_at IS NOT NULL FROM departments WHERE desk_id = $1 AND department_id = $2",
    "UPDATE departments SET deleted_at = now() WHERE desk_id = $1 AND department_id = $2",
)
_TICKET_TYPE: Final = _Retirable(
    "ticket type", "archived",
    "SELECT is_default, archived_at IS NOT NULL FROM ticket_types WHERE desk_id = $1 AND ticket_type_id = $2",
    "UPDATE ticket_types SET archived_at = now() WHERE desk_id = $1 AND ticket_type_id = $2",
)


async def _retire(conn: asyncpg.Connection, subdomain: str, item: int, kind: _Retirable) -> bool:
    """Retire one row under the desk's lock (so the default cannot move meanwhile); whether this call
    changed it. Retiring one already retired is a repeat: no change, no error."""
    desk = await desk_id(conn, subdomain)
    async with conn.transaction():
        await _lock_desk(conn, desk)
        row = await conn.fetchrow(kind.state, desk, item)
        if row is None:
            listing = f"headoni {kind.what.replace(' ', '-')} list --desk {subdomain}"
            raise AdminError(f"no {kind.what} {item} on desk {subdomain!r} (see {listing})")
        default, retired = row
        if default:
            raise AdminError(f"the default {kind.what} cannot be {kind.verb}; make another one the default first")
        if not retired:
            await conn.execute(kind.retire, desk, item)
    return not retired


async def delete_department(conn: asyncpg.Connection, subdomain: str, department_id: int) -> DepartmentDeleted:
    """Soft delete: the department stays on its tickets but takes no new ones."""
    changed = await _retire(conn, subdomain, department_id, _DEPARTMENT)
    return DepartmentDeleted(str(department_id), deleted=True, changed=changed)


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


async def list_ticket_types(conn: asyncpg.Connection, subdomain: str) -> list[TicketTypeListed]:
    desk = await desk_id(conn, subdomain)
    rows = await conn.fetch(
        "SELECT ticket_type_id, name, is_default, archived_at IS NOT NULL"
        " FROM ticket_types WHERE desk_id = $1 ORDER BY ticket_type_id",
        desk,
    )
    return [TicketTypeListed(str(r[0]), r[1], r[2], r[3]) for r in rows]


async def archive_ticket_type(conn: asyncpg.Connection, subdomain: str, ticket_type_id: int) -> TicketTypeArchived:
    changed = await _retire(conn, subdomain, ticket_type_id, _TICKET_TYPE)
    return TicketTypeArchived(str(ticket_type_id), archived=True, changed=changed)


# email-validator explains a bad domain as "the part after the @-sign"; a domain entry has no @-sign,
# so its reasons are reworded to speak of what was given. Applied in order, case-insensitively.
_DOMAIN_WORDING: Final = (
    ("the part after the @-sign is not valid. it should", "it should"),
    ("immediately after the @-sign or after a period", "at the start of a label"),
    ("immediately after the @-sign", "at its start"),
    ("after the @-sign, periods", "periods"),
    ("the part after the @-sign", "it"),
    (" after the @-sign", ""),
    ("an email address", "a domain"),
    ("the email address", "it"),
)


def _domain_reason(message: str) -> str:
    for old, new in _DOMAIN_WORDING:
        message = re.sub(re.escape(old), new, message, flags=re.IGNORECASE)
    message = message[:1].upper() + message[1:]
    return message if "@" not in message else "It is not a valid domain name."


def blocklist_entry(entry: str) -> str:
    """A whole address or an exact domain, lowercased, its domain spelled as validation.py spells
    requesters' domains (Unicode, not xn--); anything else is refused, in terms of what was given."""
    value = entry.strip().lower()
    if "@" in value:
        try:
            return str(email_validator.validate_email(value, check_deliverability=False).normalized).lower()
        except email_validator.EmailNotValidError as exc:
            hint = " (to block a whole domain, give it without the @)" if value.startswith("@") else ""
            raise AdminError(f"bad blocklist address {entry!r}: {exc}{hint}") from None
    try:  # the domain of an address, so it is judged and spelled exactly as a requester's domain
        return str(email_validator.validate_email(f"x@{value}", check_deliverability=False).domain).lower()
    except email_validator.EmailNotValidError as exc:
        raise AdminError(
            f"bad blocklist entry {entry!r}: not a domain (such as spam.example) nor an address"
            f" (such as bob@spam.example). {_domain_reason(str(exc))}"
        ) from None


async def add_blocklist(conn: asyncpg.Connection, subdomain: str, entry: str) -> BlocklistChange:
    desk, value = await desk_id(conn, subdomain), blocklist_entry(entry)
    added = await conn.fetchval(
        "INSERT INTO blocklist_entries (desk_id, entry) VALUES ($1, $2) ON CONFLICT DO NOTHING RETURNING entry",
        desk, value,
    )
    return BlocklistChange(value, blocked=True, changed=added is not None)


async def remove_blocklist(conn: asyncpg.Connection, subdomain: str, entry: str) -> BlocklistChange:
    desk, value = await desk_id(conn, subdomain), blocklist_entry(entry)
    removed = await conn.fetchval(
        "DELETE FROM blocklist_entries WHERE desk_id = $1 AND entry = $2 RETURNING entry", desk, value
    )
    return BlocklistChange(value, blocked=False, changed=removed is not None)


async def list_blocklist(conn: asyncpg.Connection, subdomain: str) -> list[str]:
    desk = await desk_id(conn, subdomain)
    rows = await conn.fetch("SELECT entry FROM blocklist_entries WHERE desk_id = $1 ORDER BY entry", desk)
    return [r[0] for r in rows]
