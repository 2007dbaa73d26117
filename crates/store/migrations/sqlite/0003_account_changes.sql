-- Changes to who may sign in (a new password, disabled, enabled, removed), numbered in the
-- order they happened. A running server reads the ones after the last it saw, so what the
-- CLI (another process) changed takes effect there too: it closes that account's sockets,
-- forgets cached credentials and stops a disabled participant's jobs.
CREATE TABLE account_changes (
    seq       INTEGER PRIMARY KEY AUTOINCREMENT,
    user_name TEXT NOT NULL,
    kind      TEXT NOT NULL CHECK (kind IN ('password', 'disabled', 'enabled', 'removed')),
    at_ms     INTEGER NOT NULL
) STRICT;
CREATE INDEX account_changes_by_user ON account_changes (user_name, seq);
