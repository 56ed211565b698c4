"""POST /api/v1/tickets body rules: every issue code, all issues at once, lengths in code points."""

from typing import Any

import asyncpg
import httpx
import pytest

from tests.support.api import issues, post, post_raw, raw_body, written
from tests.support.desks import Desk

EMOJI = "\U0001f600"  # 4 bytes in UTF-8, 2 UTF-16 units, 1 code point


def email_of_length(n: int) -> str:
    """An ASCII address of exactly n characters that email-validator accepts up to its 254 limit."""
    domain = "example.com"
    return "x" * (n - len(domain) - 1) + "@" + domain


async def test_missing_required_fields_are_all_reported_at_once(client: httpx.AsyncClient, desk: Desk) -> None:
    response = await post(client, desk, email=..., subject=..., body=...)
    assert issues(response) == [(["email"], "required"), (["subject"], "required"), (["body"], "required")]


async def test_null_required_fields_are_required(client: httpx.AsyncClient, desk: Desk) -> None:
    response = await post(client, desk, email=None, subject=None, body=None)
    assert issues(response) == [(["email"], "required"), (["subject"], "required"), (["body"], "required")]


async def test_every_problem_is_listed_in_field_order(client: httpx.AsyncClient, desk: Desk) -> None:
    response = await post(
        client, desk,
        email="a@b", name="n" * 121, subject="   ", body="b" * 50_001,
        priority="HIGH", departmentId="0", ticketTypeId="x",
    )
    assert issues(response) == [
        (["email"], "invalid_email"),
        (["name"], "too_long"),
        (["subject"], "too_short"),
        (["body"], "too_long"),
        (["priority"], "invalid_enum"),
        (["departmentId"], "invalid_id"),
        (["ticketTypeId"], "invalid_id"),
    ]


@pytest.mark.parametrize(
    ("field", "value"),
    [("email", 5), ("email", ["a@example.com"]), ("name", 1), ("name", {}), ("subject", True),
     ("subject", 1.5), ("body", ["text"]), ("body", {"text": "x"}), ("priority", 1), ("priority", ["high"])],
)
async def test_wrong_json_types_are_invalid_type(client: httpx.AsyncClient, desk: Desk, field: str, value: Any) -> None:
    assert issues(await post(client, desk, **{field: value})) == [([field], "invalid_type")]


@pytest.mark.parametrize("field", ["departmentId", "ticketTypeId"])
async def test_a_numeric_id_sent_as_a_json_number_is_refused(client: httpx.AsyncClient, desk: Desk, field: str) -> None:
    # The contract says ids are strings, "anything else is an invalid_id issue"; the app calls a JSON
    # number the wrong type. Either code names the field; the id is never taken as a number.
    [(path, code)] = issues(await post(client, desk, **{field: 5}))
    assert path == [field] and code in {"invalid_id", "invalid_type"}


@pytest.mark.parametrize("value", ["", "   ", "\n\t"])
async def test_blank_subject_is_too_short(client: httpx.AsyncClient, desk: Desk, value: str) -> None:
    assert issues(await post(client, desk, subject=value)) == [(["subject"], "too_short")]


@pytest.mark.parametrize("value", ["", " ", "\n\t \r\n"])
async def test_empty_or_blank_body_is_too_short(client: httpx.AsyncClient, desk: Desk, value: str) -> None:
    assert issues(await post(client, desk, body=value)) == [(["body"], "too_short")]


@pytest.mark.parametrize(
    ("field", "limit"), [("subject", 500), ("body", 50_000), ("name", 120)]
)
async def test_text_limits_count_code_points_at_the_boundary(
    client: httpx.AsyncClient, desk: Desk, pool: asyncpg.Pool, field: str, limit: int
) -> None:
    email = f"{field}@example.com"
    accepted = await post(client, desk, email=email, **{field: EMOJI * limit})
    assert accepted.status_code == 201, accepted.text
    column = {"subject": "t.subject", "body": "m.body", "name": "u.name"}[field]
    stored = await pool.fetchval(
        f"""SELECT {column} FROM tickets t
            JOIN messages m ON m.desk_id = t.desk_id AND m.ticket_id = t.ticket_id
            JOIN users u ON u.desk_id = t.desk_id AND u.user_id = t.requester_id
            WHERE t.desk_id = $1 AND t.number = 1""",
        desk.desk_id,
    )
    assert stored == EMOJI * limit
    refused = await post(client, desk, email=email, **{field: EMOJI * (limit + 1)})
    assert issues(refused) == [([field], "too_long")]
    ascii_refused = await post(client, desk, email=email, **{field: "x" * (limit + 1)})
    assert issues(ascii_refused) == [([field], "too_long")]


async def test_subject_and_name_are_trimmed_before_their_length_is_counted(
    client: httpx.AsyncClient, desk: Desk, pool: asyncpg.Pool
) -> None:
    response = await post(client, desk, subject="  " + "s" * 500 + "\n ", name=" \t" + "n" * 120 + "  ")
    assert response.status_code == 201, response.text
    assert response.json()["ticket"]["subject"] == "s" * 500
    name = await pool.fetchval("SELECT name FROM users WHERE desk_id = $1", desk.desk_id)
    assert name == "n" * 120


async def test_body_is_kept_verbatim(client: httpx.AsyncClient, desk: Desk, pool: asyncpg.Pool) -> None:
    text = "\n  first line\r\n\tsecond  \u00a0" + EMOJI + "  \n"
    assert (await post(client, desk, body=text)).status_code == 201
    assert await pool.fetchval("SELECT body FROM messages WHERE desk_id = $1", desk.desk_id) == text


async def test_email_of_254_characters_is_accepted_after_trimming(client: httpx.AsyncClient, desk: Desk) -> None:
    email = email_of_length(254)
    response = await post(client, desk, email=f"  {email.upper()} \t")
    assert response.status_code == 201, response.text
    assert response.json()["ticket"]["requester"] == {"email": email}


async def test_email_of_255_characters_is_refused_by_email_validator(client: httpx.AsyncClient, desk: Desk) -> None:
    # The contract's 255 cap sits above email-validator's own 254-octet limit (RFC 5321), which wins.
    assert issues(await post(client, desk, email=email_of_length(255))) == [(["email"], "invalid_email")]


@pytest.mark.parametrize("email", [email_of_length(256), EMOJI * 245 + "@example.com"])
async def test_email_over_255_code_points_is_too_long(client: httpx.AsyncClient, desk: Desk, email: str) -> None:
    assert issues(await post(client, desk, email=email)) == [(["email"], "too_long")]


async def test_email_under_255_code_points_is_never_too_long(client: httpx.AsyncClient, desk: Desk) -> None:
    # 243 code points but 980 UTF-8 bytes: judged by the validator, not by the contract's length cap.
    assert issues(await post(client, desk, email=EMOJI * 231 + "@example.com")) == [(["email"], "invalid_email")]


@pytest.mark.parametrize(
    "email", ["a@b", "plainaddress", "a@@example.com", "@example.com", "a@", "a b@example.com", "a@example..com",
              "a@-example.com", '"a b"@example.com', "a@[127.0.0.1]"],
)
async def test_invalid_addresses_are_invalid_email(client: httpx.AsyncClient, desk: Desk, email: str) -> None:
    assert issues(await post(client, desk, email=email)) == [(["email"], "invalid_email")]


@pytest.mark.parametrize(
    ("given", "stored"),
    [("  ÑoÑo@Example.COM ", "ñoño@example.com"), ("用户@例子.广告", "用户@例子.广告"),
     ("User@Bücher.DE", "user@bücher.de")],
)
async def test_email_is_trimmed_lowercased_and_may_be_internationalized(
    client: httpx.AsyncClient, desk: Desk, pool: asyncpg.Pool, given: str, stored: str
) -> None:
    response = await post(client, desk, email=given)
    assert response.status_code == 201, response.text
    assert response.json()["ticket"]["requester"] == {"email": stored}
    assert await pool.fetchval("SELECT email FROM users WHERE desk_id = $1", desk.desk_id) == stored


@pytest.mark.parametrize("priority", ["HIGH", "High", "medium", "", " low", "urgent!"])
async def test_priority_outside_the_four_values_is_invalid_enum(
    client: httpx.AsyncClient, desk: Desk, priority: str
) -> None:
    assert issues(await post(client, desk, priority=priority)) == [(["priority"], "invalid_enum")]


@pytest.mark.parametrize("priority", ["low", "normal", "high", "urgent"])
async def test_each_priority_is_accepted(client: httpx.AsyncClient, desk: Desk, priority: str) -> None:
    response = await post(client, desk, priority=priority)
    assert response.status_code == 201 and response.json()["ticket"]["priority"] == priority


@pytest.mark.parametrize("field", ["departmentId", "ticketTypeId"])
@pytest.mark.parametrize(
    "value", ["0", "-1", "1.5", " 1", "1 ", "\u0661", "\uff11", "+1", "1e3", "0x1", "", "9223372036854775808",
              "99999999999999999999999"],
)
async def test_ids_that_are_not_positive_int64_digit_strings_are_invalid_id(
    client: httpx.AsyncClient, desk: Desk, field: str, value: str
) -> None:
    assert issues(await post(client, desk, **{field: value})) == [([field], "invalid_id")]


@pytest.mark.parametrize(
    ("field", "error"), [("departmentId", "department_not_found"), ("ticketTypeId", "ticket_type_not_found")]
)
async def test_largest_int64_id_is_well_formed_but_not_found(
    client: httpx.AsyncClient, desk: Desk, field: str, error: str
) -> None:
    response = await post(client, desk, **{field: "9223372036854775807"})
    assert response.status_code == 400 and response.json()["error"] == error


@pytest.mark.parametrize("field", ["email", "name", "subject", "body"])
@pytest.mark.parametrize("escape", ["\\u0000", "\\ud800", "\\udfff", "\\ud83d"])
async def test_nul_and_lone_surrogates_are_invalid_character(
    client: httpx.AsyncClient, desk: Desk, field: str, escape: str
) -> None:
    value = "bob" + escape + "@example.com" if field == "email" else "abc" + escape + "def"
    response = await post_raw(client, desk, raw_body(**{field: f'RAW:"{value}"'}))
    assert issues(response) == [([field], "invalid_character")]


async def test_escaped_surrogate_pair_is_one_code_point(
    client: httpx.AsyncClient, desk: Desk, pool: asyncpg.Pool
) -> None:
    response = await post_raw(client, desk, raw_body(subject='RAW:"' + "\\ud83d\\ude00" * 500 + '"'))
    assert response.status_code == 201, response.text
    assert response.json()["ticket"]["subject"] == EMOJI * 500


async def test_lone_surrogate_is_reported_with_other_issues(client: httpx.AsyncClient, desk: Desk) -> None:
    response = await post_raw(client, desk, raw_body(email="nope", body='RAW:"x\\ud800"', priority="rush"))
    assert issues(response) == [(["email"], "invalid_email"), (["body"], "invalid_character"),
                                (["priority"], "invalid_enum")]


@pytest.mark.parametrize(
    "content", [b"", b"{", b'{"email": "a@example.com",}', b"{'email': 1}", b'{"a": NaN}', b'{"a": 1} x',
                b'{"subject": "\xff\xfe"}', b'{"a": Infinity}'],
)
async def test_malformed_json_is_reported(client: httpx.AsyncClient, desk: Desk, content: bytes) -> None:
    assert issues(await post_raw(client, desk, content)) == [([], "malformed_json")]


@pytest.mark.parametrize("content", [b"[]", b"null", b'"text"', b"1", b"true", b'[{"email": "a@example.com"}]'])
async def test_json_that_is_not_an_object_is_reported(client: httpx.AsyncClient, desk: Desk, content: bytes) -> None:
    assert issues(await post_raw(client, desk, content)) == [([], "not_an_object")]


async def test_null_means_absent_for_every_optional_field(
    client: httpx.AsyncClient, desk: Desk, pool: asyncpg.Pool
) -> None:
    response = await post(
        client, desk, email="carol@example.com", name=None, priority=None, departmentId=None, ticketTypeId=None
    )
    assert response.status_code == 201, response.text
    assert response.json()["ticket"]["priority"] == "normal"
    row = await pool.fetchrow(
        """SELECT t.priority, t.department_id, t.ticket_type_id, u.name FROM tickets t
           JOIN users u ON u.desk_id = t.desk_id AND u.user_id = t.requester_id WHERE t.desk_id = $1""",
        desk.desk_id,
    )
    assert (row["priority"], row["name"]) == ("normal", "carol")
    assert (str(row["department_id"]), str(row["ticket_type_id"])) == (
        desk.default_department_id, desk.default_ticket_type_id
    )


@pytest.mark.parametrize("name", ["", "   ", None])
async def test_empty_name_means_the_local_part(
    client: httpx.AsyncClient, desk: Desk, pool: asyncpg.Pool, name: str | None
) -> None:
    assert (await post(client, desk, email="Dave.Smith@Example.com", name=name)).status_code == 201
    assert await pool.fetchval("SELECT name FROM users WHERE desk_id = $1", desk.desk_id) == "dave.smith"


async def test_unknown_fields_are_ignored(client: httpx.AsyncClient, desk: Desk, pool: asyncpg.Pool) -> None:
    response = await post(
        client, desk, number=99, status="closed", channel="email", id="1", requester={"email": "x@y.z"},
        extra=[{"deep": [1, 2, {"x": None}]}], Email="other@example.com",
    )
    assert response.status_code == 201, response.text
    ticket = response.json()["ticket"]
    assert ticket["number"] == 1 and ticket["requester"] == {"email": "alice@example.com"}
    row = await pool.fetchrow("SELECT status, channel FROM tickets WHERE desk_id = $1", desk.desk_id)
    assert (row["status"], row["channel"]) == ("open", "api")


async def test_unknown_fields_are_ignored_even_when_postgresql_could_not_store_them(
    client: httpx.AsyncClient, desk: Desk
) -> None:
    content = raw_body(note='RAW:"\\ud800 \\u0000"', big="RAW:1e999", long="RAW:123456789012345678901234567890")
    response = await post_raw(client, desk, content)
    assert response.status_code == 201, response.text


async def test_name_is_used_only_when_the_requester_is_created(
    client: httpx.AsyncClient, desk: Desk, pool: asyncpg.Pool
) -> None:
    assert (await post(client, desk, email="erin@example.com", name=" Erin ")).status_code == 201
    again = await post(client, desk, email="ERIN@example.com", name="Someone Else")
    assert again.status_code == 201 and again.json()["ticket"]["number"] == 2
    rows = await pool.fetch("SELECT email, name FROM users WHERE desk_id = $1", desk.desk_id)
    assert [(r["email"], r["name"]) for r in rows] == [("erin@example.com", "Erin")]
    requesters = await pool.fetchval(
        "SELECT count(DISTINCT requester_id) FROM tickets WHERE desk_id = $1", desk.desk_id
    )
    assert requesters == 1


async def test_an_invalid_body_writes_nothing_and_uses_no_number(
    client: httpx.AsyncClient, desk: Desk, pool: asyncpg.Pool
) -> None:
    issues(await post(client, desk, email="frank@example.com", subject=""))
    issues(await post_raw(client, desk, raw_body(email="frank@example.com", body='RAW:"\\u0000"')))
    assert await written(pool, desk) == {"users": 0, "tickets": 0, "messages": 0, "events": 0, "last_number": 0}
    response = await post(client, desk, email="frank@example.com")
    assert response.json()["ticket"]["number"] == 1
