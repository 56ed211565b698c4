-- The statements of the create path, parsed once at import by app/statement.py. Each starts at its
-- `-- name:` line and runs to the next; each is complete SQL. To run one in psql, prepare it and execute
-- it with arguments laid out as app/statement.py's build() lays them out, e.g.
--   PREPARE create_ticket AS <the text of create_for_one_desk>;
--   EXECUTE create_ticket(<desk_id>, NULL, NULL, NULL, NULL, '{<desk_id>}', '{<token_id>}', '{"API Via Me"}',
--       '{alice@example.com}', '{example.com}', '{alice}', '{Hello}', '{"It broke."}', '{normal}', '{NULL}',
--       '{NULL}', '{1}', '{2}', '{3}', '{4}');
--
-- create_for_any_desks and create_for_one_desk write one request, or many requests riding one statement
-- (app/coalesce.py), in one round trip, atomically: skip everything if the Idempotency-Key ($1 desk, $2
-- token, $3 key, $4 route, $5 fingerprint: all NULL without a key) was used before; resolve each item's
-- department and ticket type; check the blocklist; find or create the requesters (once per desk and
-- email); bump the counter of each desk involved once for all its accepted items; insert the tickets with
-- consecutive numbers per desk in item order, their first messages and created events; and remember the
-- outcome under the Idempotency-Key, if one was sent. The items come as parallel arrays, $6 to $20 (the
-- unnest in `item`), and the answer is one row: each item's outcome (as app/statement.py's Outcome), the
-- created tickets' numbers, and, for a replay, what was stored under the key.
--
-- The two forms differ only where they name a desk (tests/test_statement.py checks it):
-- - create_for_any_desks (HEADONI_STATEMENT_SCOPE=any-desks, the default): items of any desks, as the
--   coalescer groups them; every table is reached at the item's own desk_id, and headoni_bump_counters()
--   (sql/0005) bumps the desks' counters in desk_id order. On one PostgreSQL this form is the faster one
--   even for one desk (docs/benchmark.md).
-- - create_for_one_desk (HEADONI_STATEMENT_SCOPE=one-desk): items of one desk, $1; every table is read,
--   updated and inserted into at desk_id = $1, which is what lets Citus route the whole statement to the
--   desk's shard (docs/scaling.md). Its counter is a plain UPDATE: Citus refuses a function that writes a
--   distributed table inside a routed statement.
--
-- Lock order (docs/locking.md has every statement's, the admin commands' too). Every run takes its row
-- locks in one global order, whatever order PostgreSQL evaluates the CTEs in, so two runs cannot deadlock:
--   1. users: its new requesters, in (desk_id, email) order (new_user's ORDER BY). The insert waits for a
--      concurrent insert of the same email; a requester committed since this statement's snapshot (which
--      known_user cannot see) is taken by ON CONFLICT DO UPDATE of a non-key column, FOR NO KEY UPDATE,
--      and returned, so every accepted item has its requester. Never FOR UPDATE: that would block other
--      creates' foreign-key checks on the row (FOR KEY SHARE), which run at the end of their statements,
--      while they hold their counters.
--   2. desk_counters: the desks with accepted items, in desk_id order, FOR NO KEY UPDATE. ready joins
--      users_written, a count that reads new_user to its end (finishing its INSERT), so no row of ready,
--      and so no counter, is reached before step 1 is complete. A failed item takes no number.
--      (users_written is MATERIALIZED: computed once. Inlined, it sat inside ready's nested loop and
--      PostgreSQL counted new_user again for each row, 100 counts of 100 rows for a batch of 100.)
--   3. New rows only (tickets, messages, events, the Idempotency-Key's record): nothing to wait for, but
--      a concurrent request with the same key, whose insert makes this one wait and then fail on the key;
--      run again (app/writer.py), the statement replays.
--   4. Foreign-key checks, at the end of the statement: FOR KEY SHARE on the rows referenced. Nothing the
--      service runs takes FOR UPDATE on those rows (no deletes, no key updates), so these never wait.
-- Reads (departments, ticket types, blocklist, known requesters, the key) take no locks: a create sees
-- them as of its statement's start. headoni_bump_counters() checks that every accepted item found its
-- requester, aborting the statement with SQLSTATE HD001 if not (a bug; never run again). The final SELECT
-- reads counter, so that it always runs.

-- name: create_for_any_desks
WITH existing AS (
    SELECT route, fingerprint, outcomes, ticket_ids FROM idempotency_keys
    WHERE desk_id = $1 AND token_id = $2 AND idem_key = $3
), item AS (
    SELECT * FROM unnest($6::bigint[], $7::bigint[], $8::text[], $9::text[], $10::text[], $11::text[],
                         $12::text[], $13::text[], $14::text[], $15::bigint[], $16::bigint[],
                         $17::bigint[], $18::bigint[], $19::bigint[], $20::bigint[])
        WITH ORDINALITY AS i(desk_id, token_id, channel, email, domain, name, subject, body, priority,
                             department_id, ticket_type_id, user_id, ticket_id, message_id, event_id, ord)
    WHERE NOT EXISTS (SELECT 1 FROM existing)
), resolved AS (
    SELECT i.*,
           (SELECT d.department_id FROM departments d
            WHERE d.desk_id = i.desk_id AND d.deleted_at IS NULL AND d.department_id = coalesce(
                i.department_id,
                (SELECT dd.department_id FROM departments dd WHERE dd.desk_id = i.desk_id AND dd.is_default))
           ) AS found_department,
           (SELECT y.ticket_type_id FROM ticket_types y
            WHERE y.desk_id = i.desk_id AND y.archived_at IS NULL AND y.ticket_type_id = coalesce(
                i.ticket_type_id,
                (SELECT yy.ticket_type_id FROM ticket_types yy WHERE yy.desk_id = i.desk_id AND yy.is_default))
           ) AS found_type,
           EXISTS (SELECT 1 FROM blocklist_entries b
                   WHERE b.desk_id = i.desk_id AND b.entry IN (i.email, i.domain)) AS blocked
    FROM item i
), accepted AS (
    SELECT * FROM resolved WHERE found_department IS NOT NULL AND found_type IS NOT NULL AND NOT blocked
), known_user AS (
    SELECT desk_id, email, user_id FROM (
        SELECT DISTINCT a.desk_id, a.email,
               (SELECT u.user_id FROM users u WHERE u.desk_id = a.desk_id AND u.email = a.email) AS user_id
        FROM accepted a
    ) found
    WHERE user_id IS NOT NULL
), new_user AS (
    INSERT INTO users (desk_id, user_id, email, name)
    SELECT DISTINCT ON (a.desk_id, a.email) a.desk_id, a.user_id, a.email, a.name FROM accepted a
    WHERE NOT EXISTS (SELECT 1 FROM known_user k WHERE k.desk_id = a.desk_id AND k.email = a.email)
    ORDER BY a.desk_id, a.email, a.ord
    ON CONFLICT (desk_id, email) DO UPDATE SET name = users.name
    RETURNING desk_id, email, user_id
), users_written AS MATERIALIZED (
    SELECT count(*) AS n FROM new_user  -- read to its end: new_user's INSERT, and its every lock, is done
), ready AS (
    SELECT a.*, r.user_id AS requester_id, row_number() OVER (PARTITION BY a.desk_id ORDER BY a.ord) AS seq
    FROM users_written w, accepted a
    JOIN (SELECT * FROM known_user UNION ALL SELECT * FROM new_user) r USING (desk_id, email)
), taken AS (
    SELECT desk_id, count(*) AS n FROM ready GROUP BY desk_id
), counter AS (
    SELECT * FROM headoni_bump_counters(
        (SELECT array_agg(desk_id ORDER BY desk_id) FROM taken), (SELECT array_agg(n ORDER BY desk_id) FROM taken),
        (SELECT count(*) FROM ready), (SELECT count(*) FROM accepted))
), ticket AS (
    INSERT INTO tickets (desk_id, ticket_id, number, subject, priority, channel,
                         requester_id, department_id, ticket_type_id)
    SELECT r.desk_id, r.ticket_id, c.base + r.seq, r.subject, r.priority, 'api',
           r.requester_id, r.found_department, r.found_type
    FROM ready r JOIN counter c USING (desk_id)
    RETURNING desk_id, ticket_id, number
), message AS (
    INSERT INTO messages (desk_id, message_id, ticket_id, author_id, body, public)
    SELECT r.desk_id, r.message_id, r.ticket_id, r.requester_id, r.body, true
    FROM ready r JOIN ticket USING (desk_id, ticket_id)
), event AS (
    INSERT INTO ticket_events (desk_id, event_id, ticket_id, kind, channel, token_id)
    SELECT r.desk_id, r.event_id, r.ticket_id, 'ticket.created', r.channel, r.token_id
    FROM ready r JOIN ticket USING (desk_id, ticket_id)
), outcome AS (
    SELECT coalesce(array_agg(CASE WHEN found_department IS NULL THEN 'department_not_found'
                                   WHEN found_type IS NULL THEN 'ticket_type_not_found'
                                   WHEN blocked THEN 'blocked'
                                   ELSE 'created' END ORDER BY ord), '{}') AS outcomes,
           (SELECT coalesce(array_agg(t.number ORDER BY r.ord), '{}')
            FROM ticket t JOIN ready r USING (desk_id, ticket_id)) AS numbers,
           (SELECT coalesce(array_agg(t.ticket_id ORDER BY r.ord), '{}')
            FROM ticket t JOIN ready r USING (desk_id, ticket_id)) AS ticket_ids
    FROM resolved
), remembered AS (
    INSERT INTO idempotency_keys (desk_id, token_id, idem_key, route, fingerprint, outcomes, ticket_ids)
    SELECT $1, $2, $3, $4, $5, outcomes, ticket_ids FROM outcome
    WHERE $3::text IS NOT NULL AND NOT EXISTS (SELECT 1 FROM existing)
)
SELECT o.outcomes, o.numbers, e.route, e.fingerprint, e.outcomes AS replay_outcomes, e.ticket_ids AS replay_ticket_ids,
       (SELECT count(*) FROM counter) AS desks
FROM outcome o LEFT JOIN existing e ON true

-- name: create_for_one_desk
WITH existing AS (
    SELECT route, fingerprint, outcomes, ticket_ids FROM idempotency_keys
    WHERE desk_id = $1 AND token_id = $2 AND idem_key = $3
), item AS (
    SELECT * FROM unnest($6::bigint[], $7::bigint[], $8::text[], $9::text[], $10::text[], $11::text[],
                         $12::text[], $13::text[], $14::text[], $15::bigint[], $16::bigint[],
                         $17::bigint[], $18::bigint[], $19::bigint[], $20::bigint[])
        WITH ORDINALITY AS i(desk_id, token_id, channel, email, domain, name, subject, body, priority,
                             department_id, ticket_type_id, user_id, ticket_id, message_id, event_id, ord)
    WHERE NOT EXISTS (SELECT 1 FROM existing)
), resolved AS (
    SELECT i.*,
           (SELECT d.department_id FROM departments d
            WHERE d.desk_id = $1 AND d.deleted_at IS NULL AND d.department_id = coalesce(
                i.department_id,
                (SELECT dd.department_id FROM departments dd WHERE dd.desk_id = $1 AND dd.is_default))
           ) AS found_department,
           (SELECT y.ticket_type_id FROM ticket_types y
            WHERE y.desk_id = $1 AND y.archived_at IS NULL AND y.ticket_type_id = coalesce(
                i.ticket_type_id,
                (SELECT yy.ticket_type_id FROM ticket_types yy WHERE yy.desk_id = $1 AND yy.is_default))
           ) AS found_type,
           EXISTS (SELECT 1 FROM blocklist_entries b
                   WHERE b.desk_id = $1 AND b.entry IN (i.email, i.domain)) AS blocked
    FROM item i
), accepted AS (
    SELECT * FROM resolved WHERE found_department IS NOT NULL AND found_type IS NOT NULL AND NOT blocked
), known_user AS (
    SELECT desk_id, email, user_id FROM (
        SELECT DISTINCT a.desk_id, a.email,
               (SELECT u.user_id FROM users u WHERE u.desk_id = $1 AND u.email = a.email) AS user_id
        FROM accepted a
    ) found
    WHERE user_id IS NOT NULL
), new_user AS (
    INSERT INTO users (desk_id, user_id, email, name)
    SELECT DISTINCT ON (a.desk_id, a.email) $1, a.user_id, a.email, a.name FROM accepted a
    WHERE NOT EXISTS (SELECT 1 FROM known_user k WHERE k.desk_id = a.desk_id AND k.email = a.email)
    ORDER BY a.desk_id, a.email, a.ord
    ON CONFLICT (desk_id, email) DO UPDATE SET name = users.name
    RETURNING desk_id, email, user_id
), users_written AS MATERIALIZED (
    SELECT count(*) AS n FROM new_user  -- read to its end: new_user's INSERT, and its every lock, is done
), ready AS (
    SELECT a.*, r.user_id AS requester_id, row_number() OVER (PARTITION BY a.desk_id ORDER BY a.ord) AS seq
    FROM users_written w, accepted a
    JOIN (SELECT * FROM known_user UNION ALL SELECT * FROM new_user) r USING (desk_id, email)
), counter AS (
    UPDATE desk_counters SET last_number = last_number + (SELECT count(*) FROM ready)
    WHERE desk_id = $1 AND EXISTS (SELECT 1 FROM ready)
    RETURNING desk_id, last_number - (SELECT count(*) FROM ready) AS base
), ticket AS (
    INSERT INTO tickets (desk_id, ticket_id, number, subject, priority, channel,
                         requester_id, department_id, ticket_type_id)
    SELECT $1, r.ticket_id, c.base + r.seq, r.subject, r.priority, 'api',
           r.requester_id, r.found_department, r.found_type
    FROM ready r JOIN counter c USING (desk_id)
    RETURNING desk_id, ticket_id, number
), message AS (
    INSERT INTO messages (desk_id, message_id, ticket_id, author_id, body, public)
    SELECT $1, r.message_id, r.ticket_id, r.requester_id, r.body, true
    FROM ready r JOIN ticket USING (desk_id, ticket_id)
), event AS (
    INSERT INTO ticket_events (desk_id, event_id, ticket_id, kind, channel, token_id)
    SELECT $1, r.event_id, r.ticket_id, 'ticket.created', r.channel, r.token_id
    FROM ready r JOIN ticket USING (desk_id, ticket_id)
), outcome AS (
    SELECT coalesce(array_agg(CASE WHEN found_department IS NULL THEN 'department_not_found'
                                   WHEN found_type IS NULL THEN 'ticket_type_not_found'
                                   WHEN blocked THEN 'blocked'
                                   ELSE 'created' END ORDER BY ord), '{}') AS outcomes,
           (SELECT coalesce(array_agg(t.number ORDER BY r.ord), '{}')
            FROM ticket t JOIN ready r USING (desk_id, ticket_id)) AS numbers,
           (SELECT coalesce(array_agg(t.ticket_id ORDER BY r.ord), '{}')
            FROM ticket t JOIN ready r USING (desk_id, ticket_id)) AS ticket_ids
    FROM resolved
), remembered AS (
    INSERT INTO idempotency_keys (desk_id, token_id, idem_key, route, fingerprint, outcomes, ticket_ids)
    SELECT $1, $2, $3, $4, $5, outcomes, ticket_ids FROM outcome
    WHERE $3::text IS NOT NULL AND NOT EXISTS (SELECT 1 FROM existing)
)
SELECT o.outcomes, o.numbers, e.route, e.fingerprint, e.outcomes AS replay_outcomes, e.ticket_ids AS replay_ticket_ids,
       (SELECT count(*) FROM counter) AS desks
FROM outcome o LEFT JOIN existing e ON true

-- name: stored_tickets
-- A replay's tickets, in the order the request listed them: $1 the desk, $2 their ids.
SELECT t.ticket_id, t.number, t.subject, t.priority, u.email
FROM unnest($2::bigint[]) WITH ORDINALITY AS k(ticket_id, ord)
JOIN tickets t ON t.desk_id = $1 AND t.ticket_id = k.ticket_id
JOIN users u ON u.desk_id = t.desk_id AND u.user_id = t.requester_id
ORDER BY k.ord
