-- The instructor's actions (who, what, when, on what), kept for the dashboard's audit log
-- and for scripts (GET /admin/api/audit). Append-only; seq orders them.
CREATE TABLE audit_log (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms    INTEGER NOT NULL,
    actor    TEXT NOT NULL,
    action   TEXT NOT NULL,
    target   TEXT,
    -- JSON object: the action's parameters and outcome (never a password or a key)
    detail   TEXT NOT NULL DEFAULT '{}'
) STRICT;

-- The dashboard's "latest results": finished jobs of one state, newest first.
CREATE INDEX jobs_by_state_finished ON jobs (state, finished_at_ms);
