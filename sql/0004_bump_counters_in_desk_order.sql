-- Statements that write tickets for several desks at once lock the desks' counter rows in desk order,
-- so two of them can never deadlock. Done by a function, each UPDATE a command of its own: a row lock
-- taken by the create statement itself in the same command would make its own UPDATE skip the row.
-- The requester-race guard of headoni_take_numbers() moves here with it.
CREATE FUNCTION headoni_bump_counters(desks bigint[], counts bigint[], ready bigint, accepted bigint)
RETURNS TABLE (desk_id bigint, base bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    d bigint;
    n bigint;
BEGIN
    IF ready <> accepted THEN
        RAISE EXCEPTION 'a requester was created concurrently; retry the statement' USING ERRCODE = 'HD001';
    END IF;
    FOR d, n IN SELECT u.d, u.n FROM unnest(desks, counts) AS u(d, n) ORDER BY u.d LOOP
        UPDATE desk_counters c SET last_number = c.last_number + n WHERE c.desk_id = d
        RETURNING c.desk_id, c.last_number - n INTO desk_id, base;
        RETURN NEXT;
    END LOOP;
END
$$;

DROP FUNCTION headoni_take_numbers(bigint, bigint);
