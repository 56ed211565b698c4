"""The app in-process, and the forms of the create it may write tickets with."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import msgspec
import pytest
from asgi_lifespan import LifespanManager

from app import settings
from app.main import create_app

# The forms of the create, as keyword arguments of writer.write and Writer: the two
# statements of HEADONI_STATEMENT_SCOPE, and headoni_create_for_desk(), the form the service uses on
# Citus (app/citus.py), which a plain PostgreSQL runs too.
CREATE_FORMS: dict[str, dict[str, Any]] = {
    "any-desks": {},
    "one-desk": {"one_desk": True},
    "citus-function": {"citus": True, "lock_timeout_ms": 10_000},
}


def create_form(name: str, on_citus: bool) -> dict[str, Any]:
    """The keyword arguments of one form; on Citus only the function runs, so the others are skipped."""
    if on_citus and name != "citus-function":
        pytest.skip(f"on Citus the service writes every create as headoni_create_for_desk(), not {name}")
    return CREATE_FORMS[name]


def configured_for(config: settings.Settings, form: str) -> settings.Settings:
    """The settings that make the app write every create in one form (on Citus the app writes every one
    as the function, whatever it is told: app/citus.py)."""
    assert form in CREATE_FORMS, form
    return msgspec.structs.replace(config, one_desk_statements=form == "one-desk", citus=form == "citus-function")


@asynccontextmanager
async def app_client(config: settings.Settings, database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """The app in-process, lifespan run, over httpx's ASGI transport."""
    app = create_app(config, database_url)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            yield c
