-- Citus (docs/scaling.md). On a plain PostgreSQL this migration only creates two functions, which the
-- service does not call there. On a database with the citus extension it distributes the schema by
-- desk_id and makes one call of headoni_create_for_desk() a routed unit of one desk.

-- One desk's creates, as HEADONI_STATEMENT_SCOPE=one-desk writes them, in one call that Citus delegates
-- whole to the worker holding the desk (create_distributed_function below, by its first argument).
-- The create statement (sql/queries.sql) cannot be routed: Citus plans no INSERT inside a WITH as one
-- task, so it runs the statement's every CTE as a step of its own, sends each step's rows to every
-- worker, and commits on all of them with two-phase commit. Here each step is a statement of its own
-- instead, and each one reads and writes the shards of this desk only, all of them on the node that runs
-- the call: one task, one node, one local commit.
--
-- It takes the arguments of CREATE_FOR_ONE_DESK ($1 to $20, in order), then the caller's lock_timeout
-- (Citus runs the call in a session of its own on the worker, which has none of the caller's settings;
-- the caller's statement_timeout still applies, since the coordinator cancels the call), and returns
-- the statement's row. It must write what that statement writes: tests/test_citus.py runs both on the
-- same creates and compares.
-- Lock order, as the statement's (docs/locking.md): the new requesters, in email order; then the desk's
-- counter (only after every requester is written, since this is the next statement); then new rows
-- only; foreign-key checks take FOR KEY SHARE at the end of each statement. The Idempotency-Key's
-- record is inserted last: a concurrent request with the same key makes it wait, then find the key
-- taken, and the call fails with SQLSTATE HD002, writing nothing; the service runs it again, which
-- replays. (Citus does not pass a shard's constraint name back to the client, so the unique violation
-- the statement fails with could not be told apart from another.)
CREATE FUNCTION headoni_create_for_desk(
    desk bigint, token bigint, key_text text, key_route text, key_fingerprint bytea,
    item_desks bigint[], item_tokens bigint[], channels text[], emails text[], domains text[], names text[],
    subjects text[], bodies text[], priorities text[], department_ids bigint[], ticket_type_ids bigint[],
    user_ids bigint[], ticket_ids bigint[], message_ids bigint[], event_ids bigint[], lock_timeout_ms integer)
RETURNS TABLE (outcomes text[], numbers bigint[], route text, fingerprint bytea,
               replay_outcomes text[], replay_ticket_ids bigint[], desks bigint)
LANGUAGE plpgsql AS $$
DECLARE
    stored record;
    found_departments bigint[];
    found_types bigint[];
    item_outcomes text[];
    taken bigint[];  -- the accepted items' positions, in order
    requester_emails text[] := '{}';
    requester_ids bigint[] := '{}';
    added record;
    base bigint;
    created_numbers bigint[] := '{}';
    created_ids bigint[] := '{}';
BEGIN
    PERFORM set_config('lock_timeout', lock_timeout_ms || 'ms', true);
    IF item_desks <> array_fill(desk, ARRAY[cardinality(item_desks)]) THEN
        RAISE EXCEPTION 'bug: creates of another desk than %', desk USING ERRCODE = 'HD001';
    END IF;
    IF key_text IS NOT NULL THEN
        SELECT k.route, k.fingerprint, k.outcomes, k.ticket_ids INTO stored FROM idempotency_keys k
        WHERE k.desk_id = desk AND k.token_id = token AND k.idem_key = key_text;
        IF FOUND THEN
            RETURN QUERY SELECT '{}'::text[], '{}'::bigint[], stored.route, stored.fingerprint, stored.outcomes,
                                stored.ticket_ids, 0::bigint;
            RETURN;
        END IF;
    END IF;

    -- Each item's department, ticket type and outcome; the accepted ones.
    SELECT coalesce(array_agg(r.department ORDER BY r.ord), '{}'),
           coalesce(array_agg(r.ticket_type ORDER BY r.ord), '{}'),
           coalesce(array_agg(CASE WHEN r.department IS NULL THEN 'department_not_found'
                                   WHEN r.ticket_type IS NULL THEN 'ticket_type_not_found'
                                   WHEN r.blocked THEN 'blocked'
                                   ELSE 'created' END ORDER BY r.ord), '{}'),
           coalesce(array_agg(r.ord ORDER BY r.ord)
                    FILTER (WHERE r.department IS NOT NULL AND r.ticket_type IS NOT NULL AND NOT r.blocked), '{}')
    INTO found_departments, found_types, item_outcomes, taken
    FROM (
        SELECT i.ord,
               (SELECT d.department_id FROM departments d
                WHERE d.desk_id = desk AND d.deleted_at IS NULL AND d.department_id = coalesce(
                    i.department_id,
                    (SELECT dd.department_id FROM departments dd WHERE dd.desk_id = desk AND dd.is_default))
               ) AS department,
               (SELECT y.ticket_type_id FROM ticket_types y
                WHERE y.desk_id = desk AND y.archived_at IS NULL AND y.ticket_type_id = coalesce(
                    i.ticket_type_id,
                    (SELECT yy.ticket_type_id FROM ticket_types yy WHERE yy.desk_id = desk AND yy.is_default))
               ) AS ticket_type,
               EXISTS (SELECT 1 FROM blocklist_entries b
                       WHERE b.desk_id = desk AND b.entry IN (i.email, i.domain)) AS blocked
        FROM unnest(emails, domains, department_ids, ticket_type_ids)
             WITH ORDINALITY AS i(email, domain, department_id, ticket_type_id, ord)
    ) r;

    IF cardinality(taken) > 0 THEN
        -- 1. The requesters: those known, then the others inserted, in email order. One committed since
        --    the lookup is taken by ON CONFLICT DO UPDATE of a non-key column (FOR NO KEY UPDATE, name
        --    unchanged) and returned.
        SELECT coalesce(array_agg(u.email), '{}'), coalesce(array_agg(u.user_id), '{}')
        INTO requester_emails, requester_ids
        FROM users u
        WHERE u.desk_id = desk AND u.email = ANY (ARRAY(SELECT emails[t] FROM unnest(taken) AS t));
        FOR added IN
            INSERT INTO users AS u (desk_id, user_id, email, name)
            SELECT DISTINCT ON (emails[t]) desk, user_ids[t], emails[t], names[t]
            FROM unnest(taken) AS t
            WHERE emails[t] <> ALL (requester_emails)
            ORDER BY emails[t], t
            ON CONFLICT (desk_id, email) DO UPDATE SET name = u.name
            RETURNING u.email, u.user_id
        LOOP
            requester_emails := requester_emails || added.email;
            requester_ids := requester_ids || added.user_id;
        END LOOP;
        IF EXISTS (SELECT 1 FROM unnest(taken) AS t WHERE emails[t] <> ALL (requester_emails)) THEN
            RAISE EXCEPTION 'bug: an accepted item has no requester' USING ERRCODE = 'HD001';
        END IF;

        -- 2. The desk's counter, once for all accepted items.
        UPDATE desk_counters c SET last_number = c.last_number + cardinality(taken) WHERE c.desk_id = desk
        RETURNING c.last_number - cardinality(taken) INTO base;
        created_numbers := ARRAY(SELECT base + s FROM generate_series(1, cardinality(taken)) AS s);
        created_ids := ARRAY(SELECT ticket_ids[t] FROM unnest(taken) AS t);

        -- 3. New rows.
        INSERT INTO tickets (desk_id, ticket_id, number, subject, priority, channel,
                             requester_id, department_id, ticket_type_id)
        SELECT desk, ticket_ids[a.t], base + a.seq, subjects[a.t], priorities[a.t], 'api',
               r.user_id, found_departments[a.t], found_types[a.t]
        FROM unnest(taken) WITH ORDINALITY AS a(t, seq)
        JOIN unnest(requester_emails, requester_ids) AS r(email, user_id) ON r.email = emails[a.t];
        INSERT INTO messages (desk_id, message_id, ticket_id, author_id, body, public)
        SELECT desk, message_ids[a.t], ticket_ids[a.t], r.user_id, bodies[a.t], true
        FROM unnest(taken) AS a(t)
        JOIN unnest(requester_emails, requester_ids) AS r(email, user_id) ON r.email = emails[a.t];
        INSERT INTO ticket_events (desk_id, event_id, ticket_id, kind, channel, token_id)
        SELECT desk, event_ids[a.t], ticket_ids[a.t], 'ticket.created', channels[a.t], item_tokens[a.t]
        FROM unnest(taken) AS a(t);
    END IF;

    IF key_text IS NOT NULL THEN
        INSERT INTO idempotency_keys (desk_id, token_id, idem_key, route, fingerprint, outcomes, ticket_ids)
        VALUES (desk, token, key_text, key_route, key_fingerprint, item_outcomes, created_ids)
        ON CONFLICT DO NOTHING;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'the Idempotency-Key was taken by a concurrent request; run again to replay'
                USING ERRCODE = 'HD002';
        END IF;
    END IF;
    RETURN QUERY SELECT item_outcomes, created_numbers, NULL::text, NULL::bytea, NULL::text[], NULL::bigint[],
                        (cardinality(taken) > 0)::int::bigint;
END
$$;

-- Distribute one table of a desk's data by desk_id, colocated with the others. For later migrations
-- that add such a table (docs/scaling.md); does nothing on a plain PostgreSQL or once it is distributed.
CREATE FUNCTION headoni_distribute(tab regclass) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus') THEN
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_dist_partition WHERE logicalrelid = tab AND partmethod = 'h') THEN
        RETURN;
    END IF;
    IF tab = 'desk_counters'::regclass THEN  -- the first one makes the colocation group
        PERFORM create_distributed_table(tab, 'desk_id');
    ELSE
        PERFORM create_distributed_table(tab, 'desk_id', colocate_with => 'desk_counters');
    END IF;
END
$$;

-- desks and api_tokens become reference tables (a copy on every node: the directory of desks, and the
-- tokens, found by their digest before the desk is known). Every other table of a desk's data is
-- distributed by desk_id, all colocated, so that one desk's rows of every table share one shard group.
-- schema_migrations and snowflake_workers stay local tables of the coordinator.
--
-- Citus accepts a foreign key between two tables of a desk's data only once both are distributed and
-- colocated, and none from a local table to a distributed one, so no order of distributing them works
-- with the keys in place ("cannot create foreign key constraint since foreign keys from reference
-- tables and local tables to distributed tables are not supported"). So the foreign keys of these
-- tables are dropped, the tables distributed, and the keys added back with the same names and
-- definitions; Citus creates them on every shard and checks them against the rows there.
--
-- A table distributed already is left as it is, so this also completes a database whose big tables
-- were distributed online beforehand (create_distributed_table_concurrently, docs/scaling.md). Given
-- data, create_distributed_table copies each table to its shards within this migration's transaction,
-- blocking writes to it meanwhile.
DO $$
DECLARE
    desk_data CONSTANT regclass[] := ARRAY[
        'desk_counters', 'departments', 'ticket_types', 'users', 'blocklist_entries',
        'tickets', 'messages', 'ticket_events', 'idempotency_keys'];
    directories CONSTANT regclass[] := ARRAY['desks', 'api_tokens'];
    tab regclass;
    fk record;
    keys text[] := '{}';
    k text;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus') THEN
        RETURN;
    END IF;
    FOR fk IN
        SELECT c.conrelid::regclass AS tab, c.conname, pg_get_constraintdef(c.oid) AS definition
        FROM pg_constraint c
        WHERE c.contype = 'f' AND c.conrelid = ANY (desk_data || directories)
          AND NOT EXISTS (SELECT 1 FROM pg_dist_partition p WHERE p.logicalrelid = c.conrelid)
        ORDER BY c.conrelid::regclass::text, c.conname
    LOOP
        EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', fk.tab, fk.conname);
        keys := keys || format('ALTER TABLE %s ADD CONSTRAINT %I %s', fk.tab, fk.conname, fk.definition);
    END LOOP;
    FOREACH tab IN ARRAY directories LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_dist_partition WHERE logicalrelid = tab AND partmethod = 'n'
                       AND repmodel = 't') THEN
            PERFORM create_reference_table(tab);
        END IF;
    END LOOP;
    FOREACH tab IN ARRAY desk_data LOOP
        PERFORM headoni_distribute(tab);
    END LOOP;
    FOREACH k IN ARRAY keys LOOP
        EXECUTE k;
    END LOOP;
    PERFORM create_distributed_function(
        'headoni_create_for_desk(bigint, bigint, text, text, bytea, bigint[], bigint[], text[], text[], text[],'
        ' text[], text[], text[], text[], bigint[], bigint[], bigint[], bigint[], bigint[], bigint[], integer)',
        'desk', colocate_with => 'desk_counters');
END
$$;
