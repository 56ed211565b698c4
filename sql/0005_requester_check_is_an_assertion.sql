-- headoni_bump_counters() again, its lock order unchanged (desks' counter rows in desk_id order), with
-- its requester check said for what it now is. Since the create statement takes a requester committed
-- concurrently through ON CONFLICT DO UPDATE (app/tickets.py), every accepted item always has its
-- requester, and the check can fail only through a bug in the statement: it aborts the statement whole,
-- writing nothing, and the service does not run it again. (The comments of 0002 and 0004 describe the
-- retry of an earlier version; migrations are append-only, so they stay as they were.)
CREATE OR REPLACE FUNCTION headoni_bump_counters(desks bigint[], counts bigint[], ready bigint, accepted bigint)
RETURNS TABLE (desk_id bigint, base bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    d bigint;
    n bigint;
BEGIN
    IF ready <> accepted THEN
        RAISE EXCEPTION 'bug: % accepted items but % with a requester', accepted, ready USING ERRCODE = 'HD001';
    END IF;
    FOR d, n IN SELECT u.d, u.n FROM unnest(desks, counts) AS u(d, n) ORDER BY u.d LOOP
        UPDATE desk_counters c SET last_number = c.last_number + n WHERE c.desk_id = d
        RETURNING c.desk_id, c.last_number - n INTO desk_id, base;
        RETURN NEXT;
    END LOOP;
END
$$;
