"""The create statement as data: its texts (sql/queries.sql), the pure function that lays out its
arguments, and what its answer means. Running it is app/writer.py's job."""

import enum
from pathlib import Path
from typing import Any, Final

import msgspec

from app.auth import Token
from app.idempotency import Key
from app.validation import NewTicket

Entry = tuple[Token, NewTicket]  # one create: the token that sent it, and its checked body


class Outcome(enum.StrEnum):
    """What the statement did with one item; the statement's own words (sql/queries.sql, `outcome`)."""

    CREATED = "created"
    BLOCKED = "blocked"
    DEPARTMENT_NOT_FOUND = "department_not_found"
    TICKET_TYPE_NOT_FOUND = "ticket_type_not_found"


class Requester(msgspec.Struct):
    email: str


class CreatedTicket(msgspec.Struct):
    """A created ticket as the create routes answer it."""

    id: str
    number: int
    subject: str
    priority: str
    requester: Requester


class Written(msgspec.Struct):
    """What a request wrote or, replayed, had written: each valid item's outcome, in order, and the
    created tickets."""

    outcomes: list[Outcome]
    tickets: list[CreatedTicket]
    replayed: bool = False

    def split(self) -> list["Written"]:
        """One Written per item, each with its own outcome and ticket."""
        tickets = iter(self.tickets)
        return [
            Written([outcome], [next(tickets)] if outcome is Outcome.CREATED else [], self.replayed)
            for outcome in self.outcomes
        ]


def _named(text: str) -> dict[str, str]:
    """The queries of a file of `-- name: NAME` sections (procrastinate's layout)."""
    queries: dict[str, str] = {}
    name = None
    for line in text.splitlines(keepends=True):
        if line.startswith("-- name: "):
            name = line.removeprefix("-- name: ").strip()
            queries[name] = ""
        elif name is not None:
            queries[name] += line
    return {name: query.strip() + "\n" for name, query in queries.items()}


_HERE: Final = Path(__file__).resolve().parent
# Inside a built wheel sql/ ships as app/sql; in a checkout it lives at the top level (as app/db.py finds it).
QUERIES: Final = _named(((_HERE / "sql") if (_HERE / "sql").is_dir() else _HERE.parent / "sql").joinpath(
    "queries.sql").read_text(encoding="utf-8"))
CREATE_FOR_ANY_DESKS: Final = QUERIES["create_for_any_desks"]
CREATE_FOR_ONE_DESK: Final = QUERIES["create_for_one_desk"]
STORED_TICKETS: Final = QUERIES["stored_tickets"]
# On Citus (app/citus.py) a create of one desk is this call instead: headoni_create_for_desk() (sql/0006)
# takes create_for_one_desk's arguments and then the lock timeout to run with, returns the statement's
# row, and Citus routes the call whole, as one task, to the node holding the desk, which it cannot do
# with the statement (docs/scaling.md).
CREATE_ON_CITUS: Final = "SELECT * FROM headoni_create_for_desk(" + ", ".join(f"${n}" for n in range(1, 22)) + ")"
IDS_PER_ITEM: Final = 4  # a user (if new), a ticket, its message and its event


def build(
    entries: list[Entry], key: Key | None, owner: Token | None, new_ids: list[int], *, one_desk: bool,
    citus: bool = False, lock_timeout_ms: int = 0,
) -> tuple[str, tuple[Any, ...]]:
    """The statement for these entries (of any desks, or with one_desk of one desk) and its arguments;
    with citus, the call of one desk's creates as Citus runs them, with lock_timeout_ms (0 for none).

    With a key, owner is the token of the request, whose desk every entry is of. new_ids holds
    IDS_PER_ITEM fresh ids per entry. Raises ValueError where a key or one_desk meets entries of two desks.
    """
    one_desk = one_desk or citus
    count = len(entries)
    if len(new_ids) != IDS_PER_ITEM * count:
        raise ValueError(f"{IDS_PER_ITEM} ids per entry, not {len(new_ids)} for {count}")
    tokens = [token for token, _ in entries]
    items = [item for _, item in entries]
    desk_ids = [t.desk_id for t in tokens]
    desk = None  # $1: the statement's one desk, needed only by a key and by create_for_one_desk
    if key is not None or one_desk:
        desk = owner.desk_id if owner is not None else desk_ids[0] if desk_ids else None
        if desk is None or any(d != desk for d in desk_ids):
            raise ValueError("an Idempotency-Key, or a statement of one desk, covers creates of one desk only")
    args = (
        desk, owner.token_id if key and owner else None,
        key.key if key else None, key.route if key else None, key.fingerprint if key else None,
        desk_ids, [t.token_id for t in tokens], [t.channel for t in tokens],
        [t.email for t in items], [t.domain for t in items], [t.name for t in items],
        [t.subject for t in items], [t.body for t in items], [t.priority for t in items],
        [t.department_id for t in items], [t.ticket_type_id for t in items],
        new_ids[0:count], new_ids[count : 2 * count], new_ids[2 * count : 3 * count], new_ids[3 * count :],
    )
    if citus:
        return CREATE_ON_CITUS, (*args, lock_timeout_ms)
    return (CREATE_FOR_ONE_DESK if one_desk else CREATE_FOR_ANY_DESKS), args


def of_nothing(*, one_desk: bool) -> tuple[str, tuple[Any, ...]]:
    """The statement (of any desks, or with one_desk of one) with no items and no key: it reads, locks and
    writes nothing. A new connection runs it once to be ready (app/writer.py prepare)."""
    return (CREATE_FOR_ONE_DESK if one_desk else CREATE_FOR_ANY_DESKS), (None,) * 5 + ([],) * 15


def ticket_ids(args: tuple[Any, ...]) -> list[int]:
    """The ticket ids build() gave the entries ($18), in order (created or not)."""
    ids: list[int] = args[17]
    return ids


def written(row: Any, entries: list[Entry], args: tuple[Any, ...]) -> Written:
    """What a statement that wrote (not replayed) answered, as a Written."""
    outcomes = [Outcome(o) for o in row["outcomes"]]
    numbers = row["numbers"]
    if len(numbers) != outcomes.count(Outcome.CREATED):  # would be a bug in the statement
        raise RuntimeError("the create statement numbered another count of tickets than it created")
    created = iter(numbers)
    tickets = [
        CreatedTicket(str(ticket_id), next(created), item.subject, item.priority, Requester(item.email))
        for (_, item), outcome, ticket_id in zip(entries, outcomes, ticket_ids(args), strict=True)
        if outcome is Outcome.CREATED
    ]
    return Written(outcomes, tickets)
