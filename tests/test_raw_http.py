"""Raw HTTP/1.1 over a socket to a real `headoni serve`: requests no client library would send. Each
gets a clear 4xx or a closed connection, and the server keeps serving everyone else."""

import asyncio
from collections.abc import AsyncIterator, Iterator

import asyncpg
import httpx
import pytest

from app.http import MAX_HEAD_BYTES
from app.ids import Snowflake
from bench.server import Server
from tests.support.desks import Desk, make_desk
from tests.support.raw import READ_TIMEOUT, exchange, request, ticket
from tests.support.servers import serving

pytestmark = pytest.mark.e2e

BODY_TIMEOUT = 2.0  # the server's HEADONI_BODY_TIMEOUT_SECONDS


@pytest.fixture(scope="module")
def raw_server(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving(
        database_url, tmp_path_factory.mktemp("raw") / "serve.log", HEADONI_BODY_TIMEOUT_SECONDS=str(BODY_TIMEOUT)
    ) as server:
        yield server


@pytest.fixture(scope="module")
async def raw_desk(pool: asyncpg.Pool, ids: Snowflake) -> Desk:
    return await make_desk(pool, ids)


@pytest.fixture(autouse=True)
async def still_serving(raw_server: Server, raw_desk: Desk) -> AsyncIterator[None]:
    """After every hostile request the server answers others, and writes, as before."""
    yield
    async with httpx.AsyncClient(base_url=raw_server.base_url, timeout=READ_TIMEOUT) as http:
        assert (await http.get("/healthz")).status_code == 200
        body = {"email": "after@example.com", "subject": "Still here", "body": "ok"}
        assert (await http.post("/api/v1/tickets", json=body, headers=raw_desk.headers())).status_code == 201
    assert raw_server.process.poll() is None


BODY = b'{"email": "raw@example.com", "subject": "Raw", "body": "sent by hand"}'


async def test_a_request_without_host_reaches_no_desk_and_health_still_answers(
    raw_server: Server, raw_desk: Desk
) -> None:
    headers = [("Authorization", f"Bearer {raw_desk.secret}"), ("Connection", "close")]
    no_host = await exchange(raw_server, request("GET", "/api/v1/departments", headers))
    assert no_host.statuses == [403] and no_host.json()["error"] == "token_desk_mismatch"
    health = await exchange(raw_server, b"GET /healthz HTTP/1.0\r\n\r\n")
    assert health.statuses == [200] and health.closed


@pytest.mark.parametrize("second", ["same", "other"])
async def test_two_host_headers_are_400_and_the_connection_is_closed(
    raw_server: Server, raw_desk: Desk, second: str
) -> None:
    other = raw_desk.host if second == "same" else "someone-else.localhost"
    answer = await exchange(raw_server, ticket(raw_desk, BODY, ("Host", other), length=len(BODY)))
    assert answer.statuses == [400] and answer.closed
    assert answer.json()["error"] == "bad_request"


async def test_a_head_over_the_limit_is_431_and_closed_and_one_under_it_is_served(raw_server: Server) -> None:
    big = await exchange(raw_server, request("GET", "/healthz", [("Host", "x"), ("X-Big", "a" * MAX_HEAD_BYTES)]))
    assert big.statuses == [431] and big.closed and big.json()["error"] == "headers_too_large"
    many = [("Host", "x"), *((f"X-H{i}", "v") for i in range(MAX_HEAD_BYTES // 8))]
    assert (await exchange(raw_server, request("GET", "/healthz", many))).statuses == [431]
    fits = await exchange(
        raw_server, request("GET", "/healthz", [("Host", "x"), ("X-Big", "a" * (MAX_HEAD_BYTES - 1024))]),
        until_closed=False,
    )
    assert fits.statuses == [200]


async def test_a_head_that_never_ends_is_cut_off_at_the_limit(raw_server: Server) -> None:
    start = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Endless: "
    answer = await exchange(raw_server, start, *([b"a" * 16_384] * (MAX_HEAD_BYTES // 16_384 + 4)), delay=0.01)
    assert answer.closed and answer.statuses in ([], [431])


async def test_bytes_past_the_declared_length_are_a_second_request_that_gets_400(
    raw_server: Server, raw_desk: Desk
) -> None:
    """The extra bytes are parsed as the next request on the connection, which is garbage: 400 and
    closed, after the answer to the request before them."""
    smuggled = BODY + b"<script>smuggled</script>\r\n\r\n"
    answer = await exchange(raw_server, ticket(raw_desk, smuggled, length=len(BODY)))
    assert answer.statuses == [201, 400] and answer.closed


@pytest.mark.parametrize(
    "framing",
    [
        [("Content-Length", "5"), ("Transfer-Encoding", "chunked")],
        [("Content-Length", "70"), ("Content-Length", "71")],
        [("Content-Length", "-1")],
        [("Content-Length", "abc")],
        [("Transfer-Encoding", "gzip, chunked, identity")],
    ],
)
async def test_ambiguous_framing_is_400_and_closed(
    raw_server: Server, raw_desk: Desk, framing: list[tuple[str, str]]
) -> None:
    answer = await exchange(raw_server, ticket(raw_desk, BODY, *framing))
    assert answer.statuses == [400] and answer.closed


async def test_a_body_shorter_than_declared_then_a_hang_up_writes_nothing(
    raw_server: Server, raw_desk: Desk, pool: asyncpg.Pool
) -> None:
    before = await pool.fetchval("SELECT count(*) FROM tickets WHERE desk_id = $1", raw_desk.desk_id)
    _, writer = await asyncio.open_connection("127.0.0.1", raw_server.port)
    writer.write(ticket(raw_desk, BODY[:20], length=len(BODY)))
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.close()
    await writer.wait_closed()
    await asyncio.sleep(0.2)
    assert await pool.fetchval("SELECT count(*) FROM tickets WHERE desk_id = $1", raw_desk.desk_id) == before


async def test_a_slow_body_is_read_while_others_are_served(raw_server: Server, raw_desk: Desk) -> None:
    pieces = [BODY[i : i + 8] for i in range(0, len(BODY), 8)]
    slow = asyncio.create_task(exchange(raw_server, ticket(raw_desk, b"", length=len(BODY)), *pieces, delay=0.1,
                                        until_closed=False))
    async with httpx.AsyncClient(base_url=raw_server.base_url, timeout=READ_TIMEOUT) as http:
        for _ in range(5):  # meanwhile
            assert (await http.get("/healthz")).status_code == 200
            await asyncio.sleep(0.1)
    assert not slow.done()
    assert (await slow).statuses == [201]


async def test_a_body_that_stalls_past_the_body_timeout_is_408_and_writes_nothing(
    raw_server: Server, raw_desk: Desk, pool: asyncpg.Pool
) -> None:
    before = await pool.fetchval("SELECT count(*) FROM tickets WHERE desk_id = $1", raw_desk.desk_id)
    started = asyncio.get_running_loop().time()
    answer = await exchange(raw_server, ticket(raw_desk, b"", length=len(BODY)) + BODY[:10])
    assert answer.statuses == [408]
    assert answer.json()["error"] == "request_timeout"
    assert BODY_TIMEOUT <= asyncio.get_running_loop().time() - started < READ_TIMEOUT
    assert await pool.fetchval("SELECT count(*) FROM tickets WHERE desk_id = $1", raw_desk.desk_id) == before


async def test_a_chunked_body_over_one_mebibyte_is_413(raw_server: Server, raw_desk: Desk) -> None:
    """The app reads no further than 1 MiB and answers 413 at once, while the client is still
    sending. (The connection is not closed by the app: closing with unread data resets it, and the
    client would often never see the 413.)"""
    chunk = b"x" * 65_536
    chunks = [b"%x\r\n" % len(chunk) + chunk + b"\r\n" for _ in range(20)]  # 1.25 MiB
    head = ticket(raw_desk, b"", ("Transfer-Encoding", "chunked"))
    answer = await exchange(raw_server, head, *chunks, b"0\r\n\r\n", until_closed=False)
    assert answer.statuses == [413]
    assert b'"error":"payload_too_large"' in answer.data


async def test_bytes_that_are_not_http_are_400_and_closed(raw_server: Server) -> None:
    tls_hello = b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(64)
    answer = await exchange(raw_server, tls_hello)
    assert answer.statuses == [400] and answer.closed
