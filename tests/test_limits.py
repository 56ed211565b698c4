"""Rate limits over HTTP, in the contract's order, with the RateLimit fields checked by a real
Structured Fields parser (http-sf); and the limiter's buckets shared by several limiters."""

import asyncio
import math
import os
import time
from pathlib import Path
from typing import Any

import asyncpg
import http_sf
import httpx
import msgspec
import pytest

from app import admin, rates, settings
from app.auth import Token
from app.errors import RateLimited
from app.ids import Snowflake
from app.limiter import MAX_PAUSE, POLICY, Limiter, slice_of
from app.rates import Limit, parse_rate
from bench.server import Server
from tests.support.api import TICKETS, assert_error, written
from tests.support.app import app_client
from tests.support.desks import Desk, ticket_body
from tests.support.servers import serving
from tests.test_cli import assert_one_line_error, headoni, headoni_all, new_desk, ok_json
from tests.test_openapi import check

BATCH = "/api/v1/tickets/batch"


async def limit_token(pool: asyncpg.Pool, desk: Desk, rate: str, burst: int | None = None) -> Limit:
    limit = parse_rate(rate, burst)
    async with pool.acquire() as conn:
        await admin.set_token_limit(conn, desk.subdomain, int(desk.token_id), limit)
    return limit


def fields(response: httpx.Response) -> tuple[dict[str, Any], dict[str, Any]]:
    """The RateLimit-Policy and RateLimit fields, parsed as Structured Field Lists; each must hold
    exactly one item, the string "creates", with the draft's parameters."""
    policy: Any = http_sf.parse(response.headers["ratelimit-policy"].encode(), tltype="list")
    state: Any = http_sf.parse(response.headers["ratelimit"].encode(), tltype="list")
    assert [item for item, _ in policy] == [POLICY] and [item for item, _ in state] == [POLICY]
    policy_params, state_params = policy[0][1], state[0][1]
    assert isinstance(policy_params["q"], int) and policy_params["q"] >= 0
    assert isinstance(policy_params["w"], int) and policy_params["w"] > 0
    assert isinstance(state_params["r"], int) and state_params["r"] >= 0
    assert "t" not in state_params or (isinstance(state_params["t"], int) and state_params["t"] >= 0)
    return policy_params, state_params


def test_rates_are_written_as_units_per_period() -> None:
    assert parse_rate("600/min") == Limit(600, 60, 100)
    assert parse_rate("10/s", 3) == Limit(10, 1, 3)
    assert parse_rate(" 5000 / h ") == Limit(5000, 3600, 100)
    assert parse_rate("7/10s") == Limit(7, 10, 7)
    assert parse_rate("600/min").rate == "600/min" and parse_rate("7/10s").rate == "7/10s"
    assert rates.from_columns(None, None, None) is None and rates.from_columns(5, 60, 5) == Limit(5, 60, 5)
    for bad in ("", "600", "600/day", "0/min", "-1/s", "1/0s", "10/2min", "1e3/s"):
        with pytest.raises(ValueError):
            parse_rate(bad)
    with pytest.raises(ValueError):
        parse_rate("10/s", 0)


def test_a_malformed_default_rate_is_refused_with_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEADONI_DEFAULT_RATE", "lots")
    with pytest.raises(ValueError, match="HEADONI_DEFAULT_RATE"):
        settings.load()
    monkeypatch.setenv("HEADONI_DEFAULT_RATE", "60/min")
    monkeypatch.setenv("HEADONI_DEFAULT_BURST", "5")
    assert settings.load().default_limit == Limit(60, 60, 5)
    monkeypatch.setenv("HEADONI_RATE_LIMITS", "maybe")
    with pytest.raises(ValueError, match="HEADONI_RATE_LIMITS"):
        settings.load()


async def test_over_its_limit_a_token_gets_429_with_retry_after_and_the_fields(
    client: httpx.AsyncClient, pool: asyncpg.Pool, desk: Desk
) -> None:
    await limit_token(pool, desk, "3/min", 3)
    remaining = []
    for i in range(3):
        response = await client.post(TICKETS, json=ticket_body(email=f"u{i}@example.com"), headers=desk.headers())
        assert response.status_code == 201
        policy, state = fields(response)
        assert policy == {"q": 3, "w": 60, "headoni-burst": 3}
        remaining.append(state["r"])
    assert remaining == [2, 1, 0]
    limited = await client.post(TICKETS, json=ticket_body(), headers=desk.headers())
    assert_error(limited, 429, "rate_limited")
    retry_after = int(limited.headers["retry-after"])
    _, state = fields(limited)
    assert state["r"] == 0 and 1 <= state["t"] <= retry_after <= 20  # a unit comes every 20 s
    assert (await written(pool, desk))["tickets"] == 3


async def test_the_order_of_checks_puts_429_after_the_body_and_before_the_department(
    client: httpx.AsyncClient, pool: asyncpg.Pool, desk: Desk
) -> None:
    await limit_token(pool, desk, "2/min", 2)
    invalid = await client.post(TICKETS, json={"email": "nope"}, headers=desk.headers())
    assert invalid.status_code == 400 and invalid.json()["error"] == "invalid_body"
    assert fields(invalid)[1]["r"] == 2  # a malformed body costs nothing
    unknown = await client.post(TICKETS, json=ticket_body(departmentId="42"), headers=desk.headers())
    assert unknown.json()["error"] == "department_not_found"
    assert fields(unknown)[1]["r"] == 1  # charged: the limit is checked before the department
    assert (await client.post(TICKETS, json=ticket_body(), headers=desk.headers())).status_code == 201
    assert_error(await client.post(TICKETS, json=ticket_body(departmentId="42"), headers=desk.headers()),
                 429, "rate_limited")
    still_invalid = await client.post(TICKETS, json={"subject": ""}, headers=desk.headers())
    assert still_invalid.json()["error"] == "invalid_body"  # 400 invalid_body comes before 429
    other_host = await client.post(TICKETS, json=ticket_body(), headers=desk.headers(Host="other.localhost"))
    assert_error(other_host, 403, "token_desk_mismatch")
    assert "ratelimit" not in other_host.headers  # before the token is accepted there is no quota to describe


async def test_a_blocked_requester_is_charged_like_any_create(
    client: httpx.AsyncClient, pool: asyncpg.Pool, desk: Desk
) -> None:
    await limit_token(pool, desk, "2/min", 2)
    async with pool.acquire() as conn:
        await admin.add_blocklist(conn, desk.subdomain, "spam.example")
    blocked = await client.post(TICKETS, json=ticket_body(email="bob@spam.example"), headers=desk.headers())
    assert (blocked.status_code, blocked.json()) == (200, {"ok": True})
    created = await client.post(TICKETS, json=ticket_body(), headers=desk.headers())
    assert created.status_code == 201
    assert fields(blocked)[1]["r"] == 1 and fields(created)[1]["r"] == 0
    over = await client.post(TICKETS, json=ticket_body(email="bob@spam.example"), headers=desk.headers())
    assert_error(over, 429, "rate_limited")  # the limit reveals nothing about the blocklist


async def test_a_batch_costs_one_unit_per_valid_item(client: httpx.AsyncClient, pool: asyncpg.Pool, desk: Desk) -> None:
    await limit_token(pool, desk, "5/min", 5)
    items = [ticket_body(email="a@example.com"), {"email": "nope"}, ticket_body(email="b@example.com")]
    response = await client.post(BATCH, json={"tickets": items}, headers=desk.headers())
    assert [r["status"] for r in response.json()["results"]] == [201, 400, 201]
    assert fields(response)[1]["r"] == 3
    none_valid = await client.post(BATCH, json={"tickets": [{"email": "nope"}]}, headers=desk.headers())
    assert none_valid.status_code == 200 and fields(none_valid)[1]["r"] == 3
    four = [ticket_body(email=f"c{i}@example.com") for i in range(4)]
    assert_error(await client.post(BATCH, json={"tickets": four}, headers=desk.headers()), 429, "rate_limited")
    assert (await written(pool, desk))["tickets"] == 2  # a refused batch writes nothing
    six = [ticket_body(email=f"d{i}@example.com") for i in range(6)]
    beyond = await client.post(BATCH, json={"tickets": six}, headers=desk.headers())
    assert_error(beyond, 429, "rate_limited")
    assert "burst of 5" in beyond.json()["message"]


async def test_every_answer_after_the_token_carries_fields_a_real_parser_reads(
    client: httpx.AsyncClient, pool: asyncpg.Pool, desk: Desk
) -> None:
    await limit_token(pool, desk, "600/min", 50)
    doc = (await client.get("/api/v1/openapi.json", headers={"Host": "localhost"})).json()
    answers = [
        await client.post(TICKETS, json=ticket_body(), headers=desk.headers()),
        await client.post(TICKETS, json={"email": 5}, headers=desk.headers()),
        await client.post(TICKETS, json=ticket_body(ticketTypeId="9"), headers=desk.headers()),
        await client.post(TICKETS, content=b"x" * (1024 * 1024 + 1), headers=desk.headers()),
        await client.post(BATCH, json={"tickets": [ticket_body()]}, headers=desk.headers()),
    ]
    assert [a.status_code for a in answers] == [201, 400, 400, 413, 200]
    for answer in answers:
        policy, state = fields(answer)
        assert policy == {"q": 600, "w": 60, "headoni-burst": 50} and state["r"] <= 50
        check(doc, "POST", BATCH if answer.status_code == 200 else TICKETS, answer)
    read = await client.get("/api/v1/tickets/1", headers=desk.headers())
    assert read.status_code == 200 and "ratelimit" not in read.headers  # GETs do not share the budget


async def test_a_desk_default_applies_to_tokens_without_their_own(
    client: httpx.AsyncClient, pool: asyncpg.Pool, ids: Snowflake, desk: Desk
) -> None:
    async with pool.acquire() as conn:
        await admin.set_desk_limit(conn, desk.subdomain, parse_rate("1/min", 1))
        own = await admin.create_token(conn, ids, desk.subdomain, "Own", ["tickets:create"], parse_rate("5/min"))
        listed = {t.name: (t.rate, t.burst, t.limitFrom) for t in await admin.list_tokens(conn, desk.subdomain)}
    assert listed == {"Test Suite": ("1/min", 1, "desk"), "Own": ("5/min", 5, "token")}
    assert (await client.post(TICKETS, json=ticket_body(), headers=desk.headers())).status_code == 201
    assert_error(await client.post(TICKETS, json=ticket_body(), headers=desk.headers()), 429, "rate_limited")
    assert own.secret is not None
    other = await client.post(TICKETS, json=ticket_body(), headers=desk.headers(own.secret))
    assert other.status_code == 201 and fields(other)[0]["q"] == 5  # a token's own limit, and its own bucket


async def test_with_limits_off_or_none_set_nothing_is_limited_and_no_fields_are_sent(
    config: settings.Settings, database_url: str, pool: asyncpg.Pool, desk: Desk
) -> None:
    await limit_token(pool, desk, "1/min", 1)
    off = msgspec.structs.replace(config, rate_limits=False)
    async with app_client(off, database_url) as client:
        for _ in range(3):
            response = await client.post(TICKETS, json=ticket_body(), headers=desk.headers())
            assert response.status_code == 201 and "ratelimit" not in response.headers
    async with pool.acquire() as conn:
        await admin.set_token_limit(conn, desk.subdomain, int(desk.token_id), None)
    default = msgspec.structs.replace(config, default_rate=parse_rate("2/min", 1))
    async with app_client(default, database_url) as client:
        first = await client.post(TICKETS, json=ticket_body(), headers=desk.headers())
        assert first.status_code == 201 and fields(first)[0]["q"] == 2  # the service's default
        assert_error(await client.post(TICKETS, json=ticket_body(), headers=desk.headers()), 429, "rate_limited")


async def test_limited_and_shed_creates_are_counted_by_route_never_by_desk(
    client: httpx.AsyncClient, pool: asyncpg.Pool, desk: Desk
) -> None:
    def counted(text: str) -> float:
        series = 'headoni_rate_limited_total{route="/api/v1/tickets"}'
        line = next((x for x in text.splitlines() if x.startswith(series)), None)
        return float(line.rsplit(" ", 1)[1]) if line else 0.0

    before = counted((await client.get("/metrics")).text)
    await limit_token(pool, desk, "1/min", 1)
    await client.post(TICKETS, json=ticket_body(), headers=desk.headers())
    assert (await client.post(TICKETS, json=ticket_body(), headers=desk.headers())).status_code == 429
    text = (await client.get("/metrics")).text
    assert counted(text) == before + 1
    assert "# TYPE headoni_shed_total counter" in text
    assert desk.subdomain not in text and desk.token_id not in text


def token_of(desk: Desk, limit: Limit) -> Token:
    return msgspec.structs.replace(desk.token(), limit=limit)


async def flood(limiters: list[Limiter], token: Token, per_second: float, seconds: float) -> tuple[int, float]:
    """Offer creates to the limiters in turn at per_second for seconds; how many were allowed, and the
    seconds it took (more than planned when the machine is loaded)."""
    allowed = 0
    start = time.monotonic()
    for i in range(int(per_second * seconds)):
        await asyncio.sleep(max(0.0, start + i / per_second - time.monotonic()))
        try:
            await limiters[i % len(limiters)].admission(token).charge(1)
            allowed += 1
        except RateLimited:
            pass
    return allowed, time.monotonic() - start


async def test_two_limiters_sharing_a_bucket_hold_the_limit_within_ten_percent(
    database_url: str, desk: Desk
) -> None:
    """Two processes' limiters, a client at 3x its limit through both: it gets burst + rate x time."""
    limit = Limit(40, 1, 10)
    token = token_of(desk, limit)
    limiters = [await Limiter.open(database_url, None) for _ in range(2)]
    try:
        allowed, seconds = await flood(limiters, token, 3 * limit.units, 3.0)
    finally:
        for limiter in limiters:
            await limiter.close()
    expected = limit.burst + limit.units * seconds
    assert abs(allowed - expected) <= 0.1 * expected, (allowed, expected)


async def test_a_process_leases_slices_not_a_round_trip_per_request(database_url: str, desk: Desk) -> None:
    limit = Limit(1000, 1, 1000)
    token = token_of(desk, limit)
    limiter = await Limiter.open(database_url, None)
    leases = 0
    fetch = limiter._fetch_lease

    async def counting(*args: Any) -> tuple[int, int]:
        nonlocal leases
        leases += 1
        return await fetch(*args)

    limiter._fetch_lease = counting  # type: ignore[method-assign,assignment]  # a spy: the real lease runs
    try:
        for _ in range(500):
            await limiter.admission(token).charge(1)
    finally:
        await limiter.close()
    assert slice_of(limit) == 250 and leases <= math.ceil(500 / 250) + 1  # one round trip per slice



@pytest.mark.e2e
async def test_two_workers_hold_a_clients_limit_within_ten_percent(
    database_url: str, pool: asyncpg.Pool, desk: Desk, tmp_path: Path
) -> None:
    """`headoni serve --workers 2` over real HTTP, a client at 3x its limit on 8 connections (spread over
    both workers): it gets burst + rate x time, within 10% (the bench runs this for 60 s)."""
    limit = await limit_token(pool, desk, "40/s", 10)
    with serving(database_url, tmp_path / "serve.log", workers=2) as server:
        clients = [httpx.AsyncClient(base_url=server.base_url, timeout=10) for _ in range(8)]
        try:
            seconds, per_second = 5.0, 3 * limit.units
            start = time.monotonic()

            async def send(i: int) -> int:
                await asyncio.sleep(max(0.0, start + i / per_second - time.monotonic()))
                body = ticket_body(email=f"flood{i}@example.com")
                response = await clients[i % len(clients)].post(TICKETS, json=body, headers=desk.headers())
                return response.status_code

            statuses = await asyncio.gather(*(send(i) for i in range(int(seconds * per_second))))
            # The span the requests took, not the 5 s planned: a loaded machine, and the pause after a
            # 429 (the client then opens more connections), stretch it, and the limit allows rate x span.
            span = time.monotonic() - start
        finally:
            for client in clients:
                await client.aclose()
        processes = await pool.fetchval(
            "SELECT count(DISTINCT application_name) FROM pg_stat_activity WHERE application_name LIKE"
            " 'headoni-limits %' AND application_name <> $1 AND datname = current_database()",
            f"headoni-limits {os.getpid()}",  # not this test process's own, in-process apps
        )
    assert set(statuses) <= {201, 429}
    expected = limit.burst + limit.units * span
    assert abs(statuses.count(201) - expected) <= 0.1 * expected, (statuses.count(201), expected, span)
    assert processes == 2  # both workers leased from the bucket
    assert (await written(pool, desk))["tickets"] == statuses.count(201)


def test_the_command_line_sets_and_shows_limits(database_url: str) -> None:
    sub, _ = new_desk(database_url)
    created = ok_json(headoni(database_url, "token", "create", "--desk", sub, "--name", "Importer",
                              "--scope", "tickets:create", "--rate", "600/min", "--burst", "50", "--json"))
    assert (created["rate"], created["burst"], created["limitFrom"]) == ("600/min", 50, "token")
    plain = headoni(database_url, "token", "create", "--desk", sub, "--name", "Plain", "--scope", "tickets:read")
    assert plain.returncode == 0 and "burst" not in plain.stdout
    assert ok_json(headoni(database_url, "desk", "limit", sub, "--rate", "10/s", "--json")) == {
        "desk": sub, "rate": "10/s", "burst": 10
    }
    results = headoni_all(database_url, [
        ("token", "list", "--desk", sub, "--json"),
        ("token", "list", "--desk", sub),
        ("desk", "limit", sub, "--rate", "lots"),
        ("desk", "limit", sub),
        ("desk", "limit", sub, "--rate", "1/s", "--none"),
        ("token", "create", "--desk", sub, "--name", "X", "--scope", "tickets:create", "--burst", "5"),
        ("token", "limit", "--desk", sub, "999", "--rate", "1/s"),
        ("desk", "limit", sub, "--rate", "10/s"),
    ])
    listed = [msgspec.json.decode(line) for line in results[0].stdout.splitlines()]
    assert [(t["name"], t["rate"], t["burst"], t["limitFrom"]) for t in listed] == [
        ("Importer", "600/min", 50, "token"), ("Plain", "10/s", 10, "desk")
    ]
    assert all("secret" not in t for t in listed)
    assert "600/min burst 50 (token's)" in results[1].stdout and "10/s burst 10 (desk's)" in results[1].stdout
    assert_one_line_error(results[2], "bad rate 'lots'")
    assert_one_line_error(results[3], "--rate", "--none")
    assert_one_line_error(results[4], "--rate", "--none")
    assert_one_line_error(results[5], "--burst needs --rate")
    assert_one_line_error(results[6], "no token 999")
    repeat = f"desk {sub} had that already (10/s, burst 10); nothing changed\n"  # a repeat is a no-op
    assert (results[7].returncode, results[7].stdout) == (0, repeat)
    token = str(created["id"])
    assert headoni(database_url, "token", "limit", "--desk", sub, token, "--none").stdout == (
        f"token {token}: no limit of its own (its desk's default applies)\n"
    )
    assert headoni(database_url, "desk", "limit", sub, "--none").stdout == f"desk {sub}: no limit of its own\n"
    listing = headoni(database_url, "token", "list", "--desk", sub, "--json").stdout
    after = [msgspec.json.decode(line) for line in listing.splitlines()]
    assert len(after) == 2 and all("rate" not in t for t in after)


@pytest.mark.e2e
async def test_a_connection_answered_429_is_read_again_only_after_its_pause(
    server: Server, pool: asyncpg.Pool, desk: Desk
) -> None:
    """The 429 goes out at once, but a client that ignores Retry-After and sends again on the same
    connection waits on its own socket (at most MAX_PAUSE), not on the server's event loop; other
    connections are not slowed."""
    await limit_token(pool, desk, "1/min", 1)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as same, \
            httpx.AsyncClient(base_url=server.base_url, timeout=10) as other:
        assert (await same.post(TICKETS, json=ticket_body(), headers=desk.headers())).status_code == 201
        began = time.monotonic()
        first = await same.post(TICKETS, json=ticket_body(), headers=desk.headers())
        answered = time.monotonic() - began
        again = await same.post(TICKETS, json=ticket_body(), headers=desk.headers())
        paused = time.monotonic() - began - answered
        began = time.monotonic()
        elsewhere = await other.post(TICKETS, json=ticket_body(), headers=desk.headers())
        fresh = time.monotonic() - began
    assert [first.status_code, again.status_code, elsewhere.status_code] == [429, 429, 429]
    assert int(first.headers["retry-after"]) >= 59
    # The pause is random within [1/2, 1] x min(Retry-After, MAX_PAUSE); the answers themselves are quick.
    assert MAX_PAUSE * 0.45 <= paused <= MAX_PAUSE + 0.5 and answered < 0.25 and fresh < 0.25, (answered, paused, fresh)
