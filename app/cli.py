"""The `headoni` command line: migrate, serve, and the administration commands."""

import argparse
import asyncio
import os
import shlex
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn

import asyncpg
import msgspec

from app import admin, db, settings
from app.ids import Snowflake, WorkerLease

_encode = msgspec.json.Encoder().encode

Command = Callable[[asyncpg.Connection, Snowflake, argparse.Namespace], Awaitable[Any]]


def _print_json(value: Any) -> None:
    sys.stdout.write(_encode(value).decode() + "\n")


def _positive_id(value: str) -> int:
    if not (value.isascii() and value.isdigit()) or not 0 < int(value) < 1 << 63:
        raise argparse.ArgumentTypeError(f"not an id: {value!r}")
    return int(value)


async def _with_database(command: Command, args: argparse.Namespace, url: str) -> Any:
    await db.wait_until_reachable(url, 0)  # one attempt: a command fails fast, with one line
    conn = await asyncpg.connect(url)
    try:
        args.applied = await db.migrate(conn)  # before the lease, which needs the migrated schema
        lease = await WorkerLease.acquire(url)
        try:
            return await command(conn, lease.snowflake(), args)
        finally:
            await lease.close()
    finally:
        await conn.close()


# Each administration command: (connection, ids, args) -> what it prints (JSON with --json).
async def _desk_create(conn: asyncpg.Connection, ids: Snowflake, a: argparse.Namespace) -> Any:
    desk = await admin.create_desk(conn, ids, a.subdomain, a.name)
    return desk if a.json else f"created desk {desk.subdomain} (id {desk.id})"


async def _token_create(conn: asyncpg.Connection, ids: Snowflake, a: argparse.Namespace) -> Any:
    token = await admin.create_token(conn, ids, a.desk, a.name, a.scope)
    if a.json:
        return token
    return f"created token {token.id} ({' '.join(token.scopes)}); its secret, shown only now:\n{token.secret}"


async def _token_revoke(conn: asyncpg.Connection, ids: Snowflake, a: argparse.Namespace) -> Any:
    await admin.revoke_token(conn, a.desk, a.id)
    return f"revoked token {a.id}"


async def _token_list(conn: asyncpg.Connection, ids: Snowflake, a: argparse.Namespace) -> Any:
    return await admin.list_tokens(conn, a.desk)


async def _department_create(conn: asyncpg.Connection, ids: Snowflake, a: argparse.Namespace) -> Any:
    dep = await admin.create_department(conn, ids, a.desk, a.name, private=a.private, default=a.default)
    return dep if a.json else f"created department {dep.name} (id {dep.id})"


async def _department_delete(conn: asyncpg.Connection, ids: Snowflake, a: argparse.Namespace) -> Any:
    await admin.delete_department(conn, a.desk, a.id)
    return f"deleted department {a.id}"


async def _ticket_type_create(conn: asyncpg.Connection, ids: Snowflake, a: argparse.Namespace) -> Any:
    kind = await admin.create_ticket_type(conn, ids, a.desk, a.name, default=a.default)
    return kind if a.json else f"created ticket type {kind.name} (id {kind.id})"


async def _ticket_type_archive(conn: asyncpg.Connection, ids: Snowflake, a: argparse.Namespace) -> Any:
    await admin.archive_ticket_type(conn, a.desk, a.id)
    return f"archived ticket type {a.id}"


async def _blocklist_add(conn: asyncpg.Connection, ids: Snowflake, a: argparse.Namespace) -> Any:
    return f"blocked {await admin.add_blocklist(conn, a.desk, a.entry)}"


async def _blocklist_remove(conn: asyncpg.Connection, ids: Snowflake, a: argparse.Namespace) -> Any:
    return f"unblocked {await admin.remove_blocklist(conn, a.desk, a.entry)}"


async def _blocklist_list(conn: asyncpg.Connection, ids: Snowflake, a: argparse.Namespace) -> Any:
    return "\n".join(await admin.list_blocklist(conn, a.desk))


async def _migrate(conn: asyncpg.Connection, ids: Snowflake, a: argparse.Namespace) -> Any:
    # _with_database has applied them already, as before every command.
    return "\n".join(f"applied {name}" for name in a.applied) or "migrations are up to date"


class _Parser(argparse.ArgumentParser):
    """Usage mistakes (a bad id, a missing argument) are wrong input like any other: one line, exit 1."""

    def error(self, message: str) -> NoReturn:
        self.exit(1, f"{self.prog}: {message} (see {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    top = _Parser(prog="headoni", description="Headoni ticket intake API.")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("migrate", help="apply pending database migrations").set_defaults(run=_migrate)

    serve = commands.add_parser("serve", help="run the HTTP API (migrates first)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=int(os.environ.get("HEADONI_WORKERS", "1")))
    serve.set_defaults(run=None)

    def group(name: str, help: str) -> Any:
        return commands.add_parser(name, help=help).add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(sub: Any, name: str, run: Command, *, desk: bool = True, json: bool = False) -> Any:
        p = sub.add_parser(name)
        if desk:
            p.add_argument("--desk", required=True, metavar="SUBDOMAIN")
        if json:
            p.add_argument("--json", action="store_true", help="print the new object as one JSON line")
        p.set_defaults(run=run)
        return p

    desks = group("desk", "manage desks")
    p = action(desks, "create", _desk_create, desk=False, json=True)
    p.add_argument("subdomain")
    p.add_argument("--name")

    tokens = group("token", "manage API tokens")
    p = action(tokens, "create", _token_create, json=True)
    p.add_argument("--name", required=True)
    p.add_argument("--scope", action="append", required=True, help="tickets:create or tickets:read; repeatable")
    action(tokens, "revoke", _token_revoke).add_argument("id", type=_positive_id)
    action(tokens, "list", _token_list)

    departments = group("department", "manage departments")
    p = action(departments, "create", _department_create, json=True)
    p.add_argument("name")
    p.add_argument("--private", action="store_true")
    p.add_argument("--default", action="store_true", help="make it the desk's default department")
    action(departments, "delete", _department_delete).add_argument("id", type=_positive_id)

    types = group("ticket-type", "manage ticket types")
    p = action(types, "create", _ticket_type_create, json=True)
    p.add_argument("name")
    p.add_argument("--default", action="store_true", help="make it the desk's default ticket type")
    action(types, "archive", _ticket_type_archive).add_argument("id", type=_positive_id)

    blocklist = group("blocklist", "manage the desk's blocklist of addresses and domains")
    action(blocklist, "add", _blocklist_add).add_argument("entry")
    action(blocklist, "remove", _blocklist_remove).add_argument("entry")
    action(blocklist, "list", _blocklist_list)
    return top


def _emit(result: Any) -> None:
    if isinstance(result, str):
        if result:
            print(result)
    elif isinstance(result, list):
        for item in result:
            _print_json(item)
    elif result is not None:
        _print_json(result)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        config = settings.load()
    except ValueError as exc:  # a malformed HEADONI_* variable
        print(f"headoni: {exc}", file=sys.stderr)
        return 1
    try:
        if args.run is None:
            return serve(config, args)
        result = asyncio.run(_with_database(args.run, args, db.database_url(config)))
    except (admin.AdminError, db.DatabaseUnreachable) as exc:
        print(f"headoni: {exc}", file=sys.stderr)
        return 1
    _emit(result)
    return 0


async def _prepare(url: str, embedded: bool, base_url: str, startup_timeout: float) -> str | None:
    """Wait for the database (up to startup_timeout seconds) and migrate; on an empty embedded database,
    make desk acme and a token, and return a curl to try."""
    await db.wait_until_reachable(url, startup_timeout)
    conn = await asyncpg.connect(url)
    try:
        await db.migrate(conn)
        if not embedded or await conn.fetchval("SELECT EXISTS (SELECT 1 FROM desks)"):
            return None
        lease = await WorkerLease.acquire(url)
        try:
            ids = lease.snowflake()
            await admin.create_desk(conn, ids, "acme", "Acme")
            token = await admin.create_token(conn, ids, "acme", "Quickstart", ["tickets:create", "tickets:read"])
        finally:
            await lease.close()
    finally:
        await conn.close()
    body = '{"email": "alice@example.com", "subject": "Login broken", "body": "I loop back to /sign-in."}'
    return (
        f"curl -i -X POST {base_url}/api/v1/tickets"
        f" -H {shlex.quote('Authorization: Bearer ' + str(token.secret))}"
        f" -H 'Content-Type: application/json' -d {shlex.quote(body)}"
    )


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM ends `serve` as a normal exit (status 0), so atexit stops the embedded PostgreSQL.

    uvicorn shuts down gracefully on SIGTERM, then raises the signal again under the handler it found:
    with Python's default one the process would die there, skip atexit and leave the server running."""
    raise SystemExit(0)


def serve(config: settings.Settings, args: argparse.Namespace) -> int:
    import uvicorn

    from app import observability

    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    embedded = config.database_url is None
    url = db.database_url(config)
    port = f":{args.port}" if args.port != 80 else ""
    base_url = f"http://acme.{config.base_domain}{port}"
    curl = asyncio.run(_prepare(url, embedded, base_url, config.startup_timeout))
    if curl:
        print("Created desk 'acme' and a token. Try it (the secret is shown only now):\n\n" + curl + "\n", flush=True)
    # Workers are fresh processes: they find the database through the environment.
    os.environ["DATABASE_URL"] = url
    observability.prepare_multiprocess_dir(args.workers)  # before any worker imports prometheus-client
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        loop="uvloop",
        http="app.http:BoundedHttpToolsProtocol",  # httptools, with a bounded request head
        access_log=False,
        timeout_graceful_shutdown=20,
    )
    return 0
