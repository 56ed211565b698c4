"""Contract errors as values: one ApiError base with a status and a code, rendered one way."""

import logging
from typing import Any, ClassVar, Final

import msgspec
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

log = logging.getLogger("headoni")

# Facts about a request that the access log (app/observability.py) reads back from its ASGI scope:
# the request id, the token that authenticated it (set by app/auth.py), and a create's admission.
SCOPE_REQUEST_ID: Final = "headoni.request_id"
SCOPE_TOKEN: Final = "headoni.token"
SCOPE_ERROR: Final = "headoni.error"  # the contract's code of an error answer, left by the handler that gave it
SCOPE_ADMISSION: Final = "headoni.admission"  # a create's app/limiter.py Admission: RateLimit fields, decision


class Issue(msgspec.Struct, frozen=True):
    path: list[str | int]
    code: str
    message: str


class ErrorBody(msgspec.Struct, omit_defaults=True):
    error: str
    message: str
    issues: list[Issue] | None = None
    requestId: str | None = None  # on 500s only: the X-Request-Id to quote when reporting the failure


_encode = msgspec.json.Encoder().encode


class ApiError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    default_message: ClassVar[str] = "An unexpected error occurred."
    headers: ClassVar[dict[str, str]] = {}

    def __init__(
        self, message: str | None = None, issues: list[Issue] | None = None, *, headers: dict[str, str] | None = None
    ) -> None:
        self.message = message or self.default_message
        self.issues = issues
        self.extra_headers = headers  # this answer's own, beside the class's (Retry-After, Idempotent-Replayed)
        super().__init__(self.message)

    def response(self, request_id: str | None = None) -> Response:
        body = ErrorBody(error=self.code, message=self.message, issues=self.issues, requestId=request_id)
        headers = {**self.headers, **self.extra_headers} if self.extra_headers else self.headers
        return Response(_encode(body), self.status, headers, media_type="application/json")

    def answer(self, request: Request, request_id: str | None = None) -> Response:
        """The response, with the error's code left in the request's scope for the access log and metrics."""
        request.scope[SCOPE_ERROR] = self.code
        return self.response(request_id)


class InvalidBody(ApiError):
    status = 400
    code = "invalid_body"
    default_message = "The request body is invalid; see issues."


class DepartmentNotFound(ApiError):
    status = 400
    code = "department_not_found"
    default_message = "departmentId is not a department of this desk, or it was deleted."


class TicketTypeNotFound(ApiError):
    status = 400
    code = "ticket_type_not_found"
    default_message = "ticketTypeId is not a ticket type of this desk, or it was archived."


class Unauthenticated(ApiError):
    status = 401
    code = "unauthenticated"
    default_message = "A valid token is required: Authorization: Bearer hd_<secret>."
    headers: ClassVar[dict[str, str]] = {"WWW-Authenticate": "Bearer"}


class InsufficientScope(ApiError):
    status = 403
    code = "insufficient_scope"
    default_message = "The token lacks the scope this route needs."


class TokenDeskMismatch(ApiError):
    status = 403
    code = "token_desk_mismatch"
    default_message = "The token's desk does not match the request host."


class BadRequest(ApiError):
    """Answered by the HTTP layer (app/http.py): bytes that are not a valid HTTP/1.1 request head."""

    status = 400
    code = "bad_request"
    default_message = "The request is not valid HTTP/1.1."


class HeadersTooLarge(ApiError):
    """Answered by the HTTP layer (app/http.py)."""

    status = 431
    code = "headers_too_large"
    default_message = "The request head is too large."


class NotFound(ApiError):
    status = 404
    code = "not_found"
    default_message = "No such route."


class TicketNotFound(ApiError):
    status = 404
    code = "ticket_not_found"
    default_message = "No such ticket on this desk."


class MethodNotAllowed(ApiError):
    status = 405
    code = "method_not_allowed"
    default_message = "This route does not accept that method."


class IdempotencyKeyReused(ApiError):
    status = 422
    code = "idempotency_key_reused"
    default_message = "This Idempotency-Key was used with another request body or route."


class RequestTimeout(ApiError):
    status = 408
    code = "request_timeout"
    default_message = "The request body did not arrive in time."
    headers: ClassVar[dict[str, str]] = {"Connection": "close"}  # the rest of the body is not awaited


class PayloadTooLarge(ApiError):
    status = 413
    code = "payload_too_large"
    default_message = "The request body is larger than 1 MiB."


class ServiceUnavailable(ApiError):
    status = 503
    code = "service_unavailable"
    default_message = "The database is unavailable; retry shortly."
    headers: ClassVar[dict[str, str]] = {"Retry-After": "1"}


class RateLimited(ApiError):
    """Over the token's rate limit (docs/limits.md): 429, with Retry-After in whole seconds."""

    status = 429
    code = "rate_limited"
    default_message = "Over this token's rate limit; retry after the Retry-After seconds."
    headers: ClassVar[dict[str, str]] = {"Retry-After": "1"}  # the OpenAPI document's; each answer its own

    def __init__(self, retry_after: int, message: str | None = None) -> None:
        super().__init__(
            message or f"Over this token's rate limit; retry in {retry_after} s (Retry-After).",
            headers={"Retry-After": str(retry_after)},
        )
        self.retry_after = retry_after


class Shed(ServiceUnavailable):
    """Past capacity: the create was shed (app/coalesce.py) rather than queued without bound."""

    default_message = "The service is over capacity; retry after Retry-After seconds."


class Contended(ServiceUnavailable):
    """The database aborted a create statement (deadlock or serialization failure) on every run."""

    default_message = "The database could not complete the write under contention; retry shortly."


async def api_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return exc.answer(request)


async def http_error_handler(request: Request, exc: Exception) -> Response:
    """Starlette's own routing errors (unknown route, wrong method) in the contract's format."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        allow = {"Allow": exc.headers["Allow"]} if exc.headers and "Allow" in exc.headers else None
        return MethodNotAllowed(headers=allow).answer(request)
    if exc.status_code == 404:
        return NotFound().answer(request)
    response = ApiError(str(exc.detail)).answer(request)
    response.status_code = exc.status_code
    return response


async def unexpected_error_handler(request: Request, exc: Exception) -> Response:
    request_id = request.scope.get(SCOPE_REQUEST_ID)
    log.error("unhandled error on %s %s (request %s)", request.method, request.url.path, request_id, exc_info=exc)
    return ApiError().answer(request, request_id)


def exception_handlers() -> dict[Any, Any]:
    return {
        ApiError: api_error_handler,
        HTTPException: http_error_handler,
        Exception: unexpected_error_handler,
    }
