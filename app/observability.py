"""What operators see: request ids, one access-log line per request, and Prometheus metrics.

One pure ASGI middleware does it all on the hot path, with no awaits of its own: it picks the request
id, stamps it on the response, times the request, and on the way out counts it and queues its log
line (app/logs.py). Answers the HTTP layer gives itself (app/http.py) are counted and logged the same.

Metrics live in prometheus-client's registry. When PROMETHEUS_MULTIPROC_DIR is set (`headoni serve
--workers N` sets it up, app/metrics_dir.py), every worker writes its values there and a scrape of any
worker sums them all.
"""

import asyncio
import glob
import itertools
import os
import re
import time
from collections.abc import Awaitable
from datetime import UTC, datetime
from typing import Any, Final

import asyncpg
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import settings
from app.auth import Token
from app.errors import SCOPE_ADMISSION, SCOPE_ERROR, SCOPE_REQUEST_ID, SCOPE_TOKEN, unexpected_error_handler
from app.logs import ACCESS_LOG, AccessRecord
from app.services import of_state, services
from app.statement import Outcome

# prometheus-client chooses its storage when first imported; the same environment decides here.
MULTIPROC_DIR: Final = settings.metrics_dir()

# The *_created samples (when each series began) add a line per series to every scrape and say
# nothing Prometheus needs.
disable_created_metrics()  # type: ignore[no-untyped-call]

_LABELS: Final = ("route", "method", "status")
REQUESTS: Final = Counter("headoni_http_requests", "HTTP requests answered, by route template and status.", _LABELS)
LATENCY: Final = Histogram(
    "headoni_http_request_duration_seconds",
    "Time from the request's arrival to the end of its response, by route template and status.",
    _LABELS,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
TICKETS_CREATED: Final = Counter("headoni_tickets_created", "Tickets created (idempotent replays not counted).")
BLOCKED: Final = Counter(
    "headoni_blocked_answers", "Tickets answered {ok: true} and not written because the requester is blocklisted."
)
ERRORS: Final = Counter("headoni_errors", "Error responses, by the contract's error code.", ("code",))
ABORTED: Final = Counter(
    "headoni_create_statements_aborted",
    "Create statements the database aborted whole, by SQLSTATE (40P01 deadlock, 40001 serialization failure); "
    "each is run again, up to 3 runs in all.",
    ("sqlstate",),
)
SPLITS: Final = Counter(
    "headoni_create_statements_split",
    "Shared create statements that failed and were split in two, so that one rider cannot fail the others.",
)
POOL: Final = Gauge(
    "headoni_db_pool_connections", "Database pool connections, in use or idle.", ("state",), multiprocess_mode="livesum"
)
POOL_MAX: Final = Gauge(
    "headoni_db_pool_max_connections", "The most connections the database pools may open.", multiprocess_mode="livesum"
)
RATE_LIMITED: Final = Counter(
    "headoni_rate_limited", "Creates answered 429 rate_limited, by route template (docs/limits.md).", ("route",)
)
SHED: Final = Counter(
    "headoni_shed", "Creates shed past capacity with 503 service_unavailable, by route template.", ("route",)
)
_DECISION_COUNTERS: Final = {"rate_limited": RATE_LIMITED, "shed": SHED}
_IN_USE: Final = POOL.labels("in_use")
_IDLE: Final = POOL.labels("idle")

# Labels stay few and cannot be grown from outside: a request that matched no route is counted under
# one route value, and a method a route does not serve (or any method of an unmatched request) under
# one method value. Statuses come from the service's own answers. There is no per-desk label.
_UNMATCHED: Final = "unmatched"
_OTHER_METHOD: Final = "OTHER"
_MOUNT_METHODS: Final = frozenset({"GET", "HEAD"})  # what a Mount (the /docs assets) serves
_series: Final[dict[tuple[str, str, int], tuple[Any, Any]]] = {}
_errors: Final[dict[str, Any]] = {}

CLIENT_GONE: Final = 499  # the status logged for a request whose client went away before its answer

REQUEST_ID_HEADER: Final = b"x-request-id"
_SANE_REQUEST_ID: Final = re.compile(rb"[A-Za-z0-9._-]{1,128}")
# A generated id: a random prefix per process and a counter, so ids never repeat across processes or
# restarts in practice, at the cost of a string format (no randomness per request).
_ID_PREFIX: Final = os.urandom(6).hex()
_ID_COUNTER: Final = itertools.count(1)
NOSNIFF: Final = (b"x-content-type-options", b"nosniff")


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):08x}"


def request_id_of(headers: list[tuple[bytes, bytes]] | None) -> str:
    """The client's X-Request-Id when it is sane, else a new one."""
    for name, value in headers or ():
        if name == REQUEST_ID_HEADER:
            if _SANE_REQUEST_ID.fullmatch(value):
                return value.decode("ascii")
            break
    return new_request_id()


class WriterMetrics:
    """The writer's events (app/writer.py Events), counted: tickets created, blocked answers, statements
    the database aborted and shared statements split."""

    def written(self, outcomes: list[Outcome]) -> None:
        created = outcomes.count(Outcome.CREATED)
        if created:
            TICKETS_CREATED.inc(created)
        blocked = outcomes.count(Outcome.BLOCKED)
        if blocked:
            BLOCKED.inc(blocked)

    def aborted(self, sqlstate: str) -> None:
        ABORTED.labels(sqlstate).inc()

    def split(self) -> None:
        SPLITS.inc()


METRICS: Final = WriterMetrics()


def count_request(route: Any, method: str, status: int, seconds: float, error: str | None) -> None:
    """Count one answer in the request metrics, under its route template (or none: unmatched)."""
    template: str | None = getattr(route, "path", None)
    if template is None:
        key = (_UNMATCHED, _OTHER_METHOD, status)
    else:
        served = getattr(route, "methods", None) or _MOUNT_METHODS
        key = (template, method if method in served else _OTHER_METHOD, status)
    series = _series.get(key)
    if series is None:
        labels = (key[0], key[1], str(status))
        series = _series[key] = (REQUESTS.labels(*labels), LATENCY.labels(*labels))
    series[0].inc()
    series[1].observe(seconds)
    if error:
        counter = _errors.get(error)
        if counter is None:  # codes come from app/errors.py; the bound is only a safety net
            counter = _errors[error] = ERRORS.labels(error if len(_errors) < 100 else "other")
        counter.inc()


def record_answer(
    request_id: str, method: str | None, path: str | None, status: int, error: str, seconds: float
) -> None:
    """Count and log an answer the HTTP layer gave itself (app/http.py), before or instead of the app."""
    count_request(None, method or "", status, seconds, error)
    ACCESS_LOG.emit(
        AccessRecord(datetime.now(UTC), request_id, method, None, path, status, round(seconds * 1000, 3), None, None,
                     error)
    )


class Observability:
    """The pure ASGI middleware: request id in and out, access log, request metrics."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._sampled_pool: asyncpg.Pool | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = request_id_of(scope["headers"])
        scope[SCOPE_REQUEST_ID] = request_id
        header = (REQUEST_ID_HEADER, request_id.encode("ascii"))
        status = 0

        # A plain function returning send's awaitable: no extra coroutine per message.
        def send_with_id(message: Message) -> Awaitable[None]:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = message.get("headers")
                extra = [header, NOSNIFF]
                admission = scope.get(SCOPE_ADMISSION)
                if admission is not None:
                    extra += admission.fields()
                if type(headers) is list:
                    headers += extra
                else:
                    message["headers"] = [*(headers or ()), *extra]
            return send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:  # the client left before its body arrived: nobody to answer, nothing wrong
            status = status or CLIENT_GONE
            scope.setdefault(SCOPE_ERROR, "client_disconnected")
        except Exception as exc:
            if status:  # the response has started: nothing more can be said to this client
                raise
            # Answered here rather than by Starlette's ServerErrorMiddleware outside, so the 500 carries
            # the request id (header and body) and its traceback is logged once, with the request id.
            response = await unexpected_error_handler(Request(scope), exc)
            await response(scope, receive, send_with_id)
        finally:
            self._finish(scope, request_id, status, time.perf_counter() - started)

    def _finish(self, scope: Scope, request_id: str, status: int, seconds: float) -> None:
        error: str | None = scope.get(SCOPE_ERROR)  # left by the error handler that answered (app/errors.py)
        route = scope.get("route")
        method: str = scope["method"]
        count_request(route, method, status, seconds, error)
        if MULTIPROC_DIR is not None and self._sampled_pool is None:
            self._start_pool_sampler(scope)
        admission = scope.get(SCOPE_ADMISSION)
        decision: str | None = admission.decision if admission is not None else None
        if decision in _DECISION_COUNTERS:
            _DECISION_COUNTERS[decision].labels(getattr(route, "path", None) or _UNMATCHED).inc()
        token: Token | None = scope.get(SCOPE_TOKEN)
        ACCESS_LOG.emit(
            AccessRecord(
                datetime.now(UTC),
                request_id,
                method,
                getattr(route, "path", None),
                scope["path"],
                status,
                round(seconds * 1000, 3),
                token.subdomain if token is not None else None,
                str(token.token_id) if token is not None else None,
                error or None,
                decision,
            )
        )

    def _start_pool_sampler(self, scope: Scope) -> None:
        """With several workers, each keeps its pool gauges fresh (a scrape reads only one worker's pool)."""
        found = of_state(scope.get("state"))
        pool = found.database.pool if found is not None else None
        if pool is not None:
            self._sampled_pool = pool
            self._sample_pool()

    def _sample_pool(self) -> None:
        pool = self._sampled_pool
        if pool is None or pool.is_closing():
            self._sampled_pool = None  # the next request starts over, with the pool it finds then
            return
        set_pool_gauges(pool)
        asyncio.get_running_loop().call_later(1.0, self._sample_pool)


def set_pool_gauges(pool: asyncpg.Pool) -> None:
    idle = pool.get_idle_size()
    _IN_USE.set(pool.get_size() - idle)
    _IDLE.set(idle)
    POOL_MAX.set(pool.get_max_size())


def _forget_dead_workers(directory: str) -> None:
    """Drop the live gauges of workers that have exited (uvicorn restarts a worker that dies)."""
    for path in glob.glob(os.path.join(directory, "gauge_live*_*.db")):
        pid = path.rsplit("_", 1)[-1].removesuffix(".db")
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            multiprocess.mark_process_dead(int(pid), directory)  # type: ignore[no-untyped-call]
        except PermissionError:
            pass


class _Scrape:
    """The latest rendered scrape of this process, and when it was rendered."""

    rendered_at = -float("inf")
    data = b""


async def metrics(request: Request) -> Response:
    """GET /metrics: Prometheus text format, for every worker of this server.

    Rendering costs milliseconds of the event loop (more with several workers, whose files are read),
    so a scrape reuses the one rendered within HEADONI_METRICS_MAX_AGE_SECONDS: however many clients
    scrape, the process renders at most once per that time."""
    now = time.monotonic()
    found = services(request)
    if now - _Scrape.rendered_at >= found.settings.metrics_max_age_seconds:
        _Scrape.data, _Scrape.rendered_at = _render(found.database.pool), now
    return Response(_Scrape.data, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _render(pool: asyncpg.Pool | None) -> bytes:
    if pool is not None:
        set_pool_gauges(pool)  # exact at scrape time for this process
    if MULTIPROC_DIR is None:
        return generate_latest()
    _forget_dead_workers(MULTIPROC_DIR)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, MULTIPROC_DIR)  # type: ignore[no-untyped-call]
    return generate_latest(registry)
