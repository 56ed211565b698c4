"""Hostile bodies: any JSON value in any field, and the shapes that break parsers and databases.
The answer is always 201, 200 (blocked) or a 400 naming the problem; never a 500."""

import json
from typing import Any

import asyncpg
import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.support.api import TICKETS, issues
from tests.support.desks import Desk

FIELDS = ["email", "name", "subject", "body", "priority", "departmentId", "ticketTypeId"]
HOSTILE = ["\x00", "\ud800", "\udfff", "\U0001f600", "\U0001d11e", "'", '"', "\\", ";", "--", "$1", "\u2028",
           "\ufeff", "\u200b", "\r\n", "%s", "{{", "\u0301"]

# Characters of every kind, including NUL, lone surrogates and 4-byte ones, and ones that mean
# something to SQL, JSON, or a format string.
hostile_text = st.lists(st.sampled_from(HOSTILE) | st.characters(codec=None), max_size=20).map("".join)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | hostile_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(hostile_text, inner, max_size=3),
    max_leaves=6,
)
plausible = {
    "email": st.sampled_from(["alice@example.com", " Bob@Example.org ", "a@b", "x@пример.рф"]),
    "name": st.sampled_from(["Alice", "", "   "]),
    "subject": st.sampled_from(["Help", "  Padded  "]),
    "body": st.sampled_from(["It broke.", "  verbatim\n"]),
    "priority": st.sampled_from(["low", "normal", "high", "urgent", "HIGH"]),
    "departmentId": st.sampled_from(["1", "0", "9223372036854775807", "9223372036854775808", "007"]),
    "ticketTypeId": st.sampled_from(["1", "-1", "1e3"]),
}
# A body: each field absent, plausible, hostile text, or any JSON value; plus unknown fields. Half
# the bodies keep the required fields to text, so that many get as far as the database.
anything = st.fixed_dictionaries(
    {}, optional={field: plausible[field] | hostile_text | json_values for field in FIELDS}
)
# Text PostgreSQL can store (no NUL, no lone surrogate), still full of 4-byte and special characters.
storable_text = st.lists(
    st.sampled_from([c for c in HOSTILE if c not in ("\x00", "\ud800", "\udfff")]) | st.characters(codec="utf-8"),
    max_size=20,
).map("".join).filter(lambda t: "\x00" not in t and t.strip())
mostly_valid = st.fixed_dictionaries(
    {"email": plausible["email"], "subject": plausible["subject"] | storable_text, "body": storable_text},
    optional={field: plausible[field] | hostile_text | json_values for field in [*FIELDS[4:], "name"]},
)
ticket_objects = (mostly_valid | anything).flatmap(
    lambda obj: st.dictionaries(hostile_text, json_values, max_size=2).map(lambda extra: {**extra, **obj})
)

def encode(obj: Any, ascii_only: bool) -> bytes:
    """JSON as a client might send it: \\u escapes, or raw UTF-8 (lone surrogates then make bytes
    that are not UTF-8 at all)."""
    return json.dumps(obj, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


def json_headers(desk: Desk) -> dict[str, str]:
    return desk.headers(**{"Content-Type": "application/json"})


def assert_answered_properly(response: httpx.Response) -> None:
    assert response.status_code in (200, 201, 400), (response.status_code, response.text)
    body = response.json()
    event(f"{response.status_code} {body.get('error', '')}")  # see --hypothesis-show-statistics
    if response.status_code == 400:
        assert body["error"] in {"invalid_body", "department_not_found", "ticket_type_not_found"}, body
        if body["error"] == "invalid_body":
            assert body["issues"] and all(set(i) == {"path", "code", "message"} for i in body["issues"])


@pytest.fixture(scope="module")
async def fuzz_desk(pool: asyncpg.Pool, ids: Any) -> Desk:
    from tests.support.desks import make_desk

    return await make_desk(pool, ids)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(obj=ticket_objects, ascii_only=st.booleans())
async def test_any_json_in_any_field_is_201_200_or_400_never_500(
    client: httpx.AsyncClient, fuzz_desk: Desk, pool: asyncpg.Pool, obj: dict[str, Any], ascii_only: bool
) -> None:
    response = await client.post(
        TICKETS, content=encode(obj, ascii_only), headers=json_headers(fuzz_desk)
    )
    assert_answered_properly(response)
    if response.status_code == 201:  # stored, and the body verbatim
        ticket_id = int(response.json()["ticket"]["id"])
        stored = await pool.fetchval(
            "SELECT body FROM messages WHERE desk_id = $1 AND ticket_id = $2", fuzz_desk.desk_id, ticket_id
        )
        assert stored == obj["body"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(items=st.lists(ticket_objects | json_values, min_size=1, max_size=5), ascii_only=st.booleans())
async def test_any_batch_item_gets_its_own_201_200_or_400_never_a_500(
    client: httpx.AsyncClient, fuzz_desk: Desk, items: list[Any], ascii_only: bool
) -> None:
    response = await client.post(
        f"{TICKETS}/batch", content=encode({"tickets": items}, ascii_only),
        headers=json_headers(fuzz_desk),
    )
    assert response.status_code in (200, 400), (response.status_code, response.text)
    if response.status_code == 200:
        results = response.json()["results"]
        assert len(results) == len(items) and {r["status"] for r in results} <= {200, 201, 400}


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=200))
async def test_any_bytes_at_all_are_answered_400_not_500(
    client: httpx.AsyncClient, fuzz_desk: Desk, content: bytes
) -> None:
    response = await client.post(
        TICKETS, content=content, headers=json_headers(fuzz_desk)
    )
    assert response.status_code == 400 and response.json()["error"] == "invalid_body"


def _body(**fields: str) -> str:
    base = {"email": '"alice@example.com"', "subject": '"Deep"', "body": '"text"'}
    base.update(fields)
    return "{" + ", ".join(f'"{k}": {v}' for k, v in base.items()) + "}"


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(_body(body="[" * 100_000 + "]" * 100_000), id="nested-arrays-in-a-field"),
        pytest.param(_body(name='{"a":' * 50_000 + "1" + "}" * 50_000), id="nested-objects-in-a-field"),
        pytest.param("[" * 200_000 + "]" * 200_000, id="nested-arrays-at-the-top"),
        pytest.param("[" * 300_000, id="unclosed-nesting"),
        pytest.param(_body(subject="1e999999"), id="number-overflowing-a-double"),
        pytest.param(_body(subject="-" + "9" * 5000), id="integer-of-5000-digits"),
        pytest.param(_body(departmentId="1" + "0" * 400), id="id-far-beyond-int64"),
        pytest.param(_body(departmentId='"' + "9" * 400 + '"'), id="digit-string-far-beyond-int64"),
        pytest.param(_body(subject="NaN", body="Infinity"), id="non-json-constants"),
    ],
)
async def test_parser_breakers_are_400(client: httpx.AsyncClient, fuzz_desk: Desk, content: str) -> None:
    response = await client.post(
        TICKETS, content=content.encode(), headers=json_headers(fuzz_desk)
    )
    assert response.status_code == 400 and response.json()["error"] == "invalid_body", response.text


async def test_a_duplicate_key_counts_once_the_last_one_wins(client: httpx.AsyncClient, fuzz_desk: Desk) -> None:
    headers = json_headers(fuzz_desk)
    last_bad = await client.post(TICKETS, content=_body(subject='"ok", "subject": 5').encode(), headers=headers)
    assert issues(last_bad) == [(["subject"], "invalid_type")]
    last_good = await client.post(TICKETS, content=_body(subject='5, "subject": "ok"').encode(), headers=headers)
    assert last_good.status_code == 201 and last_good.json()["ticket"]["subject"] == "ok"


@pytest.mark.parametrize(
    "content",
    [
        b'{"email": "alice@example.com", "subject": "\xff\xfe", "body": "x"}',  # not UTF-8 at all
        b'{"email": "alice@example.com", "subject": "\xed\xa0\x80", "body": "x"}',  # an encoded surrogate
        b'{"email": "alice@example.com", "subject": "\xc0\xaf", "body": "x"}',  # overlong encoding of "/"
        b'\xef\xbb\xbf{"email": "alice@example.com", "subject": "BOM", "body": "x"}',  # a byte order mark
    ],
)
async def test_bytes_that_are_not_utf8_are_400(client: httpx.AsyncClient, fuzz_desk: Desk, content: bytes) -> None:
    headers = json_headers(fuzz_desk)
    response = await client.post(TICKETS, content=content, headers=headers)
    assert response.status_code == 400 and response.json()["error"] == "invalid_body", response.text


async def test_a_lone_surrogate_next_to_a_wrong_type_is_invalid_character(
    client: httpx.AsyncClient, fuzz_desk: Desk
) -> None:
    """Found by the fuzz test: a wrong type elsewhere sends the body down the slow path, where msgspec
    cannot convert a string with a lone surrogate (it raised UnicodeEncodeError, a 500)."""
    content = b'{"email": 5, "subject": "\\ud800", "body": "x", "priority": "\\udfff"}'
    response = await client.post(TICKETS, content=content, headers=json_headers(fuzz_desk))
    assert issues(response) == [
        (["email"], "invalid_type"), (["subject"], "invalid_character"), (["priority"], "invalid_character")
    ]


SQL_LOOKING = [
    "'); DROP TABLE tickets; --",
    "Robert'); DROP TABLE users;--",
    "' OR '1'='1",
    "$1, $2); DELETE FROM desks; --",
    "\\x00'::bytea; SELECT pg_sleep(10); --",
    "E'\\\\' || chr(0) || '",
    "%s %(email)s {0} ${body}",
    "; COMMIT; TRUNCATE messages CASCADE; --",
]


async def test_sql_looking_strings_are_stored_verbatim_and_never_executed(
    client: httpx.AsyncClient, fuzz_desk: Desk, pool: asyncpg.Pool
) -> None:
    before = await pool.fetchval("SELECT count(*) FROM desks")
    for text in SQL_LOOKING:
        email = "o'brien+" + str(SQL_LOOKING.index(text)) + "@example.com"
        response = await client.post(
            TICKETS, json={"email": email, "name": text, "subject": text, "body": text}, headers=fuzz_desk.headers()
        )
        assert response.status_code == 201, response.text
        ticket = (await client.get(f"{TICKETS}/{response.json()['ticket']['id']}", headers=fuzz_desk.headers())).json()
        assert ticket["ticket"]["subject"] == text.strip()
        assert ticket["ticket"]["messages"][0]["body"] == text
        assert ticket["ticket"]["requester"] == {**ticket["ticket"]["requester"], "email": email, "name": text.strip()}
    assert await pool.fetchval("SELECT count(*) FROM desks") >= before  # nothing dropped, nothing deleted
    assert await pool.fetchval("SELECT count(*) FROM messages WHERE desk_id = $1", fuzz_desk.desk_id) > 0


async def test_an_id_past_the_4300_digit_limit_of_int_is_never_a_500(
    client: httpx.AsyncClient, fuzz_desk: Desk
) -> None:
    """int() refuses strings of more than 4300 digits; leading zeros are accepted, so such an id with
    only zeros in front is the id itself, and one that is really that long is invalid_id, also in a
    batch."""
    padded = "0" * 4300 + fuzz_desk.default_department_id
    huge = "1" + "0" * 4300
    ticket = {"email": "long@example.com", "subject": "Long id", "body": "x"}
    created = await client.post(TICKETS, json={**ticket, "departmentId": padded}, headers=json_headers(fuzz_desk))
    assert created.status_code == 201, created.text
    refused = await client.post(TICKETS, json={**ticket, "departmentId": huge}, headers=json_headers(fuzz_desk))
    assert issues(refused) == [(["departmentId"], "invalid_id")]
    batch = {"tickets": [ticket, {**ticket, "ticketTypeId": huge}, {**ticket, "departmentId": padded}]}
    answered = await client.post(f"{TICKETS}/batch", json=batch, headers=json_headers(fuzz_desk))
    assert answered.status_code == 200, answered.text
    results = answered.json()["results"]
    assert [r["status"] for r in results] == [201, 400, 201]
    assert results[1]["issues"][0]["code"] == "invalid_id"


@pytest.mark.parametrize("route", ["", "/batch"])
async def test_a_big_body_the_fast_decoder_refuses_is_not_parsed_again_in_full(
    client: httpx.AsyncClient, fuzz_desk: Desk, monkeypatch: pytest.MonkeyPatch, route: str
) -> None:
    """The issue's body: a wrong type up front, then 300,000 empty lists. The json module (which builds
    every value) is not run on it: the fields are read from msgspec's scan, or the body is refused."""
    parsed: list[int] = []
    loads = json.loads

    def counting_loads(text: str, **kwargs: Any) -> Any:
        if len(text) > 100_000:
            parsed.append(len(text))
        return loads(text, **kwargs)

    monkeypatch.setattr(json, "loads", counting_loads)
    field = b'"tickets": 5' if route else b'"email": 5'
    body = b"{" + field + b', "x": [' + b"[]," * 300_000 + b"[]]}"
    response = await client.post(TICKETS + route, content=body, headers=json_headers(fuzz_desk))
    assert response.status_code == 400 and response.json()["error"] == "invalid_body"
    if not route:
        assert issues(response) == [(["email"], "invalid_type"), (["subject"], "required"), (["body"], "required")]
    assert parsed == []


async def test_a_lone_surrogate_next_to_many_values_is_still_invalid_character(
    client: httpx.AsyncClient, fuzz_desk: Desk
) -> None:
    body = b'{"email": "\\ud800", "subject": "s", "body": "b", "x": [' + b"[]," * 5_000 + b"[]]}"
    response = await client.post(TICKETS, content=body, headers=json_headers(fuzz_desk))
    assert issues(response) == [(["email"], "invalid_character")]
