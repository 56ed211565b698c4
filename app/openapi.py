"""The OpenAPI 3.1 document at /api/v1/openapi.json, and the reference page at /docs.

The JSON Schemas come from the msgspec structs that decode and encode the bodies (msgspec's JSON Schema
support), and each route's error answers from the ApiError classes it raises: their statuses, codes and
headers. What is written by hand is one row per operation, in app/operations.py's table.
/docs is Swagger UI, its assets shipped in the swagger-ui-py package and served from here (no CDN).
"""

import base64
import functools
import hashlib
import importlib.util
from collections.abc import Awaitable, Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, Final, NamedTuple

import msgspec
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from app.errors import (
    ApiError,
    ErrorBody,
    InsufficientScope,
    ServiceUnavailable,
    TokenDeskMismatch,
    Unauthenticated,
)
from app.services import services

OPENAPI_PATH: Final = "/api/v1/openapi.json"
DOCS_PATH: Final = "/docs"
ASSETS_PATH: Final = "/docs/assets"


class Reply(NamedTuple):
    """A success (or non-error) answer of an operation."""

    status: int
    description: str
    body: type | None = None  # a msgspec struct, or None for a body that is not one (media_type says what)
    media_type: str = "application/json"
    headers: tuple[str, ...] = ()  # names of HEADERS


class Operation(NamedTuple):
    """One operation, declared once (app/operations.py): its route and handler, the scope it needs, and
    everything the document says of it that the code does not already say."""

    method: str
    path: str
    operation_id: str
    summary: str
    tag: str
    handler: Callable[..., Awaitable[Response]]  # (request, token) with a token, else (request)
    replies: tuple[Reply, ...]
    token: bool = True  # needs a bearer token of the desk named by the Host header
    scope: str | None = None  # ... holding this scope
    body: type | None = None
    errors: tuple[type[ApiError], ...] = ()  # beyond those every token route and every route can answer
    parameters: tuple[str, ...] = ()  # names of PARAMETERS beyond X-Request-Id
    description: str = ""
    example: Any = None  # a body that works as it stands: Swagger UI's "Try it out" starts from it
    limited: bool = False  # charged to the token's rate limit: its answers carry the RateLimit fields


HEADERS: Final[dict[str, tuple[str, str, dict[str, Any], bool]]] = {
    # component name: (header name, description, schema, always sent with the responses that name it)
    "XRequestId": (
        "X-Request-Id",
        "The request's id: the client's own when it sent a sane one, else a new one. Quote it to find the "
        "request in the access log.",
        {"type": "string"},
        True,
    ),
    "Location": ("Location", "The path of the new ticket: /api/v1/tickets/{id}.", {"type": "string"}, True),
    "IdempotentReplayed": (
        "Idempotent-Replayed",
        "`true` when this answer is the stored outcome of an earlier request with the same Idempotency-Key.",
        {"type": "string", "enum": ["true"]},
        False,
    ),
    "WWWAuthenticate": ("WWW-Authenticate", "`Bearer`.", {"type": "string"}, True),
    "RetryAfter": ("Retry-After", "Seconds to wait before retrying.", {"type": "string", "pattern": "^[0-9]+$"}, True),
    "Connection": ("Connection", "`close`: the connection ends here.", {"type": "string", "enum": ["close"]}, True),
    "RateLimitPolicy": (
        "RateLimit-Policy",
        'The token\'s quota policy, a Structured Field List: `"creates";q=<units>;w=<seconds>;headoni-burst=<units>` '
        "(q units per w seconds, up to headoni-burst at once). Sent while a limit applies (docs/limits.md).",
        {"type": "string"},
        False,
    ),
    "RateLimit": (
        "RateLimit",
        'What is left of it: `"creates";r=<units>;t=<seconds>`: r units may be sent now; t (absent when the '
        "budget is whole) is the seconds until another unit comes. Sent while a limit applies.",
        {"type": "string"},
        False,
    ),
}

PARAMETERS: Final[dict[str, dict[str, Any]]] = {
    "RequestId": {
        "name": "X-Request-Id",
        "in": "header",
        "required": False,
        "description": "Your id for this request (1 to 128 of A-Z a-z 0-9 . _ -); echoed back, and logged.",
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,128}$"},
    },
    "IdempotencyKey": {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "description": "Makes retries safe: the same key with the same body replays the stored outcome "
        "(Idempotent-Replayed: true); with another body, 422 idempotency_key_reused. Scoped to the token.",
        "schema": {"type": "string", "pattern": "^[!-~]{1,255}$"},
    },
    "TicketRef": {
        "name": "ref",
        "in": "path",
        "required": True,
        "description": "The ticket's number (at most 10 digits) or its id (more digits).",
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    },
}
_PATH_PARAMETERS: Final = {"{ref}": "TicketRef"}

_DESCRIPTION: Final = """\
Ticket intake for Headoni help desks.

**The desk** is the first label of the `Host` header below the service's base domain
(`acme.headoni.app` is desk `acme`). **A token** of that desk goes in `Authorization: Bearer hd_...`;
each operation names the scope it needs.

**Errors** are JSON: `{"error": "<code>", "message": "..."}`; `invalid_body` adds `issues`, every
problem at once, and a 500 adds `requestId`. Any path that is no route answers 404 `not_found`, and a
route asked with another method answers 405 `method_not_allowed`. Every answer carries `X-Request-Id`.

**Try it out** sends each request to the host this page was opened on, so open it on your desk's host
(`{docs}`), press **Authorize** and paste a token (`hd_...`). The API answers no cross-origin (CORS)
request: a token is a server's secret, never a web page's.
"""


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _header_refs(names: tuple[str, ...] | list[str]) -> dict[str, Any]:
    return {HEADERS[n][0]: {"$ref": f"#/components/headers/{n}"} for n in ("XRequestId", *names)}


def _error_replies(errors: list[type[ApiError]]) -> dict[str, Any]:
    """One response per status, listing the error codes it may carry and their headers."""
    replies: dict[str, Any] = {}
    for status in sorted({e.status for e in errors}):
        same = [e for e in errors if e.status == status]
        codes = list(dict.fromkeys(e.code for e in same))
        headers = [name.replace("-", "") for e in same for name in e.headers]
        replies[str(status)] = {
            "description": "\n".join(f"- `{e.code}`: {e.default_message}" for e in same),
            "headers": _header_refs(list(dict.fromkeys(headers))),
            "content": {
                "application/json": {
                    "schema": {"allOf": [_ref("ErrorBody"), {"properties": {"error": {"enum": codes}}}]}
                }
            },
        }
    return replies


def _operation(op: Operation, refs: dict[type, dict[str, Any]]) -> dict[str, Any]:
    errors: list[type[ApiError]] = list(op.errors)
    if op.token:
        errors += [Unauthenticated, TokenDeskMismatch, *([InsufficientScope] if op.scope else []), ServiceUnavailable]
    errors.append(ApiError)  # 500 internal_error, anywhere
    parameters = [PARAMETERS[_PATH_PARAMETERS[p]] for p in _PATH_PARAMETERS if p in op.path]
    parameters += [{"$ref": f"#/components/parameters/{name}"} for name in ("RequestId", *op.parameters)]
    responses: dict[str, Any] = {}
    for reply in op.replies:
        content = {reply.media_type: {"schema": refs[reply.body]} if reply.body else {}}
        responses[str(reply.status)] = {
            "description": reply.description,
            "headers": _header_refs(reply.headers),
            "content": content,
        }
    responses.update(_error_replies(sorted(errors, key=lambda e: e.status)))
    if op.limited:  # from the body's check on (401 and 403 come before the token's quota is known)
        for status, response in responses.items():
            if status not in ("401", "403"):
                response["headers"].update(_header_refs(["RateLimitPolicy", "RateLimit"]))
    operation: dict[str, Any] = {
        "operationId": op.operation_id,
        "summary": op.summary,
        "tags": [op.tag],
        "security": [{"bearerAuth": [op.scope] if op.scope else []}] if op.token else [],
        "parameters": parameters,
        "responses": responses,
    }
    description = op.description
    if op.token:
        needs = f"a token with scope `{op.scope}`" if op.scope else "any valid token of the desk"
        description = f"Needs {needs}. {description}".strip()
    if description:
        operation["description"] = description
    if op.body is not None:
        media: dict[str, Any] = {"schema": refs[op.body]}
        if op.example is not None:
            media["example"] = op.example
        operation["requestBody"] = {"required": True, "content": {"application/json": media}}
    return operation


def _servers(base_domain: str, port: int | None) -> list[dict[str, Any]]:
    """First the host the document was read from (a relative URL), so /docs opened on a desk's host sends
    "Try it out" to that same origin: no CORS needed, and none is offered (docs/api.md says why). Then
    any desk by name, on the port this server listens on (or https in production)."""
    here = {"url": "/", "description": "The host of this page, which names your desk"}
    desk = {"default": "acme", "description": "The desk's subdomain."}
    if base_domain == "localhost":
        served = {"default": str(port or 8000), "description": "The port `headoni serve` listens on."}
        named = {"url": "http://{desk}.localhost:{port}", "variables": {"desk": desk, "port": served}}
    else:
        named = {"url": f"https://{{desk}}.{base_domain}", "variables": {"desk": desk}}
    return [here, {**named, "description": "A desk by name"}]


def _docs_url(base_domain: str, port: int | None) -> str:
    if base_domain == "localhost":
        return f"http://acme.localhost:{port or 8000}/docs"
    return f"https://acme.{base_domain}/docs"


def build(base_domain: str, operations: Sequence[Operation], port: int | None = None) -> dict[str, Any]:
    """The OpenAPI document as a dict, its schemas generated from the msgspec structs."""
    types = list(dict.fromkeys([*(op.body for op in operations if op.body), ErrorBody]))
    types += [r.body for op in operations for r in op.replies if r.body and r.body not in types]
    schemas, components = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
    refs = dict(zip(types, schemas, strict=True))
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op, refs)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Headoni tickets API",
            "version": metadata.version("headoni"),
            "description": _DESCRIPTION.replace("{docs}", _docs_url(base_domain, port)),
        },
        "servers": _servers(base_domain, port),
        "tags": [
            {"name": "tickets", "description": "Create and read tickets."},
            {"name": "catalog", "description": "The ids a ticket may name."},
            {"name": "operations", "description": "Health, metrics and this documentation; no token needed."},
        ],
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "hd_<secret>",
                    "description": "A token of the desk, made with `headoni token create`.",
                }
            },
            "parameters": PARAMETERS,
            "headers": {
                name: {"description": description, "schema": schema, "required": required}
                for name, (_, description, schema, required) in HEADERS.items()
            },
        },
    }


def document_handler(operations: Callable[[], Sequence[Operation]]) -> Callable[[Request], Awaitable[Response]]:
    """The handler of GET /api/v1/openapi.json for the table `operations()` returns: the document built
    once per base domain and listening port (a process has one or few)."""

    @functools.lru_cache(maxsize=8)
    def document(base_domain: str, port: int | None) -> bytes:
        return msgspec.json.encode(build(base_domain, operations(), port=port))

    async def openapi_json(request: Request) -> Response:
        server = request.scope.get("server")  # the socket's own address: the port actually served, not the Host's
        port = server[1] if server and isinstance(server[1], int) else None
        return Response(document(services(request).settings.base_domain, port), media_type="application/json")

    return openapi_json


def _swagger_ui_dir() -> Path:
    # find_spec locates the package without importing it (its __init__ pulls in jinja2 for other uses).
    spec = importlib.util.find_spec("swagger_ui")
    assert spec is not None and spec.submodule_search_locations, "swagger-ui-py is not installed"
    return Path(next(iter(spec.submodule_search_locations))) / "static"


_DOCS_SCRIPT: Final = (
    f'window.ui = SwaggerUIBundle({{url: "{OPENAPI_PATH}", dom_id: "#swagger-ui", deepLinking: true}});'
)
_DOCS_PAGE: Final = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Headoni tickets API</title>
<link rel="stylesheet" href="{ASSETS_PATH}/swagger-ui.css">
<link rel="icon" type="image/png" href="{ASSETS_PATH}/favicon-32x32.png">
</head>
<body>
<div id="swagger-ui"></div>
<script src="{ASSETS_PATH}/swagger-ui-bundle.js"></script>
<script>{_DOCS_SCRIPT}</script>
</body>
</html>
"""
# The page's policy allows this one inline script by its hash, and no other.
_DOCS_SCRIPT_HASH: Final = base64.b64encode(hashlib.sha256(_DOCS_SCRIPT.encode()).digest()).decode()


@functools.lru_cache(maxsize=4)
def docs_headers(base_domain: str) -> dict[str, str]:
    """The page's Content-Security-Policy: its scripts, styles, images and fonts from this server only
    (and its one inline script; Swagger UI sets inline styles and uses data: images), no frames, forms
    or plugins; and it fetches from this server and from the desks' hosts, where "Try it out" sends
    its requests."""
    desks = "http://*.localhost:*" if base_domain == "localhost" else f"https://*.{base_domain}"
    policy = (
        f"default-src 'none'; script-src 'self' 'sha256-{_DOCS_SCRIPT_HASH}'; "
        "style-src 'self' 'unsafe-inline'; img-src 'self' data:; font-src 'self';"
        f" connect-src 'self' {desks}; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'; object-src 'none'"
    )
    return {"Content-Security-Policy": policy, "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer"}


async def docs(request: Request) -> Response:
    return HTMLResponse(_DOCS_PAGE, headers=docs_headers(services(request).settings.base_domain))


def assets() -> Mount:
    """The page's assets (Swagger UI's own files), served from the installed package."""
    return Mount(ASSETS_PATH, app=StaticFiles(directory=_swagger_ui_dir()), name="docs-assets")
