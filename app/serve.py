"""`headoni serve`: check the port, migrate, say how to start, then hand over to uvicorn."""

import asyncio
import errno
import os
import shlex
import signal
import socket
import sys
from typing import Any

import asyncpg
import msgspec

from app import admin, citus, db, settings
from app.ids import WorkerLease

QUICKSTART_DESK = "acme"
# The source document's example request, less the ids (a new desk's are its own): the README starts from it.
_TRY_BODY = (
    '{"email": "alice@example.com", "name": "Alice", "subject": "Login broken on staging",'
    ' "body": "I loop back to /sign-in after typing my email.", "priority": "high"}'
)


class CannotServe(Exception):
    """`serve` cannot start: one line for the user, exit code 1."""


class Started(msgspec.Struct, omit_defaults=True):
    """What `serve --json` prints before serving: where to go, and what to run next."""

    desks: int
    desk: str | None = None
    url: str | None = None
    docs: str | None = None
    token: admin.TokenOut | None = None  # only on the first start, which made it: its secret is shown only now
    curl: str | None = None
    next: str | None = None  # a command to run: make a desk, or a token


def check_port(host: str, port: int) -> None:
    """Bind and release every address uvicorn will listen on, as it will (SO_REUSEADDR), so a port in
    use is one line before any work rather than a traceback after migrating."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise CannotServe(f"cannot listen on {host}: {exc.strerror}") from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise CannotServe(f"port {port} is in use; try --port") from None
                if exc.errno == errno.EADDRNOTAVAIL:  # that family is not enabled here; asyncio skips it too
                    continue
                raise CannotServe(f"cannot listen on {host} port {port}: {exc.strerror}") from None


def _token_hint(desk: str) -> str:
    return f"headoni token create --desk {desk} --name NAME --scope tickets:create --scope tickets:read"


async def _prepare(url: str, embedded: bool, config: settings.Settings, port: int) -> Started:
    """Wait for the database (up to the startup timeout) and migrate; on an empty embedded database,
    make desk acme and a token. Say where to go and what to run next."""
    await db.wait_until_reachable(url, config.startup_timeout)
    conn = await asyncpg.connect(url)
    try:
        await db.migrate(conn)
        await citus.settle(conn, config)  # refuses what this database cannot serve, before uvicorn starts
        desks = await conn.fetch(
            "SELECT subdomain, count(*) OVER () FROM desks ORDER BY subdomain <> $1, subdomain LIMIT 1",
            QUICKSTART_DESK,
        )
        token = None
        if not desks and embedded:
            lease = await WorkerLease.acquire(url)
            try:
                ids = lease.snowflake()
                await admin.create_desk(conn, ids, QUICKSTART_DESK, "Acme")
                token = await admin.create_token(
                    conn, ids, QUICKSTART_DESK, "Quickstart", ["tickets:create", "tickets:read"]
                )
            finally:
                await lease.close()
    finally:
        await conn.close()
    if not desks and token is None:
        return Started(0, next="headoni desk create SUBDOMAIN")
    desk, count = (desks[0][0], int(desks[0][1])) if desks else (QUICKSTART_DESK, 1)
    base = f"http://{desk}.{config.base_domain}" + (f":{port}" if port != 80 else "")
    started = Started(count, desk, base, f"{base}/docs")
    if token is None:
        started.next = _token_hint(desk)
        return started
    started.token = token
    started.curl = (
        f"curl -i -X POST {base}/api/v1/tickets -H {shlex.quote('Authorization: Bearer ' + token.secret)}"
        f" -H 'Content-Type: application/json' -d {shlex.quote(_TRY_BODY)}"
    )
    return started


def _say(started: Started) -> str:
    if started.desks == 0:
        return f"No desk yet. Make one: {started.next}"
    if started.token is not None:
        return (
            f"Created desk '{started.desk}' and a token named {started.token.name}"
            f" ({' '.join(started.token.scopes)}). Its secret, shown only now:\n\n{started.token.secret}\n\n"
            f"Try it (this makes ticket 1):\n\n{started.curl}\n\n"
            f"The API reference, with Try it out: {started.docs}\n"
        )
    others = f" and {started.desks - 1} more" if started.desks > 1 else ""
    return (
        f"Desk {started.desk}{others}: {started.url}; the API reference: {started.docs}\n"
        f"Need a token? {started.next}"
    )


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM ends `serve` as a normal exit (status 0), so atexit stops the embedded PostgreSQL.

    uvicorn shuts down gracefully on SIGTERM, then raises the signal again under the handler it found:
    with Python's default one the process would die there, skip atexit and leave the server running."""
    raise SystemExit(0)


def serve(config: settings.Settings, host: str, port: int, workers: int, *, as_json: bool = False) -> int:
    import uvicorn

    from app import logs, metrics_dir

    check_port(host, port)
    try:  # before any work, and before anything imports prometheus-client
        metrics_dir.prepare_multiprocess_dir(workers)
    except metrics_dir.MetricsDirectoryError as exc:
        raise CannotServe(str(exc)) from None
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    url = db.database_url(config)
    started = asyncio.run(_prepare(url, config.database_url is None, config, port))
    sys.stdout.write(msgspec.json.encode(started).decode() + "\n" if as_json else _say(started) + "\n")
    sys.stdout.flush()
    # Workers are fresh processes: they find the database through the environment.
    os.environ["DATABASE_URL"] = url
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        loop="uvloop",
        http="app.http:BoundedHttpToolsProtocol",  # httptools, with the limits of app/http.py
        ws="none",  # no WebSocket routes: an Upgrade request is answered as a plain one
        server_header=False,
        proxy_headers=False,  # nothing here reads the client's address or scheme: no X-Forwarded-* to parse
        log_config=logs.logging_config(),
        access_log=False,
        timeout_graceful_shutdown=20,
    )
    return 0
