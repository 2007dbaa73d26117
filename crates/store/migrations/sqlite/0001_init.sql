-- Users, sessions, metadata snapshots and the durable job queue.

CREATE TABLE users (
    name          TEXT PRIMARY KEY NOT NULL,
    role          TEXT NOT NULL CHECK (role IN ('participant', 'admin')),
    -- argon2id PHC string, or a bcrypt hash imported from htpasswd until the next login
    password_hash TEXT NOT NULL,
    disabled      INTEGER NOT NULL DEFAULT 0 CHECK (disabled IN (0, 1)),
    created_at_ms INTEGER NOT NULL,
    last_login_ms INTEGER
) STRICT;

CREATE TABLE sessions (
    -- sha256 of the token; the token itself is never stored
    token_hash    BLOB PRIMARY KEY NOT NULL,
    user_name     TEXT NOT NULL REFERENCES users (name) ON DELETE CASCADE,
    created_at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL
) STRICT;
CREATE INDEX sessions_by_user ON sessions (user_name);
CREATE INDEX sessions_by_expiry ON sessions (expires_at_ms);

CREATE TABLE meta (
    key           TEXT PRIMARY KEY NOT NULL,
    value         TEXT NOT NULL,
    updated_at_ms INTEGER NOT NULL,
    source        TEXT NOT NULL
) STRICT;

-- No foreign key to users: a removed participant's history stays for the instructor.
CREATE TABLE jobs (
    -- AUTOINCREMENT: seq never goes back, even after the newest rows were deleted
    seq                INTEGER PRIMARY KEY AUTOINCREMENT,
    id                 TEXT NOT NULL UNIQUE,
    user_name          TEXT NOT NULL,
    number             REAL NOT NULL,
    priority           INTEGER,
    prompt             TEXT NOT NULL,
    extra_data         TEXT NOT NULL,
    outputs_to_execute TEXT NOT NULL,
    client_id          TEXT,
    -- extra_data.extra_pnginfo.workflow.id, copied out for /api/jobs?workflow_id=
    workflow_id        TEXT,
    state              TEXT NOT NULL CHECK (state IN
        ('queued', 'dispatched', 'running', 'succeeded', 'failed', 'cancelled', 'interrupted')),
    attempts           INTEGER NOT NULL DEFAULT 0,
    created_at_ms      INTEGER NOT NULL,
    started_at_ms      INTEGER,
    finished_at_ms     INTEGER,
    backend            TEXT,
    error              TEXT,
    outputs            TEXT NOT NULL DEFAULT '{}',
    messages           TEXT NOT NULL DEFAULT '[]',
    meta               TEXT NOT NULL DEFAULT '{}'
) STRICT;
CREATE INDEX jobs_by_user_state ON jobs (user_name, state, seq);
CREATE INDEX jobs_by_state ON jobs (state, seq);
CREATE INDEX jobs_by_user_created ON jobs (user_name, created_at_ms);
