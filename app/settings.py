"""Configuration, read once from the environment into a frozen struct.

Each default is declared once, on the struct's field; `load()` passes only what the environment sets.
"""

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import msgspec

from app.rates import Limit, parse_rate


def _default_pool_max_size() -> int:
    return max(4, 2 * (os.cpu_count() or 2))


def _default_data_dir() -> Path:
    return Path(".headoni").resolve()


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    database_url: str | None = None  # None: the embedded PostgreSQL in data_dir
    base_domain: str = "localhost"
    data_dir: Path = msgspec.field(default_factory=_default_data_dir)
    pool_min_size: int | None = None  # None: the pool opens all of pool_max_size at start
    pool_max_size: int = msgspec.field(default_factory=_default_pool_max_size)
    pool_timeout: float = 10.0  # seconds a request may wait for a pooled connection before 503
    statement_timeout_ms: int = 5000
    lock_timeout_ms: int = 3000
    token_cache_seconds: float = 1.0
    # create statements in flight per process (creates arriving meanwhile share the next); None: slots' default
    create_statements: int | None = None
    one_desk_statements: bool = False  # every create statement is of one desk, as Citus needs (HEADONI_STATEMENT_SCOPE)
    statement_scope_set: bool = False  # HEADONI_STATEMENT_SCOPE was given; unset, Citus gets one-desk (app/citus.py)
    citus: bool = False  # not from the environment: the database is Citus, found at start (app/citus.py)
    body_timeout_seconds: float = 30.0  # a request body must arrive whole within this, else 408
    idempotency_ttl_seconds: float = 24 * 3600.0  # an Idempotency-Key's outcome is replayed at least this long
    startup_timeout: float = 30.0  # seconds a starting server waits for its database before it gives up
    workers: int = 1  # server processes of `headoni serve`, unless --workers says otherwise
    # The limits of app/http.py, per server process (docs/reliability.md, "Hostile clients"):
    head_timeout_seconds: float = 10.0  # a request head must arrive whole within this, else 408 (or a close)
    max_connections: int = 2048  # open connections; past it the longest-idle one is closed
    request_bytes_budget: int = 32 * 2**20  # request body bytes held at once; past it 503 (set in MiB)
    anonymous_concurrency: int = 2  # requests without a token the process knows, running at once
    anonymous_rate: float = 1000.0  # ... and starting per second
    address_rate: float = 100.0  # per client address, new connections and anonymous requests a second; 0: no bound
    metrics_max_age_seconds: float = 1.0  # a /metrics scrape reuses one rendered at most this long ago
    default_rate: Limit | None = None  # the limit of tokens whose own and desk's are unset (HEADONI_DEFAULT_RATE)
    default_burst: int | None = None  # its burst (HEADONI_DEFAULT_BURST); unset: parse_rate's default
    rate_limits: bool = True  # HEADONI_RATE_LIMITS=off: no token is limited, whatever is configured
    create_queue: int = 400  # creates that may wait for a statement per process; past it, shed (503); 0: no bound

    @property
    def slots(self) -> int:
        """Create statements in flight per process: HEADONI_CREATE_STATEMENTS, else 1 when a statement may
        span desks (the fastest on one PostgreSQL, docs/benchmark.md) and 2 when each is of one desk (on
        Citus, statements of two desks run on two workers at once)."""
        if self.create_statements is not None:
            return self.create_statements
        return 2 if self.one_desk_statements else 1

    @property
    def default_limit(self) -> Limit | None:
        """The service's default limit, with its burst."""
        rate = self.default_rate
        if rate is None or self.default_burst is None:
            return rate
        return Limit(rate.units, rate.seconds, self.default_burst)


def _number(parse: Callable[[str], float], least: float | None = None, scale: float = 1) -> Callable[[str, str], Any]:
    """A parser for one numeric variable: its value, at least `least`, times `scale`."""

    def read(name: str, raw: str) -> Any:
        try:
            value = parse(raw)
        except ValueError:
            raise ValueError(f"{name} must be a number, not {raw!r}") from None
        if least is not None and value < least:
            raise ValueError(f"{name} must be at least {least}, not {raw!r}")
        return value * scale if scale != 1 else value

    return read


def _statement_scope(name: str, raw: str) -> bool:
    if raw not in ("any-desks", "one-desk"):
        raise ValueError(f"{name} must be any-desks or one-desk, not {raw!r}")
    return raw == "one-desk"


def _rate(name: str, raw: str) -> Limit | None:
    if raw == "none":
        return None
    try:
        return parse_rate(raw)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def _switch(name: str, raw: str) -> bool:
    if raw.lower() not in ("on", "off"):
        raise ValueError(f"{name} must be on or off, not {raw!r}")
    return raw.lower() == "on"


# field: (variable, parser). A variable that is unset or empty leaves the field's default.
VARIABLES: Final[dict[str, tuple[str, Callable[[str, str], Any]]]] = {
    "database_url": ("DATABASE_URL", lambda name, raw: raw),
    "base_domain": ("HEADONI_BASE_DOMAIN", lambda name, raw: raw.strip(".").lower()),
    "data_dir": ("HEADONI_DATA_DIR", lambda name, raw: Path(raw).expanduser().resolve()),
    "pool_min_size": ("HEADONI_POOL_MIN_SIZE", _number(int, least=0)),
    "pool_max_size": ("HEADONI_POOL_MAX_SIZE", _number(int, least=1)),
    "pool_timeout": ("HEADONI_POOL_TIMEOUT", _number(float)),
    "statement_timeout_ms": ("HEADONI_STATEMENT_TIMEOUT_MS", _number(int)),
    "lock_timeout_ms": ("HEADONI_LOCK_TIMEOUT_MS", _number(int)),
    "token_cache_seconds": ("HEADONI_TOKEN_CACHE_SECONDS", _number(float)),
    "create_statements": ("HEADONI_CREATE_STATEMENTS", _number(int, least=1)),
    "one_desk_statements": ("HEADONI_STATEMENT_SCOPE", _statement_scope),
    "body_timeout_seconds": ("HEADONI_BODY_TIMEOUT_SECONDS", _number(float)),
    "idempotency_ttl_seconds": ("HEADONI_IDEMPOTENCY_TTL_HOURS", _number(float, scale=3600)),
    "startup_timeout": ("HEADONI_STARTUP_TIMEOUT", _number(float)),
    "workers": ("HEADONI_WORKERS", _number(int, least=1)),
    "head_timeout_seconds": ("HEADONI_HEAD_TIMEOUT_SECONDS", _number(float, least=0.001)),
    "max_connections": ("HEADONI_MAX_CONNECTIONS", _number(int, least=1)),
    "request_bytes_budget": ("HEADONI_REQUEST_BYTES_BUDGET_MB", _number(lambda raw: int(float(raw) * 2**20), least=1)),
    "anonymous_concurrency": ("HEADONI_ANONYMOUS_CONCURRENCY", _number(int, least=1)),
    "anonymous_rate": ("HEADONI_ANONYMOUS_RATE", _number(float, least=0.001)),
    "address_rate": ("HEADONI_ADDRESS_RATE", _number(float, least=0)),
    "metrics_max_age_seconds": ("HEADONI_METRICS_MAX_AGE_SECONDS", _number(float, least=0)),
    "default_rate": ("HEADONI_DEFAULT_RATE", _rate),
    "default_burst": ("HEADONI_DEFAULT_BURST", _number(int, least=1)),
    "rate_limits": ("HEADONI_RATE_LIMITS", _switch),
    "create_queue": ("HEADONI_CREATE_QUEUE", _number(int, least=0)),
}


# prometheus-client's own variable: the directory where the workers of `serve --workers N` keep their
# metrics files. Read on its own, because prometheus-client reads it when it is first imported, before
# any Settings exist (app/metrics_dir.py sets it up, app/observability.py follows it).
METRICS_DIR_VARIABLE: Final = "PROMETHEUS_MULTIPROC_DIR"


def metrics_dir() -> str | None:
    return os.environ.get(METRICS_DIR_VARIABLE) or None


def load() -> Settings:
    """Read the settings from the environment; every one has a default that suits a local run."""
    given = {}
    for field, (name, parse) in VARIABLES.items():
        raw = os.environ.get(name)
        if raw:
            given[field] = parse(name, raw)
    return Settings(**given, statement_scope_set="one_desk_statements" in given)
