"""What the stress harness asserts once the load is over, from the answers and from the database."""

import bisect
import json
from collections import defaultdict
from typing import Any

import asyncpg

from bench.stress_load import OK_STATUSES, Call, Desk, Load, Sent

_STORED = """
SELECT t.desk_id, t.ticket_id, t.number, t.subject, u.email,
       (SELECT array_agg(m.body) FROM messages m WHERE m.desk_id = t.desk_id AND m.ticket_id = t.ticket_id) AS bodies,
       (SELECT array_agg(e.channel || ' ' || e.token_id) FROM ticket_events e
        WHERE e.desk_id = t.desk_id AND e.ticket_id = t.ticket_id AND e.kind = 'ticket.created') AS events
FROM tickets t JOIN users u ON u.desk_id = t.desk_id AND u.user_id = t.requester_id
WHERE t.desk_id = ANY($1::bigint[])
"""


def acknowledged(load: Load) -> list[tuple[Call, Sent, dict[str, Any]]]:
    """Every created ticket an answer reported: (the call, the item as sent, the answer's ticket). A
    replayed answer reports the ticket of the call that wrote it, and is left out."""
    found = []
    for call in load.calls:
        if call.headers.get("idempotent-replayed") == "true":
            continue
        for sent, result in zip(call.items, call.results(), strict=False):
            if result.get("status") == 201:
                found.append((call, sent, result["ticket"]))
    return found


def answers(load: Load) -> list[str]:
    """Every answer that is not what a create may give under this load: 5xx, no answer, or another error."""
    bad = []
    start = min((call.sent for call in load.calls), default=0.0)
    for call in load.calls:
        if call.status == 0 or call.status >= 500:
            took = 1000 * (call.received - call.sent)
            when = f"request {call.request_id}, sent at +{call.sent - start:.3f} s, {took:.1f} ms"
            answer = call.status or call.error
            bad.append(f"{call.kind} on {call.desk.subdomain} ({when}): {answer} {call.body[:200]!r}")
            continue
        statuses = [r.get("status") for r in call.results()]
        errors = {r.get("error") for r in call.results() if r.get("status") == 400}
        if not set(statuses) <= OK_STATUSES or not errors <= {"department_not_found", "ticket_type_not_found"}:
            bad.append(f"{call.kind} on {call.desk.subdomain}: {call.status} {call.body[:200]!r}")
    return bad


def commit_order(desk_tickets: list[tuple[float, float, int]]) -> tuple[int, list[str]]:
    """Numbers in commit order, as a client can see it: a ticket whose request was sent after another's
    answer arrived has the higher number. Takes (sent, received, number); returns pairs ordered, breaches."""
    by_received = sorted(desk_tickets, key=lambda t: t[1])
    received = [t[1] for t in by_received]
    highest = []  # the highest number among the first i answers
    top = 0
    for _, _, number in by_received:
        top = max(top, number)
        highest.append(top)
    pairs, breaches = 0, []
    for sent, _, number in desk_tickets:
        before = bisect.bisect_left(received, sent)  # answers that arrived before this request was sent
        if before:
            pairs += before
            if highest[before - 1] >= number:
                breaches.append(f"number {number} was sent after number {highest[before - 1]} was answered")
    return pairs, breaches


async def stored(conn: asyncpg.Connection, load: Load, desks: list[Desk]) -> dict[str, Any]:
    """Check the database against the answers; return facts and failures."""
    failures: list[str] = []
    rows = await conn.fetch(_STORED, [d.desk_id for d in desks])
    by_id = {r["ticket_id"]: r for r in rows}
    by_desk: dict[int, list[asyncpg.Record]] = defaultdict(list)
    for r in rows:
        by_desk[r["desk_id"]].append(r)
    acked = acknowledged(load)
    acked_ids = set()
    order: dict[int, list[tuple[float, float, int]]] = defaultdict(list)
    for call, sent, ticket in acked:
        row = by_id.get(int(ticket["id"]))
        acked_ids.add(int(ticket["id"]))
        order[call.desk.desk_id].append((call.sent, call.received, ticket["number"]))
        expected = (call.desk.desk_id, ticket["number"], sent.subject, sent.email, [sent.body],
                    [f"API Via {call.desk.token_name} {call.desk.token_id}"])
        actual = None if row is None else (row["desk_id"], row["number"], row["subject"], row["email"],
                                           row["bodies"], row["events"])
        if actual != expected or ticket["subject"] != sent.subject or ticket["requester"]["email"] != sent.email:
            failures.append(f"acknowledged ticket {ticket} is stored as {actual}, not {expected}")
    unacked = [r["subject"] for r in rows if r["ticket_id"] not in acked_ids]
    if unacked:
        failures.append(f"{len(unacked)} stored tickets were never acknowledged, e.g. {unacked[:3]}")
    pairs = 0
    for desk in desks:
        numbers = sorted(r["number"] for r in by_desk[desk.desk_id])
        last = await conn.fetchval("SELECT last_number FROM desk_counters WHERE desk_id = $1", desk.desk_id)
        if numbers != list(range(1, len(numbers) + 1)) or last != len(numbers):
            failures.append(f"desk {desk.subdomain}: numbers are not 1..{len(numbers)} (counter {last})")
        checked, breaches = commit_order(order[desk.desk_id])
        pairs += checked
        failures += [f"desk {desk.subdomain}: {b}" for b in breaches[:5]]
    for call in load.calls:  # a batch's created items have consecutive numbers in item order
        numbers = [r["ticket"]["number"] for r in call.results() if r.get("status") == 201 and "ticket" in r]
        if call.kind == "batch" and numbers != list(range(numbers[0], numbers[0] + len(numbers)) if numbers else []):
            failures.append(f"a batch on {call.desk.subdomain} got numbers {numbers}")
    duplicated = await conn.fetch(
        "SELECT desk_id, email, count(*) AS n FROM users WHERE desk_id = ANY($1::bigint[])"
        " GROUP BY desk_id, lower(email), email HAVING count(*) > 1",
        [d.desk_id for d in desks],
    )
    failures += [f"requester {r['email']} is stored {r['n']} times on desk {r['desk_id']}" for r in duplicated]
    failures += replays(load)
    return {
        "tickets": len(rows),
        "acknowledged": len(acked),
        "statements": await conn.fetchval(
            "SELECT count(DISTINCT xmin::text) FROM tickets WHERE desk_id = ANY($1::bigint[])",
            [d.desk_id for d in desks],
        ),
        "users": await conn.fetchval("SELECT count(*) FROM users WHERE desk_id = ANY($1::bigint[])",
                                     [d.desk_id for d in desks]),
        "ordered_pairs": pairs,
        "failures": failures,
    }


def replays(load: Load) -> list[str]:
    """One Idempotency-Key: the same answer four times, written once (three concurrent and one after)."""
    failures = []
    for calls in load.replays:
        if any(c.status == 0 or c.status >= 500 for c in calls):
            continue  # reported with the answers
        bodies = {(c.status, c.body) for c in calls}
        fresh = [c for c in calls if c.headers.get("idempotent-replayed") != "true"]
        if len(bodies) != 1 or len(fresh) != 1:
            answer = [(c.status, c.headers.get("idempotent-replayed"), json.loads(c.body)) for c in calls]
            failures.append(f"Idempotency-Key {calls[0].key}: answers {answer}")
    return failures
