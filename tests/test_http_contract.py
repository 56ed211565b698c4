"""What the HTTP layer itself answers and logs (issue 17, items 7, 8 and 9), on a real `headoni serve`:
every answer JSON in the contract's shape with an X-Request-Id, every log line JSON, strict targets,
hosts and Authorization headers, and the headers of every answer and of /docs."""

import asyncio
import json
import re
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime

import asyncpg
import pytest

from app import auth
from app.http import MAX_HEAD_BYTES
from app.ids import Snowflake
from app.logs import AccessRecord, human_line
from bench.server import Server
from tests.support.desks import Desk, make_desk
from tests.support.raw import exchange, request
from tests.support.servers import serving

pytestmark = pytest.mark.e2e

SANE_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
BODY = b'{"email": "contract@example.com", "subject": "Contract", "body": "sent by hand"}'
TLS_HELLO = b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(64)
MALFORMED = {
    "obs-fold": b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-A: a\r\n b\r\n\r\n",
    "space before the colon": b"GET /healthz HTTP/1.1\r\nHost : localhost\r\n\r\n",
    "Content-Length and Transfer-Encoding": (
        b"POST /api/v1/tickets HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    ),
    "NUL in a header": b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-A: a\x00b\r\n\r\n",
    "a TLS hello": TLS_HELLO,
    "CONNECT": b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
    "two Host headers": b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nHost: localhost\r\n\r\n",
    "a head over 64 KiB": b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * MAX_HEAD_BYTES + b"\r\n\r\n",
}
WEBSOCKET = (
    b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
)


@pytest.fixture(scope="module")
def contract_server(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving(database_url, tmp_path_factory.mktemp("contract") / "serve.log", "--json") as server:
        yield server


@pytest.fixture(scope="module")
async def desks(pool: asyncpg.Pool, ids: Snowflake) -> tuple[Desk, Desk]:
    return await make_desk(pool, ids), await make_desk(pool, ids)


def create(desk: Desk, *headers: tuple[str, str], target: str = "/api/v1/tickets") -> bytes:
    """A create with the desk's token and the given headers (Host among them), closing after."""
    fixed = [("Authorization", f"Bearer {desk.secret}"), ("Content-Type", "application/json")]
    extra = [*headers, ("Content-Length", str(len(BODY))), ("Connection", "close")]
    return request("POST", target, [*fixed, *extra], BODY)


@pytest.mark.parametrize("case", list(MALFORMED))
async def test_answers_of_the_http_layer_are_json_with_a_request_id(contract_server: Server, case: str) -> None:
    answer = await exchange(contract_server, MALFORMED[case])
    assert answer.statuses in ([400], [431]) and answer.closed
    assert answer.header("content-type") == ["application/json"]
    assert set(answer.json()) == {"error", "message"}
    assert answer.json()["error"] == ("headers_too_large" if answer.statuses == [431] else "bad_request")
    [request_id] = answer.header("x-request-id")
    assert SANE_ID.fullmatch(request_id)


async def test_the_http_layer_echoes_a_sane_request_id(contract_server: Server) -> None:
    sent = b"GET /healthz HTTP/1.1\r\nX-Request-Id: trace-431\r\nHost: a\r\nHost: b\r\n\r\n"
    assert (await exchange(contract_server, sent)).header("x-request-id") == ["trace-431"]


async def test_a_websocket_upgrade_is_answered_as_a_plain_request_and_closed(contract_server: Server) -> None:
    answer = await exchange(contract_server, WEBSOCKET)
    assert answer.statuses == [200] and answer.closed and answer.json() == {"status": "ok"}
    assert len(answer.header("x-request-id")) == 1


async def test_every_log_line_is_json_whatever_a_client_sends(contract_server: Server) -> None:
    # The forged path's request closes its connection: kept alive, the server would close it only after
    # its 5 s keep-alive timeout, which raced the exchange's own 5 s read timeout (and lost under load).
    forged = b"GET /x%0a12:00:00.000%20201%20forged HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    for raw in [*MALFORMED.values(), WEBSOCKET, forged]:
        await exchange(contract_server, raw)
    await asyncio.sleep(0.2)
    lines = [line for line in contract_server.log.read_text().splitlines() if line.strip()]
    assert len(lines) > len(MALFORMED)
    for line in lines:
        assert isinstance(json.loads(line), dict), line
    paths = [json.loads(line).get("path") for line in lines]
    assert "/x\n12:00:00.000 201 forged" in paths  # kept whole, inside one JSON string


def test_on_a_terminal_a_path_cannot_forge_a_line() -> None:
    forged = "/x\n12:30:01.250 201 POST /api/v1/tickets 3.2ms id=forged\x1b[2K"
    record = AccessRecord(datetime.now(UTC), "r-1", "GET", None, forged, 404, 0.5, None, None, "not_found")
    line = human_line(record)
    assert line.count("\n") == 1 and line.endswith("\n") and "\x1b" not in line
    assert "/x\\n12:30:01.250 201 POST" in line


async def test_an_absolute_form_target_names_the_desk_whatever_the_host_header_says(
    contract_server: Server, desks: tuple[Desk, Desk]
) -> None:
    """RFC 9112 section 3.2.2: the target's authority wins over Host."""
    acme, globex = desks
    ours = await exchange(contract_server, create(acme, ("Host", globex.host), target=f"http://{acme.host}/api/v1/tickets"))
    assert ours.statuses == [201]
    theirs = await exchange(
        contract_server, create(acme, ("Host", acme.host), target=f"http://{globex.host}:80/api/v1/tickets")
    )
    assert theirs.statuses == [403] and theirs.json()["error"] == "token_desk_mismatch"


@pytest.mark.parametrize(
    "target", ["ftp://{host}/api/v1/tickets", "http://user@{host}/api/v1/tickets", "http://{host}:99999/api/v1/tickets"]
)
async def test_an_absolute_form_target_of_another_scheme_or_with_userinfo_is_400(
    contract_server: Server, desks: tuple[Desk, Desk], target: str
) -> None:
    acme, _ = desks
    answer = await exchange(contract_server, create(acme, ("Host", acme.host), target=target.format(host=acme.host)))
    assert answer.statuses == [400] and answer.json()["error"] == "bad_request"


@pytest.mark.parametrize("spelling", ["{}..", "{}:abc", "{}:", "{}:99999", "{}:80:80", "{} x", "{}.:8000:"])
async def test_odd_host_spellings_are_400_and_name_no_desk(
    contract_server: Server, desks: tuple[Desk, Desk], spelling: str
) -> None:
    acme, _ = desks
    host = spelling.format(acme.host)
    answer = await exchange(contract_server, create(acme, ("Host", host)))
    assert answer.statuses == [400] and answer.json()["error"] == "bad_request"
    assert auth.desk_from_host(host, "localhost") is None


def test_a_trailing_dot_and_a_port_still_name_the_desk() -> None:
    for host in ["acme.localhost.", "ACME.localhost:8000", "acme.localhost.:8000"]:
        assert auth.desk_from_host(host, "localhost") == "acme", host


async def test_a_duplicate_authorization_header_is_400(contract_server: Server, desks: tuple[Desk, Desk]) -> None:
    acme, globex = desks
    answer = await exchange(
        contract_server, create(acme, ("Host", acme.host), ("Authorization", f"Bearer {globex.secret}"))
    )
    assert answer.statuses == [400] and answer.json()["error"] == "bad_request"


async def test_no_answer_names_the_server(contract_server: Server) -> None:
    for raw in (b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n", TLS_HELLO):
        answer = await exchange(contract_server, raw)
        assert answer.statuses and answer.header("server") == []
        assert answer.header("x-content-type-options") == ["nosniff"]


async def test_docs_have_a_content_security_policy_and_frame_protection(contract_server: Server) -> None:
    answer = await exchange(contract_server, b"GET /docs HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    assert answer.statuses == [200]
    [policy] = answer.header("content-security-policy")
    directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
    assert directives["default-src"] == "'none'" and directives["frame-ancestors"] == "'none'"
    assert "'unsafe-inline'" not in directives["script-src"] and "'unsafe-eval'" not in directives["script-src"]
    assert answer.header("x-frame-options") == ["DENY"]
    assert answer.header("x-content-type-options") == ["nosniff"]


async def test_swagger_ui_works_under_the_docs_policy(contract_server: Server) -> None:
    """A real browser loads /docs with its policy enforced: Swagger UI renders every operation, and
    the browser refuses nothing."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        pytest.skip("needs chromium (Debian package `chromium`) to load /docs in a real browser")
    browser = await asyncio.create_subprocess_exec(
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
        "--enable-logging=stderr", "--v=0", "--dump-dom", f"{contract_server.base_url}/docs",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    dom, log = await asyncio.wait_for(browser.communicate(), 90)
    assert b'data-path="/api/v1/tickets"' in dom and b'data-path="/api/v1/ticket-types"' in dom
    assert b"Content Security Policy" not in log and b"Refused to" not in log, log.decode()[-2000:]
