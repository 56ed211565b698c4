"""The `headoni` command line, run as a real subprocess against the suite's database."""

import hashlib
import os
import subprocess
import sys
import uuid
from collections.abc import Sequence

import asyncpg
import httpx
import msgspec

from app import db
from tests.support import ROOT
from tests.support.desks import ticket_body


def headoni(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run one `headoni` command to completion."""
    return headoni_all(database_url, [args])[0]


def headoni_all(database_url: str, commands: Sequence[Sequence[str]]) -> list[subprocess.CompletedProcess[str]]:
    """Run independent `headoni` commands side by side; their results in order."""
    env = {**os.environ, "DATABASE_URL": database_url}
    running = [
        (args, subprocess.Popen(
            [sys.executable, "-m", "app", *args], cwd=ROOT, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        ))
        for args in commands
    ]
    results = []
    for args, process in running:
        try:
            out, err = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
        results.append(subprocess.CompletedProcess(list(args), process.returncode, out, err))
    return results


def ok_json(result: subprocess.CompletedProcess[str]) -> dict[str, object]:
    """The one JSON line a successful `--json` command prints."""
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.count("\n") == 1
    value = msgspec.json.decode(result.stdout)
    assert isinstance(value, dict)
    return value


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """Wrong input: exit code 1, nothing on stdout, exactly one line on stderr."""
    assert result.returncode == 1, (result.args, result.stdout, result.stderr)
    assert result.stdout == ""
    assert result.stderr.endswith("\n") and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("headoni")
    for fragment in fragments:
        assert fragment in result.stderr


def subdomain() -> str:
    return f"cli{uuid.uuid4().hex[:12]}"


def new_desk(database_url: str) -> tuple[str, dict[str, object]]:
    sub = subdomain()
    return sub, ok_json(headoni(database_url, "desk", "create", sub, "--json"))




def test_migrate_applies_once_then_reports_up_to_date(empty_database: str) -> None:
    first = headoni(empty_database, "migrate")
    assert first.returncode == 0, first.stderr
    assert first.stdout == "".join(f"applied {path.name}\n" for path in db.migration_files())
    again = headoni(empty_database, "migrate")
    assert (again.returncode, again.stdout, again.stderr) == (0, "migrations are up to date\n", "")


async def test_desk_create_prints_json_and_makes_general_defaults(database_url: str, pool: asyncpg.Pool) -> None:
    sub = subdomain()
    created, plain = headoni_all(
        database_url,
        [("desk", "create", sub.upper(), "--name", " Acme Inc ", "--json"), ("desk", "create", sub + "-2")],
    )
    desk = ok_json(created)
    assert set(desk) == {"id", "subdomain", "name", "defaultDepartmentId", "defaultTicketTypeId"}
    assert desk["subdomain"] == sub and desk["name"] == "Acme Inc"
    for key in ("id", "defaultDepartmentId", "defaultTicketTypeId"):
        value = desk[key]
        assert isinstance(value, str) and value.isdigit()
    assert plain.returncode == 0 and plain.stdout.startswith(f"created desk {sub}-2 (id ")

    desk_id = int(str(desk["id"]))
    departments = await pool.fetch(
        "SELECT department_id, name, is_default FROM departments WHERE desk_id = $1", desk_id
    )
    assert [(str(r[0]), r[1], r[2]) for r in departments] == [(desk["defaultDepartmentId"], "General", True)]
    types = await pool.fetch("SELECT ticket_type_id, name, is_default FROM ticket_types WHERE desk_id = $1", desk_id)
    assert [(str(r[0]), r[1], r[2]) for r in types] == [(desk["defaultTicketTypeId"], "General", True)]
    assert await pool.fetchval("SELECT last_number FROM desk_counters WHERE desk_id = $1", desk_id) == 0


def test_desk_create_refuses_duplicates_and_bad_subdomains(database_url: str) -> None:
    sub, _ = new_desk(database_url)
    results = headoni_all(database_url, [
        ("desk", "create", sub),
        ("desk", "create", sub.upper()),
        ("desk", "create", "--", "-starts-with-dash"),
        ("desk", "create", "ends-with-dash-"),
        ("desk", "create", "has.dot"),
        ("desk", "create", "x" * 64),
        ("desk", "create", "unicodé"),
    ])
    assert_one_line_error(results[0], "already exists")
    assert_one_line_error(results[1], "already exists")
    for result in results[2:]:
        assert_one_line_error(result, "bad subdomain")


async def test_token_create_shows_secret_once_and_stores_only_its_digest(
    database_url: str, pool: asyncpg.Pool, client: httpx.AsyncClient
) -> None:
    sub, _ = new_desk(database_url)
    token = ok_json(headoni(
        database_url, "token", "create", "--desk", sub, "--name", "Importer",
        "--scope", "tickets:read", "--scope", "tickets:create", "--scope", "tickets:read", "--json",
    ))
    assert set(token) == {"id", "name", "scopes", "secret"}
    assert token["name"] == "Importer" and token["scopes"] == ["tickets:create", "tickets:read"]
    assert isinstance(token["id"], str) and token["id"].isdigit()
    secret = token["secret"]
    assert isinstance(secret, str) and secret.startswith("hd_") and len(secret) == 46

    stored = await pool.fetchval("SELECT secret_sha256 FROM api_tokens WHERE token_id = $1", int(token["id"]))
    assert bytes(stored) == hashlib.sha256(secret.encode()).digest()
    tables = await pool.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    for (table,) in tables:
        for text in (secret, secret.removeprefix("hd_")):
            query = f'SELECT EXISTS (SELECT 1 FROM "{table}" t WHERE strpos(t::text, $1) > 0)'
            found = await pool.fetchval(query, text)
            assert not found, f"{table} holds the token secret"

    # The printed secret authenticates: the digest stored is the digest of what was shown.
    response = await client.post(
        "/api/v1/tickets", json=ticket_body(),
        headers={"Host": f"{sub}.localhost", "Authorization": f"Bearer {secret}"},
    )
    assert response.status_code == 201


async def test_token_revoke_and_list_never_show_secrets(database_url: str, client: httpx.AsyncClient) -> None:
    sub, _ = new_desk(database_url)
    kept_run, revoked_run, plain = headoni_all(database_url, [
        ("token", "create", "--desk", sub, "--name", "Kept", "--scope", "tickets:create", "--json"),
        ("token", "create", "--desk", sub, "--name", "Revoked", "--scope", "tickets:create", "--json"),
        ("token", "create", "--desk", sub, "--name", "Plain", "--scope", "tickets:read"),
    ])
    kept, revoked = ok_json(kept_run), ok_json(revoked_run)
    assert plain.returncode == 0 and "hd_" in plain.stdout  # shown once, at creation

    revoke = headoni(database_url, "token", "revoke", "--desk", sub, str(revoked["id"]))
    assert (revoke.returncode, revoke.stdout) == (0, f"revoked token {revoked['id']}\n")
    listing, plain_listing, again = headoni_all(database_url, [
        ("token", "list", "--desk", sub, "--json"),
        ("token", "list", "--desk", sub),
        ("token", "revoke", "--desk", sub, str(revoked["id"])),  # a repeat: nothing changes, and it says so
    ])
    assert listing.returncode == 0 and plain_listing.returncode == 0
    assert (again.returncode, again.stdout) == (0, f"token {revoked['id']} was already revoked; nothing changed\n")
    for out in (listing.stdout, plain_listing.stdout):
        assert "hd_" not in out and "secret" not in out
    rows = [msgspec.json.decode(line) for line in listing.stdout.splitlines()]
    assert sorted((r["name"], r["revoked"]) for r in rows) == [("Kept", False), ("Plain", False), ("Revoked", True)]
    assert all(set(r) == {"id", "name", "scopes", "revoked", "createdAt"} for r in rows)
    lines = plain_listing.stdout.splitlines()
    assert len(lines) == 3 and [line.endswith("  revoked") for line in lines].count(True) == 1
    assert any(line.startswith(f"{revoked['id']}  Revoked  tickets:create  created ") for line in lines)

    headers = {"Host": f"{sub}.localhost"}
    denied = await client.post(
        "/api/v1/tickets", json=ticket_body(), headers={**headers, "Authorization": f"Bearer {revoked['secret']}"}
    )
    assert denied.status_code == 401
    accepted = await client.post(
        "/api/v1/tickets", json=ticket_body(), headers={**headers, "Authorization": f"Bearer {kept['secret']}"}
    )
    assert accepted.status_code == 201


def test_token_commands_refuse_bad_scopes_desks_and_ids(database_url: str) -> None:
    sub, desk = new_desk(database_url)
    results = headoni_all(database_url, [
        ("token", "create", "--desk", sub, "--name", "X", "--scope", "tickets:delete"),
        ("token", "create", "--desk", sub, "--name", "X", "--scope", "tickets:read", "--scope", "admin"),
        ("token", "create", "--desk", sub, "--name", "  ", "--scope", "tickets:read"),
        ("token", "revoke", "--desk", sub, "12x"),
        ("token", "revoke", "--desk", sub, "0"),
        ("token", "revoke", "--desk", sub, "99999999999999999999"),
        ("token", "revoke", "--desk", sub, str(desk["id"])),  # an id, but no token's
    ])
    assert_one_line_error(results[0], "bad scope", "tickets:delete")
    assert_one_line_error(results[1], "bad scope", "admin")
    assert_one_line_error(results[2], "token name")
    for result in results[3:6]:
        assert_one_line_error(result, "not an id")
    assert_one_line_error(results[6], "no token")


def test_every_desk_command_refuses_an_unknown_desk(database_url: str) -> None:
    nowhere = subdomain()
    results = headoni_all(database_url, [
        ("token", "create", "--desk", nowhere, "--name", "X", "--scope", "tickets:read"),
        ("token", "revoke", "--desk", nowhere, "1"),
        ("token", "list", "--desk", nowhere),
        ("department", "create", "--desk", nowhere, "Billing"),
        ("department", "list", "--desk", nowhere),
        ("department", "delete", "--desk", nowhere, "1"),
        ("ticket-type", "create", "--desk", nowhere, "Bug"),
        ("ticket-type", "list", "--desk", nowhere, "--json"),
        ("ticket-type", "archive", "--desk", nowhere, "1"),
        ("blocklist", "add", "--desk", nowhere, "spam.example"),
        ("blocklist", "remove", "--desk", nowhere, "spam.example"),
        ("blocklist", "list", "--desk", nowhere),
    ])
    for result in results:
        assert_one_line_error(result, f"no desk '{nowhere}' (see headoni desk list)")


def test_usage_errors_are_one_line_with_exit_code_1(database_url: str) -> None:
    results = headoni_all(database_url, [
        (),
        ("desk",),
        ("desk", "create"),
        ("token", "create", "--desk", "acme", "--name", "X"),
        ("nonsense",),
    ])
    for result in results:
        assert_one_line_error(result)


def test_malformed_settings_are_one_line_errors_naming_the_variable(database_url: str) -> None:
    malformed = [
        ("HEADONI_STATEMENT_SCOPE", "sideways"), ("HEADONI_POOL_MAX_SIZE", "eight"),
        ("HEADONI_MAX_CONNECTIONS", "0"), ("HEADONI_REQUEST_BYTES_BUDGET_MB", "-1"), ("HEADONI_ADDRESS_RATE", "-5"),
    ]
    for name, value in malformed:
        env = {**os.environ, "DATABASE_URL": database_url, name: value}
        result = subprocess.run(
            [sys.executable, "-m", "app", "serve"], cwd=ROOT, env=env, text=True, capture_output=True, timeout=60
        )
        assert_one_line_error(result, name, repr(value))


async def test_department_create_private_default_and_soft_delete(
    database_url: str, pool: asyncpg.Pool, client: httpx.AsyncClient
) -> None:
    sub, desk = new_desk(database_url)
    billing_run, support_run = headoni_all(database_url, [
        ("department", "create", "--desk", sub, " Billing ", "--private", "--json"),
        ("department", "create", "--desk", sub, "Support", "--default", "--json"),
    ])
    billing, support = ok_json(billing_run), ok_json(support_run)
    assert set(billing) == {"id", "name", "public", "default"}
    assert (billing["name"], billing["public"], billing["default"]) == ("Billing", False, False)
    assert (support["name"], support["public"], support["default"]) == ("Support", True, True)
    assert isinstance(billing["id"], str) and billing["id"].isdigit()

    desk_id, general = int(str(desk["id"])), str(desk["defaultDepartmentId"])
    defaults = await pool.fetch("SELECT department_id FROM departments WHERE desk_id = $1 AND is_default", desk_id)
    assert [str(r[0]) for r in defaults] == [support["id"]]  # --default moved it

    refused, deleted, bad = headoni_all(database_url, [
        ("department", "delete", "--desk", sub, str(support["id"])),
        ("department", "delete", "--desk", sub, str(billing["id"])),
        ("department", "delete", "--desk", sub, "1"),
    ])
    assert_one_line_error(refused, "default department cannot be deleted")
    assert (deleted.returncode, deleted.stdout) == (0, f"deleted department {billing['id']}\n")
    assert_one_line_error(bad, "no department 1")
    again, general_gone = headoni_all(database_url, [
        ("department", "delete", "--desk", sub, str(billing["id"])),
        ("department", "delete", "--desk", sub, general),  # no longer the default
    ])
    assert (again.returncode, again.stdout, again.stderr) == (
        0, f"department {billing['id']} was already deleted; nothing changed\n", ""
    )
    assert general_gone.returncode == 0, general_gone.stderr

    rows = await pool.fetch(
        "SELECT name, deleted_at IS NOT NULL FROM departments WHERE desk_id = $1 ORDER BY name", desk_id
    )
    assert [tuple(r) for r in rows] == [("Billing", True), ("General", True), ("Support", False)]  # soft

    token = ok_json(
        headoni(database_url, "token", "create", "--desk", sub, "--name", "T", "--scope", "tickets:read", "--json")
    )
    listed = await client.get(
        "/api/v1/departments", headers={"Host": f"{sub}.localhost", "Authorization": f"Bearer {token['secret']}"}
    )
    assert listed.json() == {"departments": [{"id": support["id"], "name": "Support", "public": True, "default": True}]}


async def test_ticket_type_create_default_and_archive(database_url: str, pool: asyncpg.Pool) -> None:
    sub, desk = new_desk(database_url)
    bug_run, incident_run, plain = headoni_all(database_url, [
        ("ticket-type", "create", "--desk", sub, "Bug", "--json"),
        ("ticket-type", "create", "--desk", sub, "Incident", "--default", "--json"),
        ("ticket-type", "create", "--desk", sub, "Question"),
    ])
    bug, incident = ok_json(bug_run), ok_json(incident_run)
    assert set(bug) == {"id", "name", "default"}
    assert (bug["name"], bug["default"], incident["name"], incident["default"]) == ("Bug", False, "Incident", True)
    assert plain.returncode == 0 and plain.stdout.startswith("created ticket type Question (id ")

    desk_id = int(str(desk["id"]))
    defaults = await pool.fetch("SELECT ticket_type_id FROM ticket_types WHERE desk_id = $1 AND is_default", desk_id)
    assert [str(r[0]) for r in defaults] == [incident["id"]]

    refused, archived, old_default = headoni_all(database_url, [
        ("ticket-type", "archive", "--desk", sub, str(incident["id"])),
        ("ticket-type", "archive", "--desk", sub, str(bug["id"])),
        ("ticket-type", "archive", "--desk", sub, str(desk["defaultTicketTypeId"])),
    ])
    assert_one_line_error(refused, "default ticket type cannot be archived")
    assert (archived.returncode, archived.stdout) == (0, f"archived ticket type {bug['id']}\n")
    assert old_default.returncode == 0, old_default.stderr
    twice = headoni(database_url, "ticket-type", "archive", "--desk", sub, str(bug["id"]))
    assert (twice.returncode, twice.stdout) == (0, f"ticket type {bug['id']} was already archived; nothing changed\n")
    live = await pool.fetch(
        "SELECT name FROM ticket_types WHERE desk_id = $1 AND archived_at IS NULL ORDER BY name", desk_id
    )
    assert [r[0] for r in live] == ["Incident", "Question"]


async def test_blocklist_add_remove_list_is_case_insensitive(database_url: str, client: httpx.AsyncClient) -> None:
    sub, _ = new_desk(database_url)
    added = headoni_all(database_url, [
        ("blocklist", "add", "--desk", sub, "Bob@Spam.Example"),
        ("blocklist", "add", "--desk", sub, "  JUNK.example "),
        ("token", "create", "--desk", sub, "--name", "T", "--scope", "tickets:create", "--json"),
        ("blocklist", "add", "--desk", sub, "not an entry"),
        ("blocklist", "add", "--desk", sub, "bad@@spam.example"),
    ])
    assert [r.stdout for r in added[:2]] == ["blocked bob@spam.example\n", "blocked junk.example\n"]
    assert_one_line_error(added[3], "bad blocklist entry")
    assert_one_line_error(added[4], "bad blocklist address")
    secret = ok_json(added[2])["secret"]

    listing, duplicate = headoni_all(database_url, [
        ("blocklist", "list", "--desk", sub),
        ("blocklist", "add", "--desk", sub, "bob@SPAM.example"),  # already there: no error, no second entry
    ])
    assert listing.stdout == "bob@spam.example\njunk.example\n"
    assert (duplicate.returncode, duplicate.stdout) == (0, "bob@spam.example was already blocked; nothing changed\n")

    headers = {"Host": f"{sub}.localhost", "Authorization": f"Bearer {secret}"}
    for email in ("BOB@spam.EXAMPLE", "anyone@Junk.Example"):
        blocked = await client.post("/api/v1/tickets", json=ticket_body(email=email), headers=headers)
        assert (blocked.status_code, blocked.json()) == (200, {"ok": True})

    removed, missing = headoni_all(database_url, [
        ("blocklist", "remove", "--desk", sub, "BOB@spam.example"),
        ("blocklist", "remove", "--desk", sub, "other.example"),
    ])
    assert (removed.returncode, removed.stdout) == (0, "unblocked bob@spam.example\n")
    assert (missing.returncode, missing.stdout) == (0, "other.example was not on the blocklist; nothing changed\n")
    assert headoni(database_url, "blocklist", "list", "--desk", sub).stdout == "junk.example\n"
    created = await client.post("/api/v1/tickets", json=ticket_body(email="bob@spam.example"), headers=headers)
    assert created.status_code == 201
