"""The OpenAPI document: a valid 3.1 document covering every route, and real answers match it."""

import re
from typing import Any

import asyncpg
import httpx
import jsonschema
import pytest
from openapi_spec_validator import validate
from starlette.routing import Route

from app import admin, openapi, operations
from app.ids import Snowflake
from app.main import create_app
from app.settings import Settings
from bench.server import Server
from tests.support.api import new_token
from tests.support.desks import Desk, ticket_body

Doc = dict[str, Any]


@pytest.fixture(scope="module")
async def doc(client: httpx.AsyncClient) -> Doc:
    response = await client.get("/api/v1/openapi.json", headers={"Host": "localhost"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body: Doc = response.json()
    return body


def check(doc: Doc, method: str, path: str, response: httpx.Response) -> Any:
    """The response is one the document declares for this operation: status, required headers, media
    type, and a body valid against the declared schema. Returns the parsed body."""
    operation = doc["paths"][path][method.lower()]
    declared = operation["responses"].get(str(response.status_code))
    assert declared is not None, f"{method} {path} does not declare {response.status_code}: {response.text}"
    for name, ref in declared.get("headers", {}).items():
        header = doc["components"]["headers"][ref["$ref"].rsplit("/", 1)[1]]
        if header.get("required"):
            assert name in response.headers, f"{method} {path} {response.status_code} lacks {name}"
    media_type = response.headers["content-type"].split(";")[0]
    content = {k.split(";")[0]: v for k, v in declared["content"].items()}
    assert media_type in content, (media_type, list(content))
    schema = content[media_type].get("schema")
    if media_type != "application/json":
        return response.text
    body = response.json()
    if schema is not None:
        jsonschema.Draft202012Validator(
            {**schema, "components": doc["components"]}, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
        ).validate(body)
    return body


def test_document_is_valid_openapi_3_1() -> None:
    document = openapi.build("headoni.app", operations.OPERATIONS)
    assert document["openapi"].startswith("3.1")
    validate(document)  # raises on any violation of the OpenAPI 3.1 schema or its references
    assert [server["url"] for server in document["servers"]] == ["/", "https://{desk}.headoni.app"]


@pytest.mark.e2e
def test_servers_are_this_origin_then_any_desk_on_the_port_served(server: Server) -> None:
    document = httpx.get(f"{server.base_url}/api/v1/openapi.json", timeout=10).json()
    here, named = document["servers"]
    assert here["url"] == "/"  # Swagger UI resolves it against the page: "Try it out" stays same-origin
    assert named["url"] == "http://{desk}.localhost:{port}"
    assert named["variables"]["port"]["default"] == str(server.port)  # not 8000: the port actually served
    assert f"`http://acme.localhost:{server.port}/docs`" in document["info"]["description"]


async def test_request_examples_are_bodies_the_api_accepts(client: httpx.AsyncClient, doc: Doc, desk: Desk) -> None:
    """Swagger UI's "Try it out" starts from these: as they stand, they must create tickets."""
    for path, expected in (("/api/v1/tickets", 201), ("/api/v1/tickets/batch", 200)):
        example = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["example"]
        response = await client.post(path, json=example, headers=desk.headers())
        assert response.status_code == expected, response.text
        check(doc, "POST", path, response)
        if path.endswith("batch"):
            assert [r["status"] for r in response.json()["results"]] == [201] * len(example["tickets"])


async def test_no_cross_origin_access_is_offered(client: httpx.AsyncClient, desk: Desk) -> None:
    """Tokens are servers' secrets: no page of another origin may call the API from a browser."""
    origin = {"Origin": "http://evil.example"}
    preflight = await client.options(
        "/api/v1/tickets",
        headers={**desk.headers(), **origin, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"},
    )
    assert preflight.status_code == 405
    simple = await client.get("/api/v1/departments", headers={**desk.headers(), **origin})
    assert simple.status_code == 200
    for response in (preflight, simple):
        assert not [name for name in response.headers if name.lower().startswith("access-control-")]


def test_every_route_of_the_app_is_documented_and_nothing_else(config: Settings) -> None:
    app = create_app(config)
    routes = {
        (method, route.path)
        for route in app.routes
        if isinstance(route, Route)
        for method in (route.methods or set()) - {"HEAD"}
    }
    documented = {(op.method, op.path) for op in operations.OPERATIONS}
    assert routes == documented


def test_schemas_are_those_of_the_msgspec_structs(doc: Doc) -> None:
    schemas = doc["components"]["schemas"]
    assert set(schemas["TicketIn"]["required"]) == {"email", "subject", "body"}
    assert schemas["TicketIn"]["properties"]["subject"]["maxLength"] == 500
    assert schemas["BatchIn"]["properties"]["tickets"]["items"] == {"$ref": "#/components/schemas/TicketIn"}
    assert "requestId" in schemas["ErrorBody"]["properties"]
    assert set(schemas["Ticket"]["required"]) >= {"id", "number", "requester", "messages", "events"}


def test_security_and_errors_per_route(doc: Doc) -> None:
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "bearerFormat": "hd_<secret>",
        "description": "A token of the desk, made with `headoni token create`.",
    }
    for op in operations.OPERATIONS:
        operation = doc["paths"][op.path][op.method.lower()]
        statuses = set(operation["responses"])
        assert "500" in statuses
        if op.token:
            assert operation["security"] == [{"bearerAuth": [op.scope] if op.scope else []}]
            assert {"401", "403", "503"} <= statuses
            assert "WWW-Authenticate" in operation["responses"]["401"]["headers"]
            assert "Retry-After" in operation["responses"]["503"]["headers"]
        else:
            assert operation["security"] == []
    create = doc["paths"]["/api/v1/tickets"]["post"]["responses"]
    assert create["400"]["content"]["application/json"]["schema"]["allOf"][1]["properties"]["error"]["enum"] == [
        "invalid_body", "department_not_found", "ticket_type_not_found"
    ]
    assert {"200", "201", "400", "401", "403", "408", "413", "422", "429", "500", "503"} == set(create)
    assert "Retry-After" in create["429"]["headers"]
    for status, response in create.items():  # the RateLimit fields, on every answer once the token is known
        assert ("RateLimit" in response["headers"]) == (status not in ("401", "403")), status
        assert ("RateLimit-Policy" in response["headers"]) == (status not in ("401", "403")), status
    assert set(doc["paths"]["/api/v1/tickets/{ref}"]["get"]["responses"]) == {"200", "401", "403", "404", "500", "503"}


async def test_create_answers_match_the_document(
    client: httpx.AsyncClient, doc: Doc, desk: Desk, pool: asyncpg.Pool, ids: Snowflake
) -> None:
    path = "/api/v1/tickets"
    created = check(doc, "POST", path, await client.post(path, json=ticket_body(), headers=desk.headers()))
    assert created["ticket"]["number"] == 1
    async with pool.acquire() as conn:
        await admin.add_blocklist(conn, desk.subdomain, "spam.example")
    blocked = await client.post(path, json=ticket_body(email="bob@spam.example"), headers=desk.headers())
    assert check(doc, "POST", path, blocked) == {"ok": True}
    invalid = await client.post(path, json={"email": "nope", "subject": ""}, headers=desk.headers())
    assert len(check(doc, "POST", path, invalid)["issues"]) == 3
    unknown = await client.post(path, json=ticket_body(departmentId="42"), headers=desk.headers())
    assert check(doc, "POST", path, unknown)["error"] == "department_not_found"
    unauthenticated = await client.post(path, json=ticket_body(), headers={"Host": desk.host})
    assert check(doc, "POST", path, unauthenticated)["error"] == "unauthenticated"
    reader = await new_token(pool, ids, desk, "tickets:read")
    no_scope = await client.post(path, json=ticket_body(), headers=desk.headers(reader))
    assert check(doc, "POST", path, no_scope)["error"] == "insufficient_scope"
    too_large = await client.post(path, content=b"x" * (1024 * 1024 + 1), headers=desk.headers())
    assert check(doc, "POST", path, too_large)["error"] == "payload_too_large"
    key = desk.headers(**{"Idempotency-Key": "k-1"})
    check(doc, "POST", path, await client.post(path, json=ticket_body(), headers=key))
    reused = await client.post(path, json=ticket_body(subject="Another"), headers=key)
    assert check(doc, "POST", path, reused)["error"] == "idempotency_key_reused"


async def test_batch_answer_matches_the_document(client: httpx.AsyncClient, doc: Doc, desk: Desk) -> None:
    items = [ticket_body(), {"email": "nope"}, ticket_body(ticketTypeId="7")]
    response = await client.post("/api/v1/tickets/batch", json={"tickets": items}, headers=desk.headers())
    results = check(doc, "POST", "/api/v1/tickets/batch", response)["results"]
    assert [r["status"] for r in results] == [201, 400, 400]


async def test_read_answers_match_the_document(client: httpx.AsyncClient, doc: Doc, desk: Desk) -> None:
    created = await client.post("/api/v1/tickets", json=ticket_body(), headers=desk.headers())
    ticket_id = created.json()["ticket"]["id"]
    path = "/api/v1/tickets/{ref}"
    for ref in ("1", ticket_id):
        body = check(doc, "GET", path, await client.get(f"/api/v1/tickets/{ref}", headers=desk.headers()))
        assert body["ticket"]["id"] == ticket_id
    missing = await client.get("/api/v1/tickets/99", headers=desk.headers())
    assert check(doc, "GET", path, missing)["error"] == "ticket_not_found"
    other_host = await client.get("/api/v1/tickets/1", headers=desk.headers(Host="other.localhost"))
    assert check(doc, "GET", path, other_host)["error"] == "token_desk_mismatch"
    for path, key in (("/api/v1/departments", "departments"), ("/api/v1/ticket-types", "ticketTypes")):
        listed = check(doc, "GET", path, await client.get(path, headers=desk.headers()))
        assert listed[key][0]["default"] is True


@pytest.mark.parametrize("host", ["localhost", "acme.localhost", "example.com"])
async def test_operations_routes_answer_on_any_host_without_a_token(
    client: httpx.AsyncClient, doc: Doc, host: str
) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/api/v1/openapi.json", "/docs"):
        response = await client.get(path, headers={"Host": host})
        assert response.status_code == 200, (path, response.text)
        check(doc, "GET", path, response)


async def test_docs_page_is_swagger_ui_served_from_the_package(client: httpx.AsyncClient) -> None:
    page = await client.get("/docs", headers={"Host": "localhost"})
    assert page.headers["content-type"].startswith("text/html")
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert "/docs/assets/swagger-ui-bundle.js" in assets
    assert "/api/v1/openapi.json" in page.text
    assert not re.search(r"https?://", page.text), "no CDN: every asset comes from this server"
    for asset in assets:
        response = await client.get(asset, headers={"Host": "localhost"})
        assert response.status_code == 200, asset
    bundle = await client.get("/docs/assets/swagger-ui-bundle.js", headers={"Host": "localhost"})
    assert "SwaggerUIBundle" in bundle.text
