-- Headoni schema, first migration.
-- Every table carries desk_id, and every primary, unique and foreign key of a desk's data includes it,
-- so the tables can be distributed by desk_id (Citus) without a redesign. `desks` itself is the
-- directory of desks (a reference table when distributed): its keys are desk_id and the subdomain.

CREATE TABLE desks (
    desk_id     bigint PRIMARY KEY,
    subdomain   text NOT NULL UNIQUE
                CHECK (subdomain ~ '^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$'),
    name        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- The desk's ticket counter lives apart from the directory row, so bumping it touches a desk-keyed
-- table only (colocated with the tickets when distributed).
CREATE TABLE desk_counters (
    desk_id      bigint PRIMARY KEY REFERENCES desks (desk_id),
    last_number  bigint NOT NULL DEFAULT 0
);

CREATE TABLE departments (
    desk_id        bigint NOT NULL REFERENCES desks (desk_id),
    department_id  bigint NOT NULL,
    name           text NOT NULL CHECK (name <> ''),
    public         boolean NOT NULL DEFAULT true,
    is_default     boolean NOT NULL DEFAULT false,
    deleted_at     timestamptz,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (desk_id, department_id),
    CHECK (NOT (is_default AND deleted_at IS NOT NULL))
);
CREATE UNIQUE INDEX departments_one_default ON departments (desk_id) WHERE is_default;

CREATE TABLE ticket_types (
    desk_id         bigint NOT NULL REFERENCES desks (desk_id),
    ticket_type_id  bigint NOT NULL,
    name            text NOT NULL CHECK (name <> ''),
    is_default      boolean NOT NULL DEFAULT false,
    archived_at     timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (desk_id, ticket_type_id),
    CHECK (NOT (is_default AND archived_at IS NOT NULL))
);
CREATE UNIQUE INDEX ticket_types_one_default ON ticket_types (desk_id) WHERE is_default;

CREATE TABLE api_tokens (
    desk_id        bigint NOT NULL REFERENCES desks (desk_id),
    token_id       bigint NOT NULL,
    name           text NOT NULL CHECK (name <> ''),
    scopes         text[] NOT NULL,
    secret_sha256  bytea NOT NULL CHECK (length(secret_sha256) = 32),
    revoked_at     timestamptz,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (desk_id, token_id)
);
-- Looked up by digest before the desk is known; 256-bit digests of random secrets do not collide.
CREATE INDEX api_tokens_by_digest ON api_tokens (secret_sha256);

CREATE TABLE users (
    desk_id     bigint NOT NULL REFERENCES desks (desk_id),
    user_id     bigint NOT NULL,
    email       text NOT NULL,
    name        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (desk_id, user_id),
    UNIQUE (desk_id, email)
);

CREATE TABLE tickets (
    desk_id         bigint NOT NULL,
    ticket_id       bigint NOT NULL,
    number          bigint NOT NULL CHECK (number > 0),
    subject         text NOT NULL,
    priority        text NOT NULL CHECK (priority IN ('low', 'normal', 'high', 'urgent')),
    status          text NOT NULL DEFAULT 'open',
    channel         text NOT NULL,
    requester_id    bigint NOT NULL,
    department_id   bigint NOT NULL,
    ticket_type_id  bigint NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (desk_id, ticket_id),
    UNIQUE (desk_id, number),
    FOREIGN KEY (desk_id, requester_id) REFERENCES users (desk_id, user_id),
    FOREIGN KEY (desk_id, department_id) REFERENCES departments (desk_id, department_id),
    FOREIGN KEY (desk_id, ticket_type_id) REFERENCES ticket_types (desk_id, ticket_type_id)
);

CREATE TABLE messages (
    desk_id     bigint NOT NULL,
    message_id  bigint NOT NULL,
    ticket_id   bigint NOT NULL,
    author_id   bigint NOT NULL,
    body        text NOT NULL,
    public      boolean NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (desk_id, message_id),
    FOREIGN KEY (desk_id, ticket_id) REFERENCES tickets (desk_id, ticket_id),
    FOREIGN KEY (desk_id, author_id) REFERENCES users (desk_id, user_id)
);
CREATE INDEX messages_by_ticket ON messages (desk_id, ticket_id);

CREATE TABLE ticket_events (
    desk_id     bigint NOT NULL,
    event_id    bigint NOT NULL,
    ticket_id   bigint NOT NULL,
    kind        text NOT NULL,
    channel     text NOT NULL,
    token_id    bigint,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (desk_id, event_id),
    FOREIGN KEY (desk_id, ticket_id) REFERENCES tickets (desk_id, ticket_id),
    FOREIGN KEY (desk_id, token_id) REFERENCES api_tokens (desk_id, token_id)
);
CREATE INDEX ticket_events_by_ticket ON ticket_events (desk_id, ticket_id);

-- Whole addresses ('bob@spam.example') or exact domains ('spam.example'), stored lowercased.
CREATE TABLE blocklist_entries (
    desk_id     bigint NOT NULL REFERENCES desks (desk_id),
    entry       text NOT NULL CHECK (entry = lower(entry) AND entry <> ''),
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (desk_id, entry)
);
