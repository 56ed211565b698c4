"""The create statement as sql/queries.sql holds it: two complete texts that differ only where they name a
desk, each runnable as pasted (PREPARE, then EXECUTE), answering in the words of app/statement.py."""

import difflib
import re

import asyncpg
import pytest

from app import statement
from app.statement import Outcome
from tests.support.desks import Desk


def _without_counter(text: str) -> tuple[list[str], list[str]]:
    """The statement's lines outside its counter step (from `taken`/`counter` to `ticket`), and those inside."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"\), (taken|counter) AS \($", line))
    end = next(i for i, line in enumerate(lines) if line == "), ticket AS (")
    return lines[:start] + lines[end:], lines[start:end]


def test_the_two_forms_differ_only_where_they_name_a_desk_and_in_their_counter() -> None:
    any_lines, any_counter = _without_counter(statement.CREATE_FOR_ANY_DESKS)
    one_lines, one_counter = _without_counter(statement.CREATE_FOR_ONE_DESK)
    assert len(any_lines) == len(one_lines)
    changed = 0
    for many, one in zip(any_lines, one_lines, strict=True):
        if many == one:
            continue
        changed += 1
        # Where the form of several desks names a desk (x.desk_id), the form of one may name $1 instead.
        parts = re.split(r"\b([a-z]\.desk_id)\b", many)
        pattern = "".join(re.escape(p) if i % 2 == 0 else f"(?:{re.escape(p)}|\\$1)" for i, p in enumerate(parts))
        assert len(parts) > 1 and re.fullmatch(pattern, one), (many, one)
    assert changed == 10  # departments (2), ticket types (2), blocklist, requesters (2), tickets, messages, events
    assert "headoni_bump_counters(" in "\n".join(any_counter)
    assert "UPDATE desk_counters" in "\n".join(one_counter) and "WHERE desk_id = $1" in "\n".join(one_counter)
    assert difflib.SequenceMatcher(None, any_counter, one_counter).ratio() < 0.5  # the counter step is its own


def test_the_outcomes_are_the_statements_own_words() -> None:
    for text in (statement.CREATE_FOR_ANY_DESKS, statement.CREATE_FOR_ONE_DESK):
        case = text[text.index("array_agg(CASE") : text.index("END ORDER BY ord")]
        assert set(re.findall(r"'(\w+)'", case)) == {o.value for o in Outcome}


@pytest.mark.parametrize("name", ["create_for_any_desks", "create_for_one_desk"])
async def test_each_form_runs_as_pasted_into_psql(pool: asyncpg.Pool, desk: Desk, name: str, on_citus: bool) -> None:
    """PREPARE the text as it stands in the file, and EXECUTE it with literal arguments, as the file's
    header shows: no driver, no parameters bound by code."""
    if on_citus and name == "create_for_any_desks":
        pytest.skip("the statement of any desks is one PostgreSQL's; Citus cannot run it (app/citus.py)")
    token = desk.token()
    literals = (
        f"{desk.desk_id}, NULL, NULL, NULL, NULL, '{{{desk.desk_id}}}', '{{{token.token_id}}}', "
        "'{\"API Via Psql\"}', '{pasted@example.com}', '{example.com}', '{Pasted}', '{Pasted in psql}', "
        "'{\"It works as written.\"}', '{normal}', '{NULL}', '{NULL}', "
        f"'{{{desk.desk_id + 1001}}}', '{{{desk.desk_id + 1002}}}', '{{{desk.desk_id + 1003}}}', "
        f"'{{{desk.desk_id + 1004}}}'"
    )
    async with pool.acquire() as conn:
        await conn.execute(f"PREPARE pasted AS {statement.QUERIES[name]}")
        try:
            row = await conn.fetchrow(f"EXECUTE pasted({literals})")
        finally:
            await conn.execute("DEALLOCATE pasted")
    assert row is not None
    assert (row["outcomes"], row["numbers"]) == (["created"], [1])
    stored = await pool.fetchrow(
        "SELECT t.subject, m.body, e.channel FROM tickets t JOIN messages m USING (desk_id, ticket_id)"
        " JOIN ticket_events e USING (desk_id, ticket_id) WHERE t.desk_id = $1",
        desk.desk_id,
    )
    assert tuple(stored) == ("Pasted in psql", "It works as written.", "API Via Psql")
