-- Retry-safe and bulk intake: idempotency records, and the guard of the multi-ticket statement.

-- The outcome of a request sent with an Idempotency-Key, stored in the same statement as its tickets.
-- A replay is rendered again from it: the outcome of each valid item, in order, and the ids of the
-- tickets it created. Keys are scoped to the token that sent them.
CREATE TABLE idempotency_keys (
    desk_id      bigint NOT NULL,
    token_id     bigint NOT NULL,
    idem_key     text NOT NULL,
    route        text NOT NULL,
    fingerprint  bytea NOT NULL,
    outcomes     text[] NOT NULL,
    ticket_ids   bigint[] NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (desk_id, token_id, idem_key),
    FOREIGN KEY (desk_id, token_id) REFERENCES api_tokens (desk_id, token_id)
);
-- For the purge of expired keys.
CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at);

-- Called once by the create statement just before it locks the desk's counter. When a requester that
-- the statement meant to create was committed by a concurrent request after the statement's snapshot,
-- fewer items found a requester than were accepted: abort the whole statement (so it leaves nothing
-- behind, not even the users it created) with SQLSTATE HD001, which the service retries.
CREATE FUNCTION headoni_take_numbers(ready bigint, accepted bigint) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF ready <> accepted THEN
        RAISE EXCEPTION 'a requester was created concurrently; retry the statement' USING ERRCODE = 'HD001';
    END IF;
    RETURN ready > 0;
END
$$;
