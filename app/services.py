"""What the lifespan makes and every route reaches: one typed object, through services(request)."""

from dataclasses import dataclass
from typing import Any

from starlette.requests import HTTPConnection

from app.auth import TokenCache
from app.db import Database
from app.ids import Snowflake
from app.limiter import Limiter
from app.settings import Settings
from app.writer import Writer

STATE_KEY = "services"  # its key in the lifespan state (and so in every request's scope["state"])


@dataclass(frozen=True, slots=True)
class Services:
    settings: Settings
    database: Database  # the pool, its arrival-order queue and its wait
    ids: Snowflake  # this process's id generator, backed by its worker lease
    tokens: TokenCache
    writer: Writer  # every create goes through it
    limiter: Limiter  # the tokens' rate limits


def services(request: HTTPConnection) -> Services:
    """The request's services (the app's, made by its lifespan)."""
    found: Services = request.state.services
    return found


def of_state(state: dict[str, Any] | None) -> Services | None:
    """The services in a lifespan state or a scope's "state", when the lifespan has run."""
    found = (state or {}).get(STATE_KEY)
    return found if isinstance(found, Services) else None
