"""The stress harness's load: clients over real HTTP that contend by design, and administration from the CLI.

Every request carries a subject no other request carries, so what it wrote, or did not write, can be found
in the database afterwards. Requesters are shared: each desk's creates draw from one small pool of emails,
so concurrent statements meet on the same users rows, and "collisions" send the first use of a fresh email
from several requests at once, each riding its own statement (Idempotency-Key), a shared one (plain
creates), or a batch's.
"""

import asyncio
import itertools
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Final

import httpx

from bench.server import ROOT

SHARED_EMAILS: Final = 12  # requesters per desk that every kind of create draws from
BLOCKED_DOMAIN: Final = "blocked.example"  # put on and taken off the hot desks' blocklists while creates run
OK_STATUSES: Final = frozenset({200, 201, 400})  # blocked, created, or a department/type deleted meanwhile


@dataclass
class Desk:
    subdomain: str
    desk_id: int
    secret: str
    token_id: int
    token_name: str
    hot: bool
    departments: list[str] = field(default_factory=list)  # non-default ids that creates name ...
    ticket_types: list[str] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)  # ... and deleted or archived ones they still name
    blocked: bool = False

    def headers(self, **extra: str) -> dict[str, str]:
        return {"Host": f"{self.subdomain}.localhost", "Authorization": f"Bearer {self.secret}", **extra}


def _described(exc: BaseException) -> str:
    """The error with what caused it: httpx's ReadError alone often says nothing (a reset, or the peer's FIN)."""
    parts, seen = [], set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        parts.append(f"{type(cause).__name__}: {cause}".rstrip(": "))
        cause = cause.__cause__ or cause.__context__
    return " <- ".join(parts)


@dataclass
class Sent:
    """One ticket as a request sent it."""

    subject: str
    email: str  # as stored: trimmed and lowercased
    body: str


@dataclass
class Call:
    """One request and its answer."""

    kind: str
    desk: Desk
    items: list[Sent]
    key: str | None
    sent: float
    received: float = 0.0
    status: int = 0  # 0: no answer (a transport error or a timeout)
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    error: str = ""
    request_id: str = ""

    def results(self) -> list[dict[str, Any]]:
        """Per item: the answer of a single create, or the batch's result for it."""
        if self.status == 0:
            return []
        answer = json.loads(self.body)
        if self.kind.startswith("batch") and self.status == 200 and "results" in answer:
            return list(answer["results"])
        return [{"status": self.status, **answer}]


@dataclass
class Load:
    calls: list[Call] = field(default_factory=list)
    replays: list[list[Call]] = field(default_factory=list)  # calls that shared one Idempotency-Key
    admin: Counter[str] = field(default_factory=Counter)
    admin_failures: list[str] = field(default_factory=list)


class Clients:
    """Runs the load: `clients` tasks choosing actions at random until the deadline."""

    def __init__(self, base_url: str, url: str, desks: list[Desk], seed: int) -> None:
        self.base_url = base_url
        self.url = url  # the database, for the CLI
        self.desks = desks
        self.hot = [d for d in desks if d.hot]
        self.rng = random.Random(seed)
        self.load = Load()
        self._seq = itertools.count(1)
        self._run = f"{seed:x}"

    def _desk(self) -> Desk:
        return self.rng.choice(self.hot if self.rng.random() < 0.5 else self.desks)

    def _item(self, desk: Desk, email: str | None = None) -> tuple[dict[str, Any], Sent]:
        n = next(self._seq)
        roll = self.rng.random()
        if email is None:
            if roll < 0.6:
                email = f"shared{self.rng.randrange(SHARED_EMAILS)}@customer.example"
            elif roll < 0.9 or not desk.hot:
                email = f"fresh{self._run}x{n}@customer.example"
            else:
                email = f"someone{self.rng.randrange(4)}@{BLOCKED_DOMAIN}"
        subject = f"stress {self._run} #{n}"
        body = f"Body of {subject}: kept verbatim.\n  Indented line."
        item: dict[str, Any] = {"email": email.upper() if n % 7 == 0 else email, "subject": subject, "body": body}
        item["priority"] = self.rng.choice(["low", "normal", "high", "urgent"])
        if desk.departments and self.rng.random() < 0.2:
            item["departmentId"] = self.rng.choice(desk.departments + desk.gone)
        if desk.ticket_types and self.rng.random() < 0.2:
            item["ticketTypeId"] = self.rng.choice(desk.ticket_types + desk.gone)
        return item, Sent(subject, email.lower(), body)

    async def _send(self, http: httpx.AsyncClient, call: Call, path: str, payload: Any) -> Call:
        call.request_id = f"stress-{self._run}-{next(self._seq)}"  # the server logs it: a failure can be looked up
        headers = call.desk.headers(
            **({"Idempotency-Key": call.key} if call.key else {}), **{"X-Request-Id": call.request_id}
        )
        call.sent = time.monotonic()
        try:
            response = await http.post(path, json=payload, headers=headers)
        except httpx.HTTPError as exc:
            call.received, call.error = time.monotonic(), _described(exc)
        else:
            call.received = time.monotonic()
            call.status, call.body, call.headers = response.status_code, response.content, dict(response.headers)
        self.load.calls.append(call)
        return call

    async def single(self, http: httpx.AsyncClient, desk: Desk, email: str | None = None, key: str | None = None,
                     item: tuple[dict[str, Any], Sent] | None = None) -> Call:
        payload, sent = item or self._item(desk, email)
        return await self._send(http, Call("keyed" if key else "single", desk, [sent], key, 0.0), "/api/v1/tickets",
                                payload)

    async def batch(self, http: httpx.AsyncClient, desk: Desk, emails: list[str | None] | None = None) -> Call:
        if emails is None:
            repeated = f"fresh{self._run}x{next(self._seq)}@customer.example"
            emails = [None] * self.rng.randint(1, 12) + [repeated, repeated]
            self.rng.shuffle(emails)
        items = [self._item(desk, e) for e in emails]
        call = Call("batch", desk, [sent for _, sent in items], None, 0.0)
        return await self._send(http, call, "/api/v1/tickets/batch", {"tickets": [p for p, _ in items]})

    async def collide(self, http: httpx.AsyncClient) -> None:
        """The first use of a fresh email on every hot desk at once, by ten requests per desk: six keyed
        creates (each its own statement), two plain creates (shared statements) and two one-item batches."""
        email = f"first{self._run}x{next(self._seq)}@customer.example"
        await asyncio.gather(*(
            request
            for desk in self.hot
            for request in (
                *(self.single(http, desk, email, key=f"k{self._run}x{next(self._seq)}") for _ in range(6)),
                *(self.single(http, desk, email) for _ in range(2)),
                *(self.batch(http, desk, [email]) for _ in range(2)),
            )
        ))

    async def replay(self, http: httpx.AsyncClient) -> None:
        """One Idempotency-Key sent by three requests at once, then once more: one write, four equal answers."""
        desk = self._desk()
        key = f"r{self._run}x{next(self._seq)}"
        item = self._item(desk)
        calls = list(await asyncio.gather(*(self.single(http, desk, key=key, item=item) for _ in range(3))))
        calls.append(await self.single(http, desk, key=key, item=item))
        self.load.replays.append(calls)

    async def client(self, http: httpx.AsyncClient, deadline: float, most: int) -> None:
        while time.monotonic() < deadline and len(self.load.calls) < most:
            roll = self.rng.random()
            if roll < 0.55:
                await self.single(http, self._desk())
            elif roll < 0.7:
                await self.batch(http, self._desk())
            elif roll < 0.85:
                await self.collide(http)
            else:
                await self.replay(http)

    async def run(self, clients: int, seconds: float, most: int) -> Load:
        """Until `seconds` have passed or `most` requests have been answered (actions under way finish)."""
        deadline = time.monotonic() + seconds
        # A new connection for every request: no connection is kept idle, by either side. Kept-alive
        # connections lost answers here in two ways that are the client's, not the server's: one the
        # server is closing after its keep-alive timeout (uvicorn's 5 s) may take a request at that very
        # moment; and httpcore 1.0's pool, when it closes several expired connections in one pass, yields
        # between closes, so a request handed one of them earlier can start on it meanwhile and then have
        # it closed under it while it reads the answer (`ReadError <- ClosedResourceError`). Seen with
        # keepalive_expiry=1.0 under this load: 3 of 72,000 requests, the server's access log showing
        # each answered (201) or the client gone (499 client_disconnected), the client's loop seconds late.
        connections = clients * 30
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=self.base_url, timeout=30.0, limits=limits) as http:
            loops = [self.client(http, deadline, most) for _ in range(clients)]
            await asyncio.gather(self.administer(deadline), *loops)
        return self.load

    # Administration, through the real command line, one command at a time, on the hot desks.

    async def cli(self, *args: str, answer: bool = False) -> Any:
        """Run `headoni ARGS` (with --json when an answer is wanted): that JSON, {} without, or None after a
        failure, which is recorded."""
        env = {**os.environ, "DATABASE_URL": self.url}
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "app", *args, *(["--json"] if answer else []), cwd=ROOT, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        out, err = await process.communicate()
        self.load.admin[" ".join(args[:2])] += 1
        if process.returncode != 0:
            failure = f"headoni {' '.join(args)}: exit {process.returncode}: {err.decode()[-300:]}"
            self.load.admin_failures.append(failure)
            return None
        lines = [line for line in out.decode().splitlines() if line.strip()]
        return json.loads(lines[-1]) if answer and lines else {}

    async def administer(self, deadline: float) -> None:
        """Blocklist changes, department deletes, ticket-type archives and default moves while creates run."""
        steps = itertools.cycle([self._blocklist, self._department, self._ticket_type, self._default])
        while time.monotonic() < deadline:
            await next(steps)(self.rng.choice(self.hot))

    async def _blocklist(self, desk: Desk) -> None:
        """Block the domain (as typed in capitals: entries match case-insensitively), or unblock it."""
        action = "remove" if desk.blocked else "add"
        if await self.cli("blocklist", action, "--desk", desk.subdomain, BLOCKED_DOMAIN.upper()) is not None:
            desk.blocked = not desk.blocked

    async def _department(self, desk: Desk) -> None:
        await self._churn(desk, "department", "delete", desk.departments)

    async def _ticket_type(self, desk: Desk) -> None:
        await self._churn(desk, "ticket-type", "archive", desk.ticket_types)

    async def _churn(self, desk: Desk, group: str, retire: str, live: list[str]) -> None:
        """Make a department (or ticket type) that creates start naming, or retire one they name: they go
        on naming it, and get 400 department_not_found (ticket_type_not_found)."""
        if len(live) < 2:
            made = await self.cli(group, "create", "--desk", desk.subdomain, f"{group} {next(self._seq)}", answer=True)
            if made:
                live.append(made["id"])
        else:
            gone = live.pop(0)
            await self.cli(group, retire, "--desk", desk.subdomain, gone)
            desk.gone.append(gone)

    async def _default(self, desk: Desk) -> None:
        """Move the desk's default department or ticket type to a new one."""
        group = self.rng.choice(["department", "ticket-type"])
        await self.cli(group, "create", "--desk", desk.subdomain, f"Default {next(self._seq)}", "--default")
