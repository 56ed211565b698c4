"""Transport rules: unknown routes, wrong methods, body size, Content-Type, and the health routes."""

from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from app.validation import MAX_BODY_BYTES
from tests.support.api import TICKETS, assert_error, issues, post_raw, raw_body, written
from tests.support.desks import Desk


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/"), ("GET", "/nope"), ("GET", "/api/v1"), ("GET", "/api/v1/nope"), ("POST", "/api/v2/tickets"),
     ("GET", "/api/v1/tickets/1/messages"), ("POST", "/api/v1/ticket"), ("DELETE", "/healthz/x")],
)
async def test_unknown_routes_are_not_found(client: httpx.AsyncClient, desk: Desk, method: str, path: str) -> None:
    for headers in ({}, desk.headers()):
        assert_error(await client.request(method, path, headers=headers), 404, "not_found")


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", TICKETS), ("PUT", TICKETS), ("DELETE", TICKETS), ("PATCH", f"{TICKETS}/1"), ("DELETE", f"{TICKETS}/1"),
     ("POST", f"{TICKETS}/1"), ("POST", "/api/v1/departments"), ("DELETE", "/api/v1/ticket-types"),
     ("POST", "/healthz"), ("PUT", "/readyz")],
)
async def test_wrong_methods_are_method_not_allowed(
    client: httpx.AsyncClient, desk: Desk, method: str, path: str
) -> None:
    response = await client.request(method, path, headers=desk.headers())
    assert_error(response, 405, "method_not_allowed")
    assert response.headers.get("allow")


async def test_a_body_over_one_mebibyte_is_payload_too_large(
    client: httpx.AsyncClient, desk: Desk, pool: asyncpg.Pool
) -> None:
    content = raw_body(body="x" * MAX_BODY_BYTES).encode()
    assert len(content) > MAX_BODY_BYTES
    assert_error(await post_raw(client, desk, content), 413, "payload_too_large")
    assert (await written(pool, desk))["tickets"] == 0


async def test_a_streamed_body_over_one_mebibyte_is_payload_too_large(client: httpx.AsyncClient, desk: Desk) -> None:
    """No Content-Length (chunked): the server counts what it reads and stops past 1 MiB."""
    chunks_sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal chunks_sent
        yield b'{"email": "a@example.com", "subject": "s", "body": "'
        for _ in range(40):  # 40 x 64 KiB = 2.5 MiB
            chunks_sent += 1
            yield b"x" * 65_536
        yield b'"}'

    headers = {**desk.headers(), "Content-Type": "application/json"}
    response = await client.post(TICKETS, content=chunks(), headers=headers)
    assert "content-length" not in response.request.headers
    assert_error(response, 413, "payload_too_large")


async def test_a_body_of_exactly_one_mebibyte_is_read(client: httpx.AsyncClient, desk: Desk) -> None:
    content = raw_body().encode()
    content += b" " * (MAX_BODY_BYTES - len(content))  # JSON allows trailing whitespace
    assert len(content) == MAX_BODY_BYTES
    response = await post_raw(client, desk, content)
    assert response.status_code == 201, response.text


@pytest.mark.parametrize(
    "content_type",
    ["application/json", "application/json; charset=utf-8", "application/json;charset=UTF-8", "Application/JSON",
     "application/json ; charset=utf-8"],
)
async def test_json_content_type_with_parameters_is_accepted(
    client: httpx.AsyncClient, desk: Desk, content_type: str
) -> None:
    response = await post_raw(client, desk, raw_body(), content_type)
    assert response.status_code == 201, response.text


@pytest.mark.parametrize(
    "content_type",
    [None, "", "text/plain", "text/json", "application/x-www-form-urlencoded", "application/jsonx",
     "application/json-patch+json", "multipart/form-data; boundary=x", "json", "application/*"],
)
async def test_other_content_types_are_invalid_header(
    client: httpx.AsyncClient, desk: Desk, pool: asyncpg.Pool, content_type: str | None
) -> None:
    response = await post_raw(client, desk, raw_body(), content_type)
    assert issues(response) == [(["Content-Type"], "invalid_header")]
    assert (await written(pool, desk))["tickets"] == 0


async def test_content_type_issue_is_listed_with_the_body_issues(client: httpx.AsyncClient, desk: Desk) -> None:
    response = await post_raw(client, desk, raw_body(email="nope", subject=...), "text/plain")
    assert issues(response) == [(["Content-Type"], "invalid_header"), (["email"], "invalid_email"),
                                (["subject"], "required")]


@pytest.mark.parametrize(("content", "code"), [(b"{", "malformed_json"), (b"[1]", "not_an_object")])
async def test_content_type_issue_is_listed_with_a_json_problem(
    client: httpx.AsyncClient, desk: Desk, content: bytes, code: str
) -> None:
    response = await post_raw(client, desk, content, "text/plain")
    assert issues(response) == [(["Content-Type"], "invalid_header"), ([], code)]


HOSTS = ["localhost", "127.0.0.1:8000", "a.b.localhost", "nobody.localhost", "example.com"]


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
@pytest.mark.parametrize("host", HOSTS)
async def test_health_routes_answer_on_any_host_without_a_token(
    client: httpx.AsyncClient, path: str, host: str
) -> None:
    response = await client.get(path, headers={"Host": host})
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    bad_token = await client.get(path, headers={"Host": host, "Authorization": "Bearer hd_nonsense_nonsense"})
    assert bad_token.status_code == 200


@pytest.mark.parametrize("path", ["/metrics", "/api/v1/openapi.json", "/docs"])
@pytest.mark.parametrize("host", HOSTS)
async def test_metrics_and_documentation_answer_on_any_host_without_a_token(
    client: httpx.AsyncClient, path: str, host: str
) -> None:
    assert (await client.get(path, headers={"Host": host})).status_code == 200


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", f"{TICKETS}/"), ("GET", f"{TICKETS}/1/"), ("GET", "/api/v1/departments/"), ("GET", "/healthz/")],
)
async def test_a_trailing_slash_is_an_unknown_route_not_a_redirect(
    client: httpx.AsyncClient, desk: Desk, method: str, path: str
) -> None:
    # Starlette's router answers 307 to the slash-less path by default, with an http:// Location
    # built from the Host header; the contract knows no such route, so it is 404 not_found.
    response = await client.request(method, path, headers=desk.headers())
    assert_error(response, 404, "not_found")


async def test_errors_carry_no_stack_trace(client: httpx.AsyncClient, desk: Desk) -> None:
    for response in (
        await client.get("/nope"),
        await post_raw(client, desk, b"{"),
        await client.put(TICKETS, headers=desk.headers()),
    ):
        assert "Traceback" not in response.text and 'File "' not in response.text
