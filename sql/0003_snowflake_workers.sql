-- Snowflake worker numbers and the milliseconds each holder reserved (see app/ids.py).
-- A process leases a number with a session advisory lock and, before it generates any id, records
-- here how far its ids may go (reserved_until, milliseconds since 2015-01-01 UTC, the ids' own epoch).
-- A later holder of the number starts after that, so ids stay unique even when a lease is lost while
-- its process still runs. One row per number; the rows never change in number.
CREATE TABLE snowflake_workers (
    worker          smallint PRIMARY KEY CHECK (worker BETWEEN 0 AND 1023),
    reserved_until  bigint NOT NULL DEFAULT 0,
    holder          uuid
);
INSERT INTO snowflake_workers (worker) SELECT generate_series(0, 1023);
