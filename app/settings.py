"""Configuration, read once from the environment into a frozen struct."""

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import msgspec

T = TypeVar("T")


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    database_url: str | None
    base_domain: str
    data_dir: Path
    pool_min_size: int
    pool_max_size: int
    pool_timeout: float  # seconds a request may wait for a pooled connection before 503
    statement_timeout_ms: int
    lock_timeout_ms: int
    token_cache_seconds: float
    create_statements: int = 2  # create statements in flight per process; creates arriving meanwhile share the next
    one_desk_statements: bool = False  # every create statement is of one desk, as Citus needs (HEADONI_STATEMENT_SCOPE)
    body_timeout_seconds: float = 30.0  # a request body must arrive whole within this, else 408
    idempotency_ttl_seconds: float = 24 * 3600.0  # an Idempotency-Key's outcome is replayed at least this long
    startup_timeout: float = 30.0  # seconds a starting server waits for its database before it gives up


def _parsed(name: str, default: T, parse: Callable[[str], T]) -> T:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return parse(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, not {raw!r}") from None


def _int(name: str, default: int) -> int:
    return _parsed(name, default, int)


def _float(name: str, default: float) -> float:
    return _parsed(name, default, float)


def _one_desk_statements() -> bool:
    raw = os.environ.get("HEADONI_STATEMENT_SCOPE") or "any-desks"
    if raw not in ("any-desks", "one-desk"):
        raise ValueError(f"HEADONI_STATEMENT_SCOPE must be any-desks or one-desk, not {raw!r}")
    return raw == "one-desk"


def load() -> Settings:
    """Read the settings from the environment; every one has a default that suits a local run."""
    cpus = os.cpu_count() or 2
    return Settings(
        database_url=os.environ.get("DATABASE_URL") or None,
        base_domain=os.environ.get("HEADONI_BASE_DOMAIN", "localhost").strip(".").lower(),
        data_dir=Path(os.environ.get("HEADONI_DATA_DIR", ".headoni")).expanduser().resolve(),
        pool_min_size=_int("HEADONI_POOL_MIN_SIZE", 2),
        pool_max_size=_int("HEADONI_POOL_MAX_SIZE", max(4, 2 * cpus)),
        pool_timeout=_float("HEADONI_POOL_TIMEOUT", 10.0),
        statement_timeout_ms=_int("HEADONI_STATEMENT_TIMEOUT_MS", 5000),
        lock_timeout_ms=_int("HEADONI_LOCK_TIMEOUT_MS", 3000),
        token_cache_seconds=_float("HEADONI_TOKEN_CACHE_SECONDS", 1.0),
        create_statements=_int("HEADONI_CREATE_STATEMENTS", 2),
        one_desk_statements=_one_desk_statements(),
        body_timeout_seconds=_float("HEADONI_BODY_TIMEOUT_SECONDS", 30.0),
        idempotency_ttl_seconds=_float("HEADONI_IDEMPOTENCY_TTL_HOURS", 24.0) * 3600,
        startup_timeout=_float("HEADONI_STARTUP_TIMEOUT", 30.0),
    )
