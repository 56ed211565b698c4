"""Clients that try to hurt everyone else (issue 17, items 1, 5 and 6), on a real `headoni serve` with
small limits: endless trailers, connections that send nothing or trickle, too many connections, and
bodies past the byte budget. Each is cut off within its bound, and the server goes on serving others."""

import asyncio
import resource
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import httpx
import pytest

from app.http import MAX_HEAD_BYTES
from app.ids import Snowflake
from bench.attacker import read_answer
from bench.server import Server
from tests.support.desks import Desk, make_desk
from tests.support.raw import READ_TIMEOUT, Exchange, connect, exchange, request, ticket
from tests.support.servers import serving

pytestmark = pytest.mark.e2e

HEAD_TIMEOUT = 1.0  # the servers' HEADONI_HEAD_TIMEOUT_SECONDS
BODY_TIMEOUT = 2.0  # HEADONI_BODY_TIMEOUT_SECONDS
MAX_CONNECTIONS = 30  # the capped server's HEADONI_MAX_CONNECTIONS
BUDGET = 2 * 2**20  # the limited server's HEADONI_REQUEST_BYTES_BUDGET_MB: one 900 KB body fits, two do not
ANONYMOUS_RATE = 5  # the gated server's HEADONI_ANONYMOUS_RATE, with HEADONI_ANONYMOUS_CONCURRENCY 1
ADDRESS_RATE = 4  # the throttled server's HEADONI_ADDRESS_RATE
CROWDED_CONNECTIONS = 4  # the crowded server's HEADONI_MAX_CONNECTIONS (with an address rate of 0.2)
BODY = b'{"email": "hostile@example.com", "subject": "Hostile", "body": "sent by hand"}'


def _server(name: str, **env: Any) -> Any:
    """A module's `headoni serve` with these settings (environment variables, strings), as the fixture `name`."""

    @pytest.fixture(scope="module", name=name)
    def fixture(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
        with serving(database_url, tmp_path_factory.mktemp(name) / "serve.log", **env) as server:
            yield server

    return fixture


limited = _server(
    "limited", HEADONI_HEAD_TIMEOUT_SECONDS=str(HEAD_TIMEOUT), HEADONI_BODY_TIMEOUT_SECONDS=str(BODY_TIMEOUT),
    HEADONI_REQUEST_BYTES_BUDGET_MB=str(BUDGET / 2**20),
)
capped = _server(
    "capped", HEADONI_MAX_CONNECTIONS=str(MAX_CONNECTIONS), HEADONI_BODY_TIMEOUT_SECONDS=str(BODY_TIMEOUT)
)
gated = _server("gated", HEADONI_ANONYMOUS_CONCURRENCY="1", HEADONI_ANONYMOUS_RATE=str(ANONYMOUS_RATE))
throttled = _server("throttled", HEADONI_ADDRESS_RATE=str(ADDRESS_RATE))
# One new connection per address every 5 s, and a head timeout of HEAD_TIMEOUT.
unhurried = _server("unhurried", HEADONI_ADDRESS_RATE="0.2", HEADONI_HEAD_TIMEOUT_SECONDS=str(HEAD_TIMEOUT))
crowded = _server("crowded", HEADONI_ADDRESS_RATE="0.2", HEADONI_MAX_CONNECTIONS=str(CROWDED_CONNECTIONS))


@pytest.fixture(scope="module")
async def hostile_desk(pool: asyncpg.Pool, ids: Snowflake) -> Desk:
    return await make_desk(pool, ids)


async def create(server: Server, desk: Desk) -> int:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=READ_TIMEOUT) as http:
        body = {"email": "other@example.com", "subject": "Meanwhile", "body": "another client"}
        return (await http.post("/api/v1/tickets", json=body, headers=desk.headers())).status_code


@pytest.fixture(autouse=True)
async def still_serving(request: pytest.FixtureRequest, hostile_desk: Desk) -> AsyncIterator[None]:
    """After every hostile client the server answers others, and writes, as before."""
    yield
    for name in ("limited", "capped"):
        if name in request.fixturenames:
            server: Server = request.getfixturevalue(name)
            assert await create(server, hostile_desk) == 201
            assert server.process.poll() is None


def chunked(desk: Desk, *, token: bool = True) -> bytes:
    """The head of a chunked create and its whole body, up to the last chunk: the trailers come next."""
    headers = [("Host", desk.host), ("Content-Type", "application/json"), ("Transfer-Encoding", "chunked")]
    if token:
        headers.append(("Authorization", f"Bearer {desk.secret}"))
    return request("POST", "/api/v1/tickets", headers, b"%x\r\n" % len(BODY) + BODY + b"\r\n0\r\n")


TRAILERS = [b"X-Trailer-%d: %s\r\n" % (i, b"t" * 1000) for i in range(MAX_HEAD_BYTES // 1000 + 10)]


async def test_trailers_past_the_head_limit_are_431_and_the_connection_is_closed(
    limited: Server, hostile_desk: Desk
) -> None:
    """httptools reports trailers through on_header; they used to be kept without any bound."""
    answer = await exchange(limited, chunked(hostile_desk), *TRAILERS)
    assert answer.statuses == [431] and answer.closed
    assert answer.json()["error"] == "headers_too_large"


async def test_an_endless_trailer_line_is_cut_off_at_the_head_limit(limited: Server, hostile_desk: Desk) -> None:
    endless = [b"t" * 16_384] * (MAX_HEAD_BYTES // 16_384 + 8)
    answer = await exchange(limited, chunked(hostile_desk) + b"X-Endless: ", *endless, delay=0.01)
    assert answer.statuses == [431] and answer.closed


async def test_trailers_after_an_early_answer_do_not_keep_the_connection(limited: Server, hostile_desk: Desk) -> None:
    """No token: answered 401 at once; the trailers that follow end with the connection."""
    answer = await exchange(limited, chunked(hostile_desk, token=False), *TRAILERS)
    assert answer.statuses == [401] and answer.closed


async def test_a_connection_that_sends_nothing_is_closed_after_the_head_timeout(limited: Server) -> None:
    started = asyncio.get_running_loop().time()
    answer = await exchange(limited)
    assert answer.closed and answer.data == b""
    assert HEAD_TIMEOUT - 0.1 <= asyncio.get_running_loop().time() - started < READ_TIMEOUT


async def trickle(server: Server, data: bytes, interval: float) -> Exchange:
    """Send one byte per interval until the server answers or closes; then read to the end."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    received = b""
    try:
        for i in range(len(data)):
            writer.write(data[i : i + 1])
            try:
                received = await asyncio.wait_for(reader.read(65536), interval)
            except TimeoutError:
                continue
            break
        while received and (chunk := await asyncio.wait_for(reader.read(65536), READ_TIMEOUT)):
            received += chunk
        return Exchange(received, closed=True)
    finally:
        writer.close()


async def test_a_head_that_trickles_in_is_408_after_the_head_timeout(limited: Server) -> None:
    started = asyncio.get_running_loop().time()
    answer = await trickle(limited, b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"s" * 100, 0.05)
    assert answer.statuses == [408] and answer.json()["error"] == "request_timeout"
    assert HEAD_TIMEOUT - 0.1 <= asyncio.get_running_loop().time() - started < READ_TIMEOUT


async def test_a_slow_body_after_an_early_answer_is_closed_after_the_body_timeout(
    limited: Server, hostile_desk: Desk
) -> None:
    """No token: 401 at once; a body that then trickles in, a byte at a time, used to hold the
    connection for ever (each byte put off the keep-alive timeout)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", limited.port)
    started = asyncio.get_running_loop().time()
    received = b""
    try:
        writer.write(request("POST", "/api/v1/tickets", [("Host", hostile_desk.host), ("Content-Length", "1000")]))
        for _ in range(int((BODY_TIMEOUT + READ_TIMEOUT) / 0.2)):
            writer.write(b"{")
            try:
                chunk = await asyncio.wait_for(reader.read(65536), 0.2)
            except TimeoutError:
                continue
            except ConnectionError:
                break
            if not chunk:
                break
            received += chunk
        closed_after = asyncio.get_running_loop().time() - started
    finally:
        writer.close()
    assert Exchange(received, closed=True).statuses == [401]
    assert BODY_TIMEOUT <= closed_after < BODY_TIMEOUT + READ_TIMEOUT - 1


async def test_bodies_past_the_byte_budget_are_503_at_once_and_small_creates_go_on(
    limited: Server, hostile_desk: Desk
) -> None:
    big = BODY[:-1] + b', "padding": "' + b"p" * 900_000 + b'"}'
    first_reader, first = await asyncio.open_connection("127.0.0.1", limited.port)
    try:
        first.write(ticket(hostile_desk, big[:100_000], length=len(big)))  # holds 900 KB of the budget
        await first.drain()
        await asyncio.sleep(0.2)
        second = await exchange(limited, ticket(hostile_desk, big[:100_000], length=len(big)), until_closed=False)
        assert second.statuses == [503] and second.json()["error"] == "service_unavailable"
        assert second.header("retry-after") == ["1"]
        assert await create(limited, hostile_desk) == 201  # a small body still fits
        first.write(big[100_000:])
        await first.drain()
        answer = await asyncio.wait_for(first_reader.readuntil(b"\r\n"), READ_TIMEOUT)
        assert answer.startswith(b"HTTP/1.1 201 ")
    finally:
        first.close()


async def test_past_the_connection_limit_the_longest_idle_connections_are_closed(
    capped: Server, hostile_desk: Desk
) -> None:
    """1,000 connections that send nothing, against a limit of 30: each new one closes the oldest idle
    one, and another desk's creates go on."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # room for this process's own 1,000 sockets
    if soft != resource.RLIM_INFINITY and soft < 1200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1200 if hard == resource.RLIM_INFINITY else min(1200, hard), hard))
    idle = [await asyncio.open_connection("127.0.0.1", capped.port) for _ in range(1000)]
    try:
        assert [await create(capped, hostile_desk) for _ in range(5)] == [201] * 5
        await asyncio.sleep(0.2)
        still_open = [i for i, (reader, _) in enumerate(idle) if not reader.at_eof()]
        assert len(still_open) <= MAX_CONNECTIONS
        assert min(still_open, default=1000) >= 1000 - 2 * MAX_CONNECTIONS  # the newest are kept
    finally:
        for _, writer in idle:
            writer.close()


async def test_a_connection_past_the_limit_is_refused_only_when_every_connection_is_owed_an_answer(
    capped: Server, hostile_desk: Desk
) -> None:
    busy = [await asyncio.open_connection("127.0.0.1", capped.port) for _ in range(MAX_CONNECTIONS)]
    for _, writer in busy:  # each sends a head and part of its body: an answer is owed on each
        writer.write(ticket(hostile_desk, BODY[:10], length=len(BODY)))
    await asyncio.sleep(0.3)
    refused = await exchange(capped, request("GET", "/healthz", [("Host", "localhost")]))
    assert refused.statuses == [503] and refused.closed and refused.header("retry-after") == ["1"]
    try:
        answers = [await asyncio.wait_for(reader.read(65536), BODY_TIMEOUT + READ_TIMEOUT) for reader, _ in busy]
        assert all(answer.startswith(b"HTTP/1.1 408 ") for answer in answers)
    finally:
        for _, writer in busy:
            writer.close()


async def test_anonymous_requests_wait_their_turn_and_a_known_token_never_waits_behind_them(
    gated: Server, hostile_desk: Desk
) -> None:
    """15 requests without a token at once, against a rate of 5 a second: they are all answered, in
    turn, and a desk whose token the process has seen is answered at once meanwhile."""
    assert await create(gated, hostile_desk) == 201  # its first request, anonymous: now the token is known
    answered: list[str] = []
    async with httpx.AsyncClient(base_url=gated.base_url, timeout=READ_TIMEOUT * 4) as http:

        async def anonymous() -> int:
            status = (await http.get("/healthz")).status_code
            answered.append("anonymous")
            return status

        flood = [asyncio.create_task(anonymous()) for _ in range(15)]
        await asyncio.sleep(0.3)
        assert await create(gated, hostile_desk) == 201
        answered.append("known")
        assert await asyncio.gather(*flood) == [200] * 15
    assert answered.index("known") <= 15 - ANONYMOUS_RATE  # not behind the queue


async def test_an_address_opening_connections_past_its_rate_waits_unread_and_others_do_not(
    throttled: Server, hostile_desk: Desk
) -> None:
    """One address opens 16 connections at once, each a request without a token, against a rate of 4
    new connections a second: the first 4 are answered at once, the rest one by one as the rate allows
    (about 3 s in all). Meanwhile another address is answered at once, and so is a third that opens a
    connection for each of 24 creates in a row: a connection that shows a known token gives its
    address's turn back."""
    loop = asyncio.get_running_loop()
    assert await create(throttled, hostile_desk) == 201  # the desk's token is now known to the process
    health = request("GET", "/healthz", [("Host", hostile_desk.host), ("Connection", "close")])
    started = loop.time()

    async def anonymous() -> float:
        answer = await exchange(throttled, health, source="127.0.0.2")
        assert answer.statuses == [200]
        return loop.time() - started

    flood = [asyncio.create_task(anonymous()) for _ in range(16)]
    await asyncio.sleep(0.2)
    elsewhere = await exchange(throttled, health, source="127.0.0.3")
    assert elsewhere.statuses == [200]
    assert loop.time() - started < 1.0  # not behind 127.0.0.2's queue
    creates = loop.time()
    for _ in range(24):
        answer = await exchange(
            throttled, ticket(hostile_desk, BODY, ("Connection", "close"), length=len(BODY)), source="127.0.0.4"
        )
        assert answer.statuses == [201]
    assert loop.time() - creates < (24 - ADDRESS_RATE) / ADDRESS_RATE / 2  # its turns went back: never held
    times = sorted(await asyncio.gather(*flood))
    assert times[ADDRESS_RATE - 1] < 1.0  # the burst
    assert times[-1] >= (16 - ADDRESS_RATE) / ADDRESS_RATE * 0.8  # the rest held to the rate


async def test_anonymous_requests_on_one_connection_count_against_its_address_rate(
    throttled: Server, hostile_desk: Desk
) -> None:
    """A keep-alive connection that loops on a request without a token (a /metrics flood) is held to its
    address's rate after its first request, which had the connection's own turn: 13 requests against a
    rate of 4 a second, of which the burst covers 4, take at least 2 s."""
    loop = asyncio.get_running_loop()
    health = request("GET", "/healthz", [("Host", hostile_desk.host)])
    reader, writer = await connect(throttled, "127.0.0.5")
    started = loop.time()
    try:
        for _ in range(13):
            writer.write(health)
            assert await asyncio.wait_for(read_answer(reader), READ_TIMEOUT) == 200
    finally:
        writer.close()
    assert loop.time() - started >= (13 - ADDRESS_RATE) / ADDRESS_RATE * 0.8


async def test_a_connection_still_waiting_for_its_turn_at_the_head_timeout_is_answered_503(
    unhurried: Server, hostile_desk: Desk
) -> None:
    """The wait for an address's turn counts against the head timeout: a connection is answered or
    closed within HEADONI_HEAD_TIMEOUT_SECONDS of opening, here with a 503 and Retry-After, unread."""
    loop = asyncio.get_running_loop()
    health = request("GET", "/healthz", [("Host", hostile_desk.host), ("Connection", "close")])
    first = asyncio.create_task(exchange(unhurried, health, source="127.0.0.6"))  # the address's one turn
    await asyncio.sleep(0.1)
    started = loop.time()
    held = await exchange(unhurried, health, source="127.0.0.6")  # its turn would come 5 s later
    waited = loop.time() - started
    assert (await first).statuses == [200]
    assert held.statuses == [503] and held.closed
    assert held.json()["error"] == "service_unavailable" and "HEADONI_ADDRESS_RATE" in str(held.json()["message"])
    assert held.header("Retry-After") == ["1"] and len(held.header("X-Request-Id")) == 1
    assert HEAD_TIMEOUT - 0.2 <= waited < HEAD_TIMEOUT + 1.5


async def test_a_request_waiting_for_its_address_turn_may_be_evicted_and_is_answered_503(
    crowded: Server, hostile_desk: Desk
) -> None:
    """A keep-alive connection's second anonymous request waits for its address's next turn (5 s away):
    it is the client's own wait, so the connection may be evicted meanwhile, and the request is told
    503 rather than dropped. Another address's new connections past the cap of 4 evict it."""
    health = request("GET", "/healthz", [("Host", hostile_desk.host)])
    reader, writer = await connect(crowded, "127.0.0.7")
    others: list[asyncio.StreamWriter] = []
    try:
        writer.write(health + health)  # the first has the connection's turn, the second waits
        first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
        assert first.startswith(b"HTTP/1.1 200 ")
        await asyncio.sleep(0.2)
        for _ in range(CROWDED_CONNECTIONS):  # 127.0.0.8's: one read, the others waiting for its turn
            others.append((await connect(crowded, "127.0.0.8"))[1])
            await asyncio.sleep(0.05)
        rest = await asyncio.wait_for(reader.read(), READ_TIMEOUT)  # to the close
    finally:
        writer.close()
        for other in others:
            other.close()
    assert b"HTTP/1.1 503 " in rest and b"HEADONI_ADDRESS_RATE" in rest
