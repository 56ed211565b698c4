"""Choosing a department and a ticket type on POST, and listing them with GET."""

import asyncio

import asyncpg
import httpx
import pytest

from app import admin
from app.ids import Snowflake
from tests.support.api import assert_error, new_token, post, written
from tests.support.desks import Desk, make_desk

pytestmark = pytest.mark.each_create_form  # every test with `client`, against every form of the create


async def ticket_row(pool: asyncpg.Pool, desk: Desk, number: int) -> asyncpg.Record:
    return await pool.fetchrow(
        "SELECT department_id, ticket_type_id FROM tickets WHERE desk_id = $1 AND number = $2", desk.desk_id, number
    )


async def test_absent_ids_mean_the_desks_defaults(client: httpx.AsyncClient, desk: Desk, pool: asyncpg.Pool) -> None:
    assert (await post(client, desk)).status_code == 201
    row = await ticket_row(pool, desk, 1)
    assert (str(row["department_id"]), str(row["ticket_type_id"])) == (
        desk.default_department_id, desk.default_ticket_type_id
    )


async def test_a_new_default_is_used_when_no_id_is_given(
    client: httpx.AsyncClient, desk: Desk, pool: asyncpg.Pool, ids: Snowflake
) -> None:
    async with pool.acquire() as conn:
        department = await admin.create_department(conn, ids, desk.subdomain, "Sales", private=False, default=True)
        ticket_type = await admin.create_ticket_type(conn, ids, desk.subdomain, "Bug", default=True)
    assert (await post(client, desk)).status_code == 201
    row = await ticket_row(pool, desk, 1)
    assert (str(row["department_id"]), str(row["ticket_type_id"])) == (department.id, ticket_type.id)


async def test_a_private_department_and_a_live_type_are_accepted(
    client: httpx.AsyncClient, desk: Desk, pool: asyncpg.Pool, ids: Snowflake
) -> None:
    async with pool.acquire() as conn:
        department = await admin.create_department(conn, ids, desk.subdomain, "Internal", private=True, default=False)
        ticket_type = await admin.create_ticket_type(conn, ids, desk.subdomain, "Question", default=False)
    response = await post(client, desk, departmentId=department.id, ticketTypeId=ticket_type.id)
    assert response.status_code == 201, response.text
    row = await ticket_row(pool, desk, 1)
    assert (str(row["department_id"]), str(row["ticket_type_id"])) == (department.id, ticket_type.id)
    shown = (await client.get(response.headers["location"], headers=desk.headers())).json()["ticket"]
    assert shown["department"] == {"id": department.id, "name": "Internal"}
    assert shown["ticketType"] == {"id": ticket_type.id, "name": "Question"}


async def test_a_soft_deleted_department_is_not_found(
    client: httpx.AsyncClient, desk: Desk, pool: asyncpg.Pool, ids: Snowflake
) -> None:
    async with pool.acquire() as conn:
        department = await admin.create_department(conn, ids, desk.subdomain, "Old", private=False, default=False)
    assert (await post(client, desk, departmentId=department.id)).status_code == 201
    async with pool.acquire() as conn:
        await admin.delete_department(conn, desk.subdomain, int(department.id))
    assert_error(await post(client, desk, departmentId=department.id), 400, "department_not_found")
    assert (await written(pool, desk))["last_number"] == 1


async def test_an_archived_ticket_type_is_not_found(
    client: httpx.AsyncClient, desk: Desk, pool: asyncpg.Pool, ids: Snowflake
) -> None:
    async with pool.acquire() as conn:
        ticket_type = await admin.create_ticket_type(conn, ids, desk.subdomain, "Legacy", default=False)
    assert (await post(client, desk, ticketTypeId=ticket_type.id)).status_code == 201
    async with pool.acquire() as conn:
        await admin.archive_ticket_type(conn, desk.subdomain, int(ticket_type.id))
    assert_error(await post(client, desk, ticketTypeId=ticket_type.id), 400, "ticket_type_not_found")
    assert (await written(pool, desk))["last_number"] == 1


async def test_another_desks_department_and_type_are_not_found(
    client: httpx.AsyncClient, desk: Desk, pool: asyncpg.Pool, ids: Snowflake
) -> None:
    other = await make_desk(pool, ids)
    async with pool.acquire() as conn:
        department = await admin.create_department(conn, ids, other.subdomain, "Theirs", private=False, default=False)
        ticket_type = await admin.create_ticket_type(conn, ids, other.subdomain, "Theirs", default=False)
    for department_id in (department.id, other.default_department_id):
        assert_error(await post(client, desk, departmentId=department_id), 400, "department_not_found")
    for ticket_type_id in (ticket_type.id, other.default_ticket_type_id):
        assert_error(await post(client, desk, ticketTypeId=ticket_type_id), 400, "ticket_type_not_found")
    # A department id used as a ticket type id (and the reverse) names nothing either.
    assert_error(await post(client, desk, ticketTypeId=desk.default_department_id), 400, "ticket_type_not_found")
    assert_error(await post(client, desk, departmentId=desk.default_ticket_type_id), 400, "department_not_found")


async def test_an_unknown_department_or_type_writes_nothing_and_uses_no_number(
    client: httpx.AsyncClient, desk: Desk, pool: asyncpg.Pool
) -> None:
    assert_error(await post(client, desk, email="new@example.com", departmentId="42"), 400, "department_not_found")
    assert_error(await post(client, desk, email="new@example.com", ticketTypeId="42"), 400, "ticket_type_not_found")
    assert await written(pool, desk) == {"users": 0, "tickets": 0, "messages": 0, "events": 0, "last_number": 0}
    assert (await post(client, desk, email="new@example.com")).json()["ticket"]["number"] == 1


async def test_departments_lists_live_ones_with_their_fields(
    client: httpx.AsyncClient, desk: Desk, pool: asyncpg.Pool, ids: Snowflake
) -> None:
    async with pool.acquire() as conn:
        sales = await admin.create_department(conn, ids, desk.subdomain, "Sales", private=False, default=False)
        internal = await admin.create_department(conn, ids, desk.subdomain, "Internal", private=True, default=False)
        gone = await admin.create_department(conn, ids, desk.subdomain, "Gone", private=False, default=False)
        await admin.delete_department(conn, desk.subdomain, int(gone.id))
    response = await client.get("/api/v1/departments", headers=desk.headers())
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"departments"}
    assert sorted(body["departments"], key=lambda d: d["name"]) == [
        {"id": desk.default_department_id, "name": "General", "public": True, "default": True},
        {"id": internal.id, "name": "Internal", "public": False, "default": False},
        {"id": sales.id, "name": "Sales", "public": True, "default": False},
    ]


async def test_ticket_types_lists_live_ones_with_their_fields(
    client: httpx.AsyncClient, desk: Desk, pool: asyncpg.Pool, ids: Snowflake
) -> None:
    async with pool.acquire() as conn:
        bug = await admin.create_ticket_type(conn, ids, desk.subdomain, "Bug", default=True)
        old = await admin.create_ticket_type(conn, ids, desk.subdomain, "Old", default=False)
        await admin.archive_ticket_type(conn, desk.subdomain, int(old.id))
    response = await client.get("/api/v1/ticket-types", headers=desk.headers())
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"ticketTypes"}
    assert sorted(body["ticketTypes"], key=lambda t: t["name"]) == [
        {"id": bug.id, "name": "Bug", "default": True},
        {"id": desk.default_ticket_type_id, "name": "General", "default": False},
    ]


async def test_listings_show_only_this_desks_rows(
    client: httpx.AsyncClient, desk: Desk, pool: asyncpg.Pool, ids: Snowflake
) -> None:
    other = await make_desk(pool, ids)
    async with pool.acquire() as conn:
        await admin.create_department(conn, ids, other.subdomain, "Theirs", private=False, default=False)
        await admin.create_ticket_type(conn, ids, other.subdomain, "Theirs", default=False)
    departments = (await client.get("/api/v1/departments", headers=desk.headers())).json()["departments"]
    ticket_types = (await client.get("/api/v1/ticket-types", headers=desk.headers())).json()["ticketTypes"]
    assert [d["id"] for d in departments] == [desk.default_department_id]
    assert [t["id"] for t in ticket_types] == [desk.default_ticket_type_id]


async def test_listings_need_any_valid_token_of_the_desk(
    client: httpx.AsyncClient, desk: Desk, pool: asyncpg.Pool, ids: Snowflake
) -> None:
    for scope in ("tickets:create", "tickets:read"):
        secret = await new_token(pool, ids, desk, scope)
        for path in ("/api/v1/departments", "/api/v1/ticket-types"):
            assert (await client.get(path, headers=desk.headers(secret))).status_code == 200


async def test_listed_ids_are_accepted_by_post(client: httpx.AsyncClient, desk: Desk, pool: asyncpg.Pool,
                                               ids: Snowflake) -> None:
    async with pool.acquire() as conn:
        await admin.create_department(conn, ids, desk.subdomain, "Private", private=True, default=False)
        await admin.create_ticket_type(conn, ids, desk.subdomain, "Other", default=False)
    departments = (await client.get("/api/v1/departments", headers=desk.headers())).json()["departments"]
    ticket_types = (await client.get("/api/v1/ticket-types", headers=desk.headers())).json()["ticketTypes"]
    for department in departments:
        for ticket_type in ticket_types:
            response = await post(client, desk, departmentId=department["id"], ticketTypeId=ticket_type["id"])
            assert response.status_code == 201, response.text
    assert (await written(pool, desk))["tickets"] == 4


async def test_concurrent_default_changes_leave_exactly_one_default(
    database_url: str, desk: Desk, ids: Snowflake, pool: asyncpg.Pool
) -> None:
    conns = [await asyncpg.connect(database_url) for _ in range(6)]
    try:
        made = await asyncio.gather(
            *(admin.create_department(c, ids, desk.subdomain, f"D{i}", private=False, default=True)
              for i, c in enumerate(conns[:3])),
            *(admin.create_ticket_type(c, ids, desk.subdomain, f"T{i}", default=True) for i, c in enumerate(conns[3:])),
        )
    finally:
        for c in conns:
            await c.close()
    assert len(made) == 6
    assert await pool.fetchval("SELECT count(*) FROM departments WHERE desk_id = $1 AND is_default", desk.desk_id) == 1
    assert await pool.fetchval("SELECT count(*) FROM ticket_types WHERE desk_id = $1 AND is_default", desk.desk_id) == 1
