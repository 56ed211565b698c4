-- Rate limits (docs/limits.md). A token's own limit, else its desk's default, else the service's
-- (HEADONI_DEFAULT_RATE): `rate_units` per `rate_seconds`, with a burst of `rate_burst` units. All
-- three are set together or not at all. (The constraint in an ALTER TABLE of its own: Citus refuses
-- ADD CONSTRAINT beside other subcommands.)
ALTER TABLE desks
    ADD COLUMN rate_units   integer,
    ADD COLUMN rate_seconds integer,
    ADD COLUMN rate_burst   integer;
ALTER TABLE desks
    ADD CONSTRAINT desks_rate_limit CHECK (
        (rate_units IS NULL AND rate_seconds IS NULL AND rate_burst IS NULL)
        OR (rate_units > 0 AND rate_seconds > 0 AND rate_burst > 0)
    );

ALTER TABLE api_tokens
    ADD COLUMN rate_units   integer,
    ADD COLUMN rate_seconds integer,
    ADD COLUMN rate_burst   integer;
ALTER TABLE api_tokens
    ADD CONSTRAINT api_tokens_rate_limit CHECK (
        (rate_units IS NULL AND rate_seconds IS NULL AND rate_burst IS NULL)
        OR (rate_units > 0 AND rate_seconds > 0 AND rate_burst > 0)
    );

-- One GCRA bucket per token, shared by every process on every host: `tat_us` is the bucket's
-- theoretical arrival time, microseconds since the Unix epoch by the database's clock. Processes lease
-- units from it now and then (app/limiter.py), never per request. Distributed by desk_id, colocated
-- with the desk's other tables (docs/scaling.md).
CREATE TABLE rate_limit_buckets (
    desk_id   bigint NOT NULL,
    token_id  bigint NOT NULL,
    tat_us    bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (desk_id, token_id),
    FOREIGN KEY (desk_id, token_id) REFERENCES api_tokens (desk_id, token_id)
);
INSERT INTO rate_limit_buckets (desk_id, token_id) SELECT desk_id, token_id FROM api_tokens;

-- On Citus (docs/scaling.md), distribute the new table beside the desk's other rows, once the
-- desk's tables are distributed (by the migration before this one); on a plain PostgreSQL, nothing.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus') THEN
        -- A separate IF: pg_dist_partition exists only with Citus, and one condition is planned whole.
        IF EXISTS (SELECT 1 FROM pg_dist_partition WHERE logicalrelid = 'desk_counters'::regclass) THEN
            PERFORM create_distributed_table('rate_limit_buckets', 'desk_id', colocate_with => 'desk_counters');
        END IF;
    END IF;
END $$;
