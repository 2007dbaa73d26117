-- How many jobs are in each state, kept by triggers in the same transaction as the change,
-- so MAX_QUEUE_DEPTH is checked with one row read instead of counting the queue (a scan of
-- 10,000 index entries per submission at that depth).
CREATE TABLE job_state_counts (
    state TEXT PRIMARY KEY,
    n     INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

INSERT INTO job_state_counts (state, n)
SELECT s.value, (SELECT COUNT(*) FROM jobs WHERE jobs.state = s.value)
FROM json_each('["queued","dispatched","running","succeeded","failed","cancelled","interrupted"]') AS s;

CREATE TRIGGER jobs_count_insert AFTER INSERT ON jobs BEGIN
    UPDATE job_state_counts SET n = n + 1 WHERE state = NEW.state;
END;

CREATE TRIGGER jobs_count_update AFTER UPDATE OF state ON jobs
WHEN OLD.state IS NOT NEW.state BEGIN
    UPDATE job_state_counts SET n = n - 1 WHERE state = OLD.state;
    UPDATE job_state_counts SET n = n + 1 WHERE state = NEW.state;
END;

CREATE TRIGGER jobs_count_delete AFTER DELETE ON jobs BEGIN
    UPDATE job_state_counts SET n = n - 1 WHERE state = OLD.state;
END;
