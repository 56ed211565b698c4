"""bench/variants.py's variants of the create statement write what the service's statement writes, so that
what `python -m bench.variants` measures is the same work done another way: each item its requester,
ticket, first message and created event, the tickets numbered after their desk's last, consecutively in
item order, and the counters bumped by as many."""

import asyncpg
import pytest

from bench import cluster, prefill, variants


@pytest.mark.parametrize("variant", list(variants.VARIANTS))
async def test_each_variant_writes_the_items_as_the_service_statement_does(
    server_url: str, on_citus: bool, variant: str
) -> None:
    if on_citus:
        pytest.skip("the variants are of create_for_any_desks, which the service does not run on Citus")
    async with cluster.throwaway_database(server_url, "headoni_variants", migrated=True) as url:
        fill = await prefill.fill(url, 3, 6)  # 2 tickets per desk: each counter at 2
        desks = list(range(prefill.FIRST_DESK, fill.last_desk + 1))
        conn = await asyncpg.connect(url)
        try:
            await variants.prepare(conn)
            one_desk = variants.entries(5, desks[:1], "one")
            spread = [entry for n in range(6) for entry in variants.entries(1, [desks[n % 3]], f"spread{n}")]
            numbers = await variants.write(conn, variant, one_desk) + await variants.write(conn, variant, spread)

            # desk 1 gets 3..7 from the first batch, then 8 and 9; desks 2 and 3 get 3 and 4
            assert numbers == [3, 4, 5, 6, 7, 8, 3, 3, 9, 4, 4]
            counters = dict(await conn.fetch("SELECT desk_id, last_number FROM desk_counters ORDER BY desk_id"))
            assert counters == {desks[0]: 9, desks[1]: 4, desks[2]: 4}
            written = await conn.fetch(
                """SELECT t.desk_id, t.number, u.email, t.subject,
                          (SELECT count(*) FROM messages m WHERE m.desk_id = t.desk_id AND m.ticket_id = t.ticket_id
                           AND m.author_id = t.requester_id) AS messages,
                          (SELECT count(*) FROM ticket_events e WHERE e.desk_id = t.desk_id
                           AND e.ticket_id = t.ticket_id AND e.kind = 'ticket.created') AS events
                   FROM tickets t JOIN users u ON u.desk_id = t.desk_id AND u.user_id = t.requester_id
                   WHERE t.number > 2 ORDER BY t.desk_id, t.number"""
            )
            items = [item for _, item in one_desk + spread]
            expected = sorted(
                ((token.desk_id, number, item.email, item.subject, 1, 1)
                 for (token, item), number in zip(one_desk + spread, numbers, strict=True))
            )
            assert [tuple(row) for row in written] == expected
            assert len({item.email for item in items}) == len(written)
        finally:
            await conn.close()
