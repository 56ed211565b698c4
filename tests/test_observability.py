"""Request ids, the access log and the metrics, in-process and on a real `headoni serve`."""

import asyncio
import io
import json
import logging
import re
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app import admin, logs
from app.main import create_app
from app.settings import Settings
from bench.server import Server
from tests.support.app import app_client
from tests.support.desks import Desk, ticket_body
from tests.support.servers import serving

SANE = re.compile(r"[A-Za-z0-9._-]{1,128}")


async def log_lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    """The JSON access-log lines written since the last call (lines are written once per loop turn)."""
    await asyncio.sleep(0)
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def scrape(client: httpx.AsyncClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return samples(response.text)


def value(metrics: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return metrics.get((name, frozenset(labels.items())), 0.0)


@pytest.mark.parametrize("path", ["/healthz", "/api/v1/departments", "/nowhere"])
async def test_every_answer_carries_a_fresh_request_id(client: httpx.AsyncClient, path: str) -> None:
    first, second = [(await client.get(path)).headers["x-request-id"] for _ in range(2)]
    assert SANE.fullmatch(first) and SANE.fullmatch(second)
    assert first != second


@pytest.mark.parametrize("sent", ["abc-123", "Trace.ID_9", "x" * 128])
async def test_a_sane_client_request_id_is_honoured(client: httpx.AsyncClient, desk: Desk, sent: str) -> None:
    response = await client.post("/api/v1/tickets", json=ticket_body(), headers=desk.headers(**{"X-Request-Id": sent}))
    assert response.status_code == 201
    assert response.headers["x-request-id"] == sent


@pytest.mark.parametrize("sent", ["", "has space", "x" * 129, "semi;colon", "ünï"])
async def test_an_insane_client_request_id_is_replaced(client: httpx.AsyncClient, sent: str) -> None:
    response = await client.get("/healthz", headers=[(b"X-Request-Id", sent.encode())])
    assert response.headers["x-request-id"] != sent
    assert SANE.fullmatch(response.headers["x-request-id"])


async def test_one_access_log_line_per_request_without_the_secret(
    client: httpx.AsyncClient, desk: Desk, capsys: pytest.CaptureFixture[str]
) -> None:
    await log_lines(capsys)
    created = await client.post("/api/v1/tickets", json=ticket_body(), headers=desk.headers())
    await client.get("/api/v1/tickets/1", headers=desk.headers(**{"X-Request-Id": "trace-me"}))
    denied = await client.get("/api/v1/tickets/1", headers={"Host": desk.host, "Authorization": "Bearer hd_nope"})
    await asyncio.sleep(0)
    out = capsys.readouterr().out
    assert desk.secret not in out and "Bearer" not in out
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["request_id"] for line in lines] == [
        created.headers["x-request-id"], "trace-me", denied.headers["x-request-id"]
    ]
    post, get, unauthenticated = lines
    assert set(get) == {
        "time", "request_id", "method", "route", "path", "status", "duration_ms", "desk", "token_id", "error", "limit"
    }
    assert (post["method"], post["route"], post["status"], post["error"]) == ("POST", "/api/v1/tickets", 201, None)
    assert (post["limit"], get["limit"]) == ("unlimited", None)  # the test desk has no limit; GETs have none
    assert (get["route"], get["path"], get["status"]) == ("/api/v1/tickets/{ref}", "/api/v1/tickets/1", 200)
    assert (get["desk"], get["token_id"]) == (desk.subdomain, desk.token_id)
    assert 0 <= get["duration_ms"] < 60_000
    assert abs(datetime.fromisoformat(get["time"]) - datetime.now(UTC)).total_seconds() < 60
    assert (unauthenticated["status"], unauthenticated["error"]) == (401, "unauthenticated")
    assert unauthenticated["desk"] is None and unauthenticated["token_id"] is None


async def test_unknown_routes_log_no_template(client: httpx.AsyncClient, capsys: pytest.CaptureFixture[str]) -> None:
    await log_lines(capsys)
    await client.get("/api/v1/nothing-here")
    [line] = await log_lines(capsys)
    assert (line["route"], line["path"], line["status"], line["error"]) == (
        None, "/api/v1/nothing-here", 404, "not_found"
    )


async def test_an_unexpected_error_is_a_500_quoting_the_request_id(
    config: Settings, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    async def boom(request: Request) -> Response:
        raise RuntimeError("secret internals")

    app = create_app(config)
    app.router.routes.append(Route("/boom", boom))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        await log_lines(capsys)
        with caplog.at_level(logging.ERROR, logger="headoni"):
            response = await c.get("/boom", headers={"X-Request-Id": "req-500"})
    assert response.status_code == 500
    assert response.headers["x-request-id"] == "req-500"
    assert response.json() == {
        "error": "internal_error", "message": "An unexpected error occurred.", "requestId": "req-500"
    }
    assert "secret internals" not in response.text
    [line] = await log_lines(capsys)
    assert (line["request_id"], line["status"], line["error"]) == ("req-500", 500, "internal_error")
    assert line["route"] == "/boom"
    [record] = [r for r in caplog.records if r.name == "headoni"]
    assert "req-500" in record.getMessage() and record.exc_info is not None


async def test_on_a_terminal_the_log_is_human_readable(monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    log = logs.AccessLog()
    when = datetime(2026, 4, 5, 12, 30, 1, 250_000, tzinfo=UTC)
    log.emit(logs.AccessRecord(when, "r-1", "POST", "/api/v1/tickets", "/api/v1/tickets", 201, 3.25,
                                        "acme", "42", None))
    log.emit(logs.AccessRecord(when, "r-2", "GET", None, "/x", 404, 0.5, None, None, "not_found"))
    await asyncio.sleep(0)
    assert terminal.getvalue().splitlines() == [
        "12:30:01.250 201 POST /api/v1/tickets 3.2ms id=r-1 desk=acme token=42",
        "12:30:01.250 404 GET /x 0.5ms id=r-2 error=not_found",
    ]


async def test_metrics_count_requests_tickets_blocked_answers_and_errors(
    client: httpx.AsyncClient, desk: Desk, pool: Any, config: Settings
) -> None:
    async with pool.acquire() as conn:
        await admin.add_blocklist(conn, desk.subdomain, "spam.example")
    before = await scrape(client)
    await client.post("/api/v1/tickets", json=ticket_body(), headers=desk.headers())
    await client.post("/api/v1/tickets", json=ticket_body(email="x@spam.example"), headers=desk.headers())
    batch = [ticket_body(), ticket_body(email="y@spam.example"), {"email": "bad"}]
    await client.post("/api/v1/tickets/batch", json={"tickets": batch}, headers=desk.headers())
    await client.get("/api/v1/tickets/1", headers={"Host": desk.host})
    after = await scrape(client)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    created = {"route": "/api/v1/tickets", "method": "POST", "status": "201"}
    assert delta("headoni_http_requests_total", **created) == 1
    assert delta("headoni_http_request_duration_seconds_count", **created) == 1
    assert delta("headoni_http_request_duration_seconds_bucket", **created, le="+Inf") == 1
    assert delta("headoni_http_requests_total", route="/api/v1/tickets/{ref}", method="GET", status="401") == 1
    assert delta("headoni_tickets_created_total") == 2
    assert delta("headoni_blocked_answers_total") == 2
    assert delta("headoni_errors_total", code="unauthenticated") == 1
    assert value(after, "headoni_db_pool_max_connections") == config.pool_max_size  # the client's pool
    in_use = value(after, "headoni_db_pool_connections", state="in_use")
    idle = value(after, "headoni_db_pool_connections", state="idle")
    # Scraped with no request in flight: none of the pool's connections is in use, and it holds one at least.
    assert in_use == 0, f"{in_use} connections in use (and {idle} idle) with no request in flight"
    assert 1 <= idle <= config.pool_max_size


async def test_metrics_have_no_per_desk_label(client: httpx.AsyncClient, desk: Desk) -> None:
    await client.post("/api/v1/tickets", json=ticket_body(), headers=desk.headers())
    await client.request("BREW", "/api/v1/tickets", headers=desk.headers())
    metrics = await scrape(client)
    labels = {name for sample, pairs in metrics if sample.startswith("headoni_") for name, _ in pairs}
    assert labels <= {"route", "method", "status", "code", "state", "sqlstate", "le"}
    assert desk.subdomain not in (await client.get("/metrics")).text
    assert value(metrics, "headoni_http_requests_total", route="/api/v1/tickets", method="OTHER", status="405") >= 1


def wait_for_line(log: Path, request_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if line.startswith("{") and json.loads(line).get("request_id") == request_id:
                record: dict[str, Any] = json.loads(line)
                return record
        time.sleep(0.05)
    raise AssertionError(f"no access-log line for {request_id} in {log}")


@pytest.mark.e2e
def test_a_served_request_can_be_followed_by_its_id_in_the_log(server: Server) -> None:
    response = httpx.get(f"{server.base_url}/api/v1/departments", headers={"X-Request-Id": "follow-me-1"})
    assert response.status_code == 401
    assert response.headers["x-request-id"] == "follow-me-1"
    line = wait_for_line(server.log, "follow-me-1")
    assert (line["route"], line["status"], line["error"]) == ("/api/v1/departments", 401, "unauthenticated")


@pytest.mark.e2e
def test_several_workers_share_their_metrics(database_url: str, tmp_path: Path) -> None:
    with serving(database_url, tmp_path / "serve.log", workers=2) as server:
        with httpx.Client(base_url=server.base_url) as c:
            for _ in range(30):
                assert c.get("/healthz").status_code == 200
            for _ in range(4):  # whichever worker answers the scrape, it reports both workers' counts
                metrics = samples(c.get("/metrics").text)
                assert value(metrics, "headoni_http_requests_total", route="/healthz", method="GET", status="200") == 30
                assert value(metrics, "headoni_db_pool_max_connections") > 0
    assert server.process.returncode == 0


async def test_unknown_routes_and_methods_cannot_grow_the_metric_series(client: httpx.AsyncClient) -> None:
    """Nine methods on unknown paths and on known routes: an unmatched request counts under one route
    and one method value, and a method a route does not serve under one method value."""
    methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "BREW", "PROPFIND"]
    paths = [f"/nowhere/{i}" for i in range(5)] + ["/api/v1/tickets", "/healthz", "/api/v1/departments"]
    for method in methods:
        for path in paths:
            await client.request(method, path)
    served = {"/api/v1/tickets": {"POST"}, "/healthz": {"GET", "HEAD"}, "/api/v1/departments": {"GET", "HEAD"}}
    series = {
        (dict(pairs)["route"], dict(pairs)["method"])
        for name, pairs in await scrape(client)
        if name == "headoni_http_requests_total"
    }
    assert {method for route, method in series if route == "unmatched"} == {"OTHER"}
    for route, allowed in served.items():
        assert {method for r, method in series if r == route} <= {*allowed, "OTHER"}, route


async def test_a_scrape_is_rendered_at_most_once_per_max_age(config: Settings, database_url: str) -> None:
    """However many clients scrape, a process renders the metrics at most once per
    HEADONI_METRICS_MAX_AGE_SECONDS; in between, scrapes get the same bytes."""
    cached = msgspec.structs.replace(config, metrics_max_age_seconds=3600.0)
    async with app_client(cached, database_url) as c:
        first = (await c.get("/metrics")).content
        assert (await c.get("/healthz")).status_code == 200
        assert (await c.get("/metrics")).content == first
    async with app_client(msgspec.structs.replace(config, metrics_max_age_seconds=0.0), database_url) as c:
        assert (await c.get("/metrics")).content != first
