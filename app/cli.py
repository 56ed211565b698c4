"""The `headoni` command line: migrate, serve, and the administration commands.

Every command takes --json (JSON, one object per line) and prints one line on stderr with exit code 1 on
wrong input. A command that sets a state which already holds (revoking a revoked token, blocking a
blocked address) changes nothing, says so, and exits 0.
"""

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn

import asyncpg
import msgspec

from app import admin, citus, db, serve, settings
from app.ids import Snowflake, WorkerLease

_encode = msgspec.json.Encoder().encode

# What a command prints: a value for --json (a list prints one line per item) and the text for people.
Output = tuple[Any, str]
Command = Callable[[asyncpg.Connection, Snowflake, argparse.Namespace], Awaitable[Output]]


def _positive_id(value: str) -> int:
    if not (value.isascii() and value.isdigit()) or not 0 < int(value) < 1 << 63:
        raise argparse.ArgumentTypeError(f"not an id: {value!r}")
    return int(value)


async def _with_database(command: Command, args: argparse.Namespace, url: str) -> Output:
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


def _said(change: bool, done: str, repeat: str) -> str:
    return done if change else f"{repeat}; nothing changed"


# Each administration command: (connection, ids, args) -> Output.
async def _migrate(conn: asyncpg.Connection, ids: Snowflake, a: argparse.Namespace) -> Output:
    # _with_database has applied them already, as before every command.
    text = "\n".join(f"applied {name}" for name in a.applied) or "migrations are up to date"
    return {"applied": a.applied}, text


async def _desk_create(conn: asyncpg.Connection, ids: Snowflake, a: argparse.Namespace) -> Output:
    desk = await admin.create_desk(conn, ids, a.subdomain, a.name)
    return desk, f"created desk {desk.subdomain} (id {desk.id}); next: headoni token create --desk {desk.subdomain} ..."


async def _desk_list(conn: asyncpg.Connection, ids: Snowflake, a: argparse.Namespace) -> Output:
    desks = await admin.list_desks(conn)
    lines = [f"{d.id}  {d.subdomain}  {d.name}" for d in desks]
    return desks, "\n".join(lines) or "no desk yet; make one with: headoni desk create SUBDOMAIN"


async def _token_create(conn: asyncpg.Connection, ids: Snowflake, a: argparse.Namespace) -> Output:
    token = await admin.create_token(conn, ids, a.desk, a.name, a.scope, admin.rate_limit(a.rate, a.burst))
    limit = f", {token.rate} burst {token.burst}" if token.rate else ""
    return token, (
        f"created token {token.id} ({' '.join(token.scopes)}{limit}); its secret, shown only now:\n{token.secret}"
    )


async def _token_list(conn: asyncpg.Connection, ids: Snowflake, a: argparse.Namespace) -> Output:
    tokens = await admin.list_tokens(conn, a.desk)
    lines = [
        f"{t.id}  {t.name}  {' '.join(t.scopes)}  created {t.createdAt:%Y-%m-%d %H:%M} UTC"
        + (f"  {t.rate} burst {t.burst} ({t.limitFrom}'s)" if t.rate else "")
        + ("  revoked" if t.revoked else "")
        for t in tokens
    ]
    return tokens, "\n".join(lines) or f"no token on desk {a.desk}"


def _limit_said(out: admin.LimitOut) -> str:
    what = f"token {out.token}" if out.token else f"desk {out.desk}"
    now = f"{out.rate}, burst {out.burst}" if out.rate else "no limit of its own" + (
        " (its desk's default applies)" if out.token else "")
    return _said(out.changed, f"{what}: {now}", f"{what} had that already ({now})")


def _new_limit(a: argparse.Namespace) -> Any:
    if a.none == (a.rate is not None):
        raise admin.AdminError("give --rate (and maybe --burst), or --none")
    return admin.rate_limit(a.rate, a.burst)


async def _desk_limit(conn: asyncpg.Connection, ids: Snowflake, a: argparse.Namespace) -> Output:
    out = await admin.set_desk_limit(conn, a.subdomain, _new_limit(a))
    return out, _limit_said(out)


async def _token_limit(conn: asyncpg.Connection, ids: Snowflake, a: argparse.Namespace) -> Output:
    out = await admin.set_token_limit(conn, a.desk, a.id, _new_limit(a))
    return out, _limit_said(out)


async def _token_revoke(conn: asyncpg.Connection, ids: Snowflake, a: argparse.Namespace) -> Output:
    done = await admin.revoke_token(conn, a.desk, a.id)
    return done, _said(done.changed, f"revoked token {a.id}", f"token {a.id} was already revoked")


async def _department_create(conn: asyncpg.Connection, ids: Snowflake, a: argparse.Namespace) -> Output:
    dep = await admin.create_department(conn, ids, a.desk, a.name, private=a.private, default=a.default)
    return dep, f"created department {dep.name} (id {dep.id})"


async def _department_list(conn: asyncpg.Connection, ids: Snowflake, a: argparse.Namespace) -> Output:
    departments = await admin.list_departments(conn, a.desk)
    lines = [
        f"{d.id}  {d.name}  {'public' if d.public else 'private'}"
        + ("  default" if d.default else "") + ("  deleted" if d.deleted else "")
        for d in departments
    ]
    return departments, "\n".join(lines)


async def _department_delete(conn: asyncpg.Connection, ids: Snowflake, a: argparse.Namespace) -> Output:
    done = await admin.delete_department(conn, a.desk, a.id)
    return done, _said(done.changed, f"deleted department {a.id}", f"department {a.id} was already deleted")


async def _ticket_type_create(conn: asyncpg.Connection, ids: Snowflake, a: argparse.Namespace) -> Output:
    kind = await admin.create_ticket_type(conn, ids, a.desk, a.name, default=a.default)
    return kind, f"created ticket type {kind.name} (id {kind.id})"


async def _ticket_type_list(conn: asyncpg.Connection, ids: Snowflake, a: argparse.Namespace) -> Output:
    kinds = await admin.list_ticket_types(conn, a.desk)
    lines = [
        f"{k.id}  {k.name}" + ("  default" if k.default else "") + ("  archived" if k.archived else "") for k in kinds
    ]
    return kinds, "\n".join(lines)


async def _ticket_type_archive(conn: asyncpg.Connection, ids: Snowflake, a: argparse.Namespace) -> Output:
    done = await admin.archive_ticket_type(conn, a.desk, a.id)
    return done, _said(done.changed, f"archived ticket type {a.id}", f"ticket type {a.id} was already archived")


async def _blocklist_add(conn: asyncpg.Connection, ids: Snowflake, a: argparse.Namespace) -> Output:
    done = await admin.add_blocklist(conn, a.desk, a.entry)
    return done, _said(done.changed, f"blocked {done.entry}", f"{done.entry} was already blocked")


async def _blocklist_remove(conn: asyncpg.Connection, ids: Snowflake, a: argparse.Namespace) -> Output:
    done = await admin.remove_blocklist(conn, a.desk, a.entry)
    return done, _said(done.changed, f"unblocked {done.entry}", f"{done.entry} was not on the blocklist")


async def _blocklist_list(conn: asyncpg.Connection, ids: Snowflake, a: argparse.Namespace) -> Output:
    entries = await admin.list_blocklist(conn, a.desk)
    return [admin.BlocklistListed(e) for e in entries], "\n".join(entries) or f"the blocklist of desk {a.desk} is empty"


class _Parser(argparse.ArgumentParser):
    """Usage mistakes (a bad id, a missing argument) are wrong input like any other: one line, exit 1."""

    choices_hint = ""  # for a parser of commands or actions: what may follow, named when nothing did

    def error(self, message: str) -> NoReturn:
        if self.choices_hint and message.startswith("the following arguments are required: "):
            message = f"choose one of {self.choices_hint}"
        self.exit(1, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _at_least_one(value: str) -> int:
    if not (value.isascii() and value.isdigit()) or int(value) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number, at least 1, not {value!r}")
    return int(value)


def _port(value: str) -> int:
    if not (value.isascii() and value.isdigit()) or not 0 < int(value) < 65536:
        raise argparse.ArgumentTypeError(f"not a port (1 to 65535): {value!r}")
    return int(value)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Examples keep their lines; a name as long as ticket-type keeps its help on the same line."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30)

    def add_argument(self, action: argparse.Action) -> None:
        super().add_argument(action)
        # argparse measures subcommand names without the indent it then prints them at.
        if isinstance(action, argparse._SubParsersAction) and action.choices:
            longest = max(map(len, action.choices)) + self._current_indent + 2 * self._indent_increment
            self._action_max_length = max(self._action_max_length, longest)


_TOP_EXAMPLES = """\
first steps:
  headoni serve                          start the API (on first start: desk acme and a token)
  headoni desk list                      the desks there are
  headoni token create --desk acme --name Importer --scope tickets:create

every command takes --json (JSON, one object per line); see headoni COMMAND --help"""


def parser() -> argparse.ArgumentParser:
    fmt = _Formatter
    top = _Parser(prog="headoni", description="Headoni ticket intake API.", epilog=_TOP_EXAMPLES, formatter_class=fmt)
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")

    def command(under: Any, name: str, summary: str, example: str, run: Command | None, *, desk: bool = True) -> Any:
        p = under.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".",
                             epilog=f"example:\n  {example}", formatter_class=fmt)
        if desk:
            p.add_argument("--desk", required=True, metavar="SUBDOMAIN", help="the desk, by its subdomain")
        p.add_argument("--json", action="store_true", help="print JSON, one object per line")
        p.set_defaults(run=run)
        p.example = example
        return p

    def group(name: str, summary: str) -> tuple[Any, Any]:
        g = commands.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".",
                                formatter_class=fmt)
        return g, g.add_subparsers(dest="action", required=True, metavar="ACTION", title="actions")

    def examples(g: Any, actions: Any) -> None:
        names = list(actions.choices)
        g.choices_hint = ", ".join(names)
        g.epilog = "examples:\n" + "\n".join(f"  {actions.choices[n].example}" for n in names)

    def limit_arguments(p: Any, *, clearable: bool) -> None:
        p.add_argument("--rate", help="creates allowed: N/s, N/min, N/h or N/<k>s, e.g. 600/min")
        p.add_argument("--burst", type=_at_least_one, help="units at once from a full budget (default: the "
                       "rate's count, at most 100)")
        if clearable:
            p.add_argument("--none", action="store_true", help="remove the limit")

    command(commands, "migrate", "apply pending database migrations",
            "headoni migrate", _migrate, desk=False)
    p = command(commands, "serve", "migrate, then serve the HTTP API",
                "headoni serve --port 8001 --workers 2", None, desk=False)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--workers", type=_at_least_one, help="server processes (default HEADONI_WORKERS, else 1)")

    g, sub = group("desk", "manage desks")
    p = command(sub, "create", "make a desk, with its default department and ticket type",
                'headoni desk create acme --name "Acme Inc"', _desk_create, desk=False)
    p.add_argument("subdomain", help="the desk's host label: acme for acme.headoni.app")
    p.add_argument("--name", help="display name (default: the subdomain)")
    command(sub, "list", "list every desk", "headoni desk list", _desk_list, desk=False)
    p = command(sub, "limit", "set or remove the desk's default rate limit",
                "headoni desk limit acme --rate 600/min --burst 100", _desk_limit, desk=False)
    p.add_argument("subdomain", help="the desk's subdomain")
    limit_arguments(p, clearable=True)
    examples(g, sub)

    g, sub = group("token", "manage API tokens")
    p = command(sub, "create", "make a token; its secret is shown only now",
                "headoni token create --desk acme --name Importer --scope tickets:create", _token_create)
    p.add_argument("--name", required=True, help="shown on the tickets it creates as API Via NAME")
    p.add_argument("--scope", action="append", required=True, help="tickets:create or tickets:read; repeatable")
    limit_arguments(p, clearable=False)
    command(sub, "list", "list the desk's tokens, revoked ones too (never a secret)",
            "headoni token list --desk acme", _token_list)
    command(sub, "revoke", "revoke a token (within HEADONI_TOKEN_CACHE_SECONDS)",
            "headoni token revoke --desk acme 1575398954495905795", _token_revoke).add_argument(
        "id", type=_positive_id, help="the token's id (see token list)")
    p = command(sub, "limit", "set or remove a token's own rate limit",
                "headoni token limit --desk acme 1575398954495905795 --rate 10/s", _token_limit)
    p.add_argument("id", type=_positive_id, help="the token's id (see token list)")
    limit_arguments(p, clearable=True)
    examples(g, sub)

    # Departments and ticket types: create, list, and retire (delete or archive), alike.
    for name, what, example, create, listing, (verb, gone, retire), shown_id in (
        ("department", "department", "Billing --private", _department_create, _department_list,
         ("delete", "deleted", _department_delete), "1575398954495905793"),
        ("ticket-type", "ticket type", "Bug", _ticket_type_create, _ticket_type_list,
         ("archive", "archived", _ticket_type_archive), "1575398954495905794"),
    ):
        g, sub = group(name, f"manage {what}s")
        p = command(sub, "create", f"make a {what}", f"headoni {name} create --desk acme {example}", create)
        p.add_argument("name")
        if name == "department":
            p.add_argument("--private", action="store_true", help="not public (tickets may still name it)")
        p.add_argument("--default", action="store_true", help=f"make it the desk's default {what}")
        command(sub, "list", f"list the desk's {what}s, {gone} ones too", f"headoni {name} list --desk acme", listing)
        p = command(sub, verb, f"{'soft-delete' if verb == 'delete' else verb} a {what} (not the default)",
                    f"headoni {name} {verb} --desk acme {shown_id}", retire)
        p.add_argument("id", type=_positive_id, help=f"the {what}'s id (see {name} list)")
        examples(g, sub)

    g, sub = group("blocklist", "manage the desk's blocklist of addresses and domains")
    for name, summary, example, run in (
        ("add", "block an address or a whole domain", "headoni blocklist add --desk acme spam.example", _blocklist_add),
        ("remove", "unblock an address or domain", "headoni blocklist remove --desk acme bob@spam.example",
         _blocklist_remove),
        ("list", "list the desk's blocked addresses and domains", "headoni blocklist list --desk acme",
         _blocklist_list),
    ):
        p = command(sub, name, summary, example, run)
        if name != "list":
            p.add_argument("entry", help="an address (bob@spam.example) or a domain (spam.example), any case")
    examples(g, sub)

    top.choices_hint = ", ".join(commands.choices)
    return top


def _emit(value: Any, text: str, as_json: bool) -> None:
    if not as_json:
        if text:
            print(text)
        return
    for item in value if isinstance(value, list) else [value]:
        sys.stdout.write(_encode(item).decode() + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        config = settings.load()
    except ValueError as exc:  # a malformed HEADONI_* variable
        print(f"headoni: {exc}", file=sys.stderr)
        return 1
    try:
        if args.run is None:
            return serve.serve(config, args.host, args.port, args.workers or config.workers, as_json=args.json)
        value, text = asyncio.run(_with_database(args.run, args, db.database_url(config)))
    except (admin.AdminError, db.DatabaseUnreachable, db.NoDatabase, serve.CannotServe, citus.Unsupported) as exc:
        print(f"headoni: {exc}", file=sys.stderr)
        return 1
    _emit(value, text, args.json)
    return 0
