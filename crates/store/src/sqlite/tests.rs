//! SQLite-only behaviour: pragmas, failure injection, visibility across handles.

use super::*;
use crate::conformance::new_job;
use crate::{JobQuery, LimitKind, Store};

fn temp_db() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("comfyume.db");
    (dir, path)
}

#[tokio::test]
async fn pragmas_and_layout() {
    let (_dir, path) = temp_db();
    let s = SqliteStore::open(&path).await.unwrap();
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&s.write)
        .await
        .unwrap();
    assert_eq!(mode, "wal");
    let sync: i64 = sqlx::query_scalar("PRAGMA synchronous")
        .fetch_one(&s.write)
        .await
        .unwrap();
    assert_eq!(sync, 1, "NORMAL");
    let fk: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
        .fetch_one(&s.write)
        .await
        .unwrap();
    assert_eq!(fk, 1);
    let busy: i64 = sqlx::query_scalar("PRAGMA busy_timeout")
        .fetch_one(&s.write)
        .await
        .unwrap();
    assert_eq!(busy, 4000);
    // SQLite gives up on a lock before a call times out (see `transition`).
    assert!(s.lock_wait_bounded);
    // Readers cannot write.
    let err = sqlx::query("INSERT INTO meta VALUES ('k', 'v', 0, 's')")
        .execute(&s.read)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("readonly"), "{err}");
    // The indexes the queue's queries rely on.
    let idx: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'jobs'",
    )
    .fetch_all(&s.read)
    .await
    .unwrap();
    for want in ["jobs_by_user_state", "jobs_by_state"] {
        assert!(idx.iter().any(|i| i == want), "{idx:?}");
    }
    let plan: Vec<String> = sqlx::query(
        "EXPLAIN QUERY PLAN SELECT COUNT(*) FROM jobs \
         WHERE user_name = 'u' AND state IN ('queued', 'dispatched')",
    )
    .fetch_all(&s.read)
    .await
    .unwrap()
    .iter()
    .map(|r| r.get::<String, _>("detail"))
    .collect();
    assert!(
        plan.iter().any(|d| d.contains("jobs_by_user_state")),
        "{plan:?}"
    );

    let full = SqliteStore::open_with(
        &path,
        SqliteOptions {
            synchronous: Synchronous::Full,
            ..SqliteOptions::default()
        },
    )
    .await
    .unwrap();
    let sync: i64 = sqlx::query_scalar("PRAGMA synchronous")
        .fetch_one(&full.write)
        .await
        .unwrap();
    assert_eq!(sync, 2, "FULL");
}

/// A job is in the file when enqueue returns: a second, independent handle sees it at once.
#[tokio::test]
async fn committed_before_return() {
    let (_dir, path) = temp_db();
    let a = SqliteStore::open(&path).await.unwrap();
    let b = SqliteStore::open(&path).await.unwrap();
    for i in 0..5 {
        let id = format!("j{i}");
        let r = a
            .enqueue(new_job(&id, "u"), EnqueueLimits::default())
            .await
            .unwrap();
        assert_eq!(b.get_job(&id).await.unwrap(), Some(r));
    }
    // Both handles write without "database is locked".
    b.enqueue(new_job("from-b", "u"), EnqueueLimits::default())
        .await
        .unwrap();
    a.enqueue(new_job("from-a", "u"), EnqueueLimits::default())
        .await
        .unwrap();
    assert_eq!(a.count_jobs(None, &[]).await.unwrap(), 7);
}

async fn cap_pages(s: &SqliteStore) {
    let pages: i64 = sqlx::query_scalar("PRAGMA page_count")
        .fetch_one(&s.write)
        .await
        .unwrap();
    // Cannot go below the current size, so the file is full from here on.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "PRAGMA max_page_count = {pages}"
    )))
    .execute(&s.write)
    .await
    .unwrap();
}

fn big(n: usize) -> serde_json::Value {
    serde_json::json!({"1": {"class_type": "Note", "inputs": {"text": "z".repeat(n)}}})
}

/// A full disk answers Unavailable and leaves nothing half-written; the store recovers.
#[tokio::test]
async fn full_disk_is_unavailable_and_atomic() {
    let (_dir, path) = temp_db();
    let s = SqliteStore::open(&path).await.unwrap();
    let store: &dyn Store = &s;
    store
        .create_user("u", "pw", crate::Role::Participant)
        .await
        .unwrap();
    for i in 0..3 {
        store
            .enqueue(new_job(&format!("ok{i}"), "u"), EnqueueLimits::default())
            .await
            .unwrap();
    }
    let before = store.list_jobs(&JobQuery::default()).await.unwrap();

    cap_pages(&s).await;
    let mut j = new_job("too-big", "u");
    j.prompt = big(400_000);
    match store.enqueue(j.clone(), EnqueueLimits::default()).await {
        Err(StoreError::Unavailable(msg)) => assert!(msg.contains("full"), "{msg}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert_eq!(store.get_job("too-big").await.unwrap(), None);
    assert_eq!(store.list_jobs(&JobQuery::default()).await.unwrap(), before);

    // A transition whose patch does not fit changes nothing, not even the state.
    cap_pages(&s).await;
    match store
        .transition(
            "ok1",
            &[JobState::Queued],
            JobState::Succeeded,
            JobPatch {
                attempts_inc: true,
                outputs: Some(big(400_000)),
                ..JobPatch::default()
            },
        )
        .await
    {
        Err(StoreError::Unavailable(_)) => {}
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert_eq!(store.list_jobs(&JobQuery::default()).await.unwrap(), before);

    cap_pages(&s).await;
    assert!(matches!(
        store
            .put_meta("object_info", &"m".repeat(400_000), "x")
            .await,
        Err(StoreError::Unavailable(_))
    ));
    assert_eq!(store.get_meta("object_info").await.unwrap(), None);

    // Room again (the write connection may have been replaced, so set it explicitly).
    sqlx::query("PRAGMA max_page_count = 1073741823")
        .execute(&s.write)
        .await
        .unwrap();
    store.enqueue(j, EnqueueLimits::default()).await.unwrap();
    store
        .transition(
            "ok1",
            &[JobState::Queued],
            JobState::Running,
            JobPatch::default(),
        )
        .await
        .unwrap();
    assert!(store.create_session("u", 1000).await.is_ok());
    assert_eq!(store.count_jobs(None, &[]).await.unwrap(), 4);
}

/// Another process holding the write lock: busy → Unavailable, and a slow call times out →
/// Unavailable; both leave the store usable once the lock is gone.
#[tokio::test]
async fn locked_database_is_unavailable() {
    let (_dir, path) = temp_db();
    {
        let s = SqliteStore::open(&path).await.unwrap();
        s.enqueue(new_job("q", "u"), EnqueueLimits::default())
            .await
            .unwrap();
        s.close().await;
    }
    let short_busy = SqliteStore::open_with(
        &path,
        SqliteOptions {
            busy_timeout: Duration::from_millis(100),
            op_timeout: Duration::from_secs(5),
            ..SqliteOptions::default()
        },
    )
    .await
    .unwrap();
    let short_op = SqliteStore::open_with(
        &path,
        SqliteOptions {
            busy_timeout: Duration::from_secs(30),
            op_timeout: Duration::from_millis(300),
            ..SqliteOptions::default()
        },
    )
    .await
    .unwrap();

    let mut other = <sqlx::SqliteConnection as sqlx::Connection>::connect_with(
        &SqliteConnectOptions::new().filename(&path),
    )
    .await
    .unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut other)
        .await
        .unwrap();

    match short_busy
        .enqueue(new_job("a", "u"), EnqueueLimits::default())
        .await
    {
        Err(StoreError::Unavailable(msg)) => assert!(msg.contains("locked"), "{msg}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    let t0 = std::time::Instant::now();
    match short_op
        .enqueue(new_job("b", "u"), EnqueueLimits::default())
        .await
    {
        Err(StoreError::Unavailable(msg)) => assert!(msg.contains("timed out"), "{msg}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(t0.elapsed() < Duration::from_secs(3));
    // Reads go on while a writer holds the lock (WAL).
    assert_eq!(short_op.count_jobs(None, &[]).await.unwrap(), 1);

    // A transition too, on both paths: one statement when SQLite gives up on the lock
    // first (`short_busy`), BEGIN IMMEDIATE when the call would time out first.
    let claim = |s: &SqliteStore, id: &'static str| {
        let s = s.clone();
        async move {
            s.transition(
                id,
                &[JobState::Queued],
                JobState::Dispatched,
                JobPatch {
                    attempts_inc: true,
                    ..Default::default()
                },
            )
            .await
        }
    };
    match claim(&short_busy, "q").await {
        Err(StoreError::Unavailable(msg)) => assert!(msg.contains("locked"), "{msg}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    let t0 = std::time::Instant::now();
    match claim(&short_op, "q").await {
        Err(StoreError::Unavailable(msg)) => assert!(msg.contains("timed out"), "{msg}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(t0.elapsed() < Duration::from_secs(3));

    sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();
    // Neither refused transition commits once the lock is free.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let q = short_op.get_job("q").await.unwrap().unwrap();
    assert_eq!((q.state, q.attempts), (JobState::Queued, 0));
    assert_eq!(claim(&short_busy, "q").await.unwrap().attempts, 1);
    short_busy
        .enqueue(new_job("a", "u"), EnqueueLimits::default())
        .await
        .unwrap();
    short_op
        .enqueue(new_job("b", "u"), EnqueueLimits::default())
        .await
        .unwrap();
    assert_eq!(short_op.count_jobs(None, &[]).await.unwrap(), 3);
}

#[tokio::test]
async fn in_memory_store_works() {
    let s = SqliteStore::open_in_memory().await.unwrap();
    s.enqueue(new_job("m1", "u"), EnqueueLimits::default())
        .await
        .unwrap();
    s.create_user("u", "pw", crate::Role::Participant)
        .await
        .unwrap();
    assert!(s.verify_password("u", "pw").await.unwrap().is_some());
    assert_eq!(s.unfinished_jobs().await.unwrap().len(), 1);
}

#[tokio::test]
async fn secrets_are_not_stored_in_clear() {
    let (_dir, path) = temp_db();
    let s = SqliteStore::open(&path).await.unwrap();
    s.create_user("u", "very-secret-pw", crate::Role::Participant)
        .await
        .unwrap();
    let token = s.create_session("u", 60_000).await.unwrap();
    let hash: String = sqlx::query_scalar("SELECT password_hash FROM users")
        .fetch_one(&s.read)
        .await
        .unwrap();
    assert!(hash.starts_with("$argon2id$"));
    assert!(!hash.contains("very-secret-pw"));
    let stored: Vec<u8> = sqlx::query_scalar("SELECT token_hash FROM sessions")
        .fetch_one(&s.read)
        .await
        .unwrap();
    assert_eq!(stored.len(), 32);
    assert_ne!(stored, token.as_bytes());
    s.close().await;
    let bytes = std::fs::read(&path).unwrap();
    let text = String::from_utf8_lossy(&bytes);
    assert!(!text.contains("very-secret-pw"));
    assert!(!text.contains(&token));
}

/// SQLite may roll a transaction back by itself (e.g. on some SQLITE_FULL/IOERR); sqlx's own
/// ROLLBACK then fails and would leave the only write connection refusing every BEGIN.
/// Simulated by ending the transaction behind sqlx's back.
#[tokio::test]
async fn write_connection_recovers_from_an_implicit_rollback() {
    let (_dir, path) = temp_db();
    let s = SqliteStore::open(&path).await.unwrap();
    {
        let mut tx = s.begin().await.unwrap();
        sqlx::query("ROLLBACK").execute(&mut *tx).await.unwrap();
        // Dropped here: sqlx's rollback fails.
    }
    for i in 0..3 {
        s.enqueue(new_job(&format!("j{i}"), "u"), EnqueueLimits::default())
            .await
            .unwrap();
    }
    assert_eq!(s.count_jobs(None, &[]).await.unwrap(), 3);
}

async fn counters_match_the_table(s: &SqliteStore) {
    let kept: Vec<(String, i64)> =
        sqlx::query_as("SELECT state, n FROM job_state_counts ORDER BY state")
            .fetch_all(&s.read)
            .await
            .unwrap();
    for (state, n) in kept {
        let real: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM jobs WHERE state = ?")
            .bind(&state)
            .fetch_one(&s.read)
            .await
            .unwrap();
        assert_eq!(n, real, "job_state_counts for {state}");
    }
}

/// The per-state counters the depth limit reads are kept true by every kind of change.
#[tokio::test]
async fn state_counters_follow_every_change() {
    let (_dir, path) = temp_db();
    let s = SqliteStore::open(&path).await.unwrap();
    let store: &dyn Store = &s;
    for i in 0..30 {
        let user = format!("u{}", i % 3);
        store
            .enqueue(new_job(&format!("j{i}"), &user), EnqueueLimits::default())
            .await
            .unwrap();
    }
    counters_match_the_table(&s).await;
    let p = JobPatch::default();
    for i in 0..10 {
        let id = format!("j{i}");
        store
            .transition(&id, &[JobState::Queued], JobState::Dispatched, p.clone())
            .await
            .unwrap();
        if i < 6 {
            store
                .transition(&id, &[JobState::Dispatched], JobState::Running, p.clone())
                .await
                .unwrap();
        }
        if i < 3 {
            store
                .transition(&id, &[JobState::Running], JobState::Succeeded, p.clone())
                .await
                .unwrap();
        }
    }
    // A same-state "transition" and a refused one change nothing.
    let _ = store
        .transition(
            "j9",
            &[JobState::Dispatched],
            JobState::Dispatched,
            p.clone(),
        )
        .await;
    let _ = store
        .transition("j0", &[JobState::Queued], JobState::Running, p.clone())
        .await;
    store
        .delete_queued("u0", &["j12".into(), "j15".into()])
        .await
        .unwrap();
    store.clear_queued("u1").await.unwrap();
    store.delete_history("u0", &["j0".into()]).await.unwrap();
    store.clear_history("u1").await.unwrap();
    counters_match_the_table(&s).await;
    let waiting = store
        .count_jobs(None, &[JobState::Queued, JobState::Dispatched])
        .await
        .unwrap();
    let by_scan = store
        .list_jobs(&JobQuery {
            states: vec![JobState::Queued, JobState::Dispatched],
            ..JobQuery::default()
        })
        .await
        .unwrap()
        .1;
    assert_eq!(waiting, by_scan);
    // And after a reopen (nothing is cached in memory).
    s.close().await;
    let s = SqliteStore::open(&path).await.unwrap();
    counters_match_the_table(&s).await;
}

/// Submissions that share a transaction are judged one by one: a duplicate id or a full
/// per-participant quota refuses only that job, and every other one is committed.
#[tokio::test]
async fn a_shared_commit_refuses_only_the_jobs_that_break_a_rule() {
    let (_dir, path) = temp_db();
    let s = SqliteStore::open(&path).await.unwrap();
    let limits = EnqueueLimits {
        max_queued_per_user: 5,
        max_queue_depth: 0,
    };
    let mut calls = Vec::new();
    for i in 0..40 {
        let s = s.clone();
        // "dup" is submitted four times; user "greedy" asks for 12 slots out of 5.
        let (id, user) = match i {
            0..4 => ("dup".to_string(), "a".to_string()),
            4..16 => (format!("g{i}"), "greedy".to_string()),
            _ => (format!("o{i}"), format!("p{}", i % 6)),
        };
        calls.push(tokio::spawn(async move {
            (id.clone(), s.enqueue(new_job(&id, &user), limits).await)
        }));
    }
    let (mut ok, mut dup, mut quota) = (0, 0, 0);
    for c in calls {
        match c.await.unwrap() {
            (_, Ok(_)) => ok += 1,
            (id, Err(StoreError::AlreadyExists)) => {
                assert_eq!(id, "dup");
                dup += 1
            }
            (id, Err(StoreError::Limit(LimitKind::UserQueued { max: 5 }))) => {
                assert!(id.starts_with('g'), "{id}");
                quota += 1
            }
            (id, other) => panic!("{id}: {other:?}"),
        }
    }
    assert_eq!((dup, quota), (3, 7));
    assert_eq!(ok, 40 - 3 - 7);
    assert_eq!(s.count_jobs(None, &[]).await.unwrap(), ok as u64);
    counters_match_the_table(&s).await;
}

/// Each submission is answered with its owner's unfinished count as committed, whether it
/// was written alone (one statement) or in a shared transaction.
#[tokio::test]
async fn every_submission_hears_its_owners_count_as_committed() {
    let (_dir, path) = temp_db();
    let s = SqliteStore::open(&path).await.unwrap();
    let (_, n) = s
        .enqueue_counted(new_job("first", "a"), EnqueueLimits::default())
        .await
        .unwrap();
    assert_eq!(n, Some(1));
    let mut calls = Vec::new();
    for i in 0..40 {
        let s = s.clone();
        let user = if i % 2 == 0 { "a" } else { "b" };
        calls.push(tokio::spawn(async move {
            let (rec, n) = s
                .enqueue_counted(new_job(&format!("j{i}"), user), EnqueueLimits::default())
                .await
                .unwrap();
            (rec.user, n.unwrap())
        }));
    }
    let mut most = std::collections::HashMap::new();
    for c in calls {
        let (user, n) = c.await.unwrap();
        let m = most.entry(user).or_insert(0);
        *m = n.max(*m);
    }
    // The last commit of each owner counted all of their jobs, none of the other's.
    assert_eq!(most["a"], 21);
    assert_eq!(most["b"], 20);
}

/// A batch that hits a full disk stores none of its jobs and tells every caller.
#[tokio::test]
async fn a_shared_commit_that_fails_stores_none_of_its_jobs() {
    let (_dir, path) = temp_db();
    let s = SqliteStore::open(&path).await.unwrap();
    s.enqueue(new_job("before", "u"), EnqueueLimits::default())
        .await
        .unwrap();
    cap_pages(&s).await;
    let mut calls = Vec::new();
    for i in 0..20 {
        let s = s.clone();
        let mut j = new_job(&format!("b{i}"), "u");
        j.prompt = big(20_000);
        calls.push(tokio::spawn(async move {
            s.enqueue(j, EnqueueLimits::default()).await
        }));
    }
    for c in calls {
        match c.await.unwrap() {
            Err(StoreError::Unavailable(msg)) => assert!(msg.contains("full"), "{msg}"),
            other => panic!("expected Unavailable, got {other:?}"),
        }
    }
    assert_eq!(s.count_jobs(None, &[]).await.unwrap(), 1);
    counters_match_the_table(&s).await;
}

/// Commits never run a checkpoint themselves (it stalled the submission that crossed
/// 1000 pages); the background checkpointer copies the WAL into the database file.
#[tokio::test]
async fn the_wal_is_checkpointed_in_the_background() {
    let (_dir, path) = temp_db();
    let s = SqliteStore::open(&path).await.unwrap();
    let auto: i64 = sqlx::query_scalar("PRAGMA wal_autocheckpoint")
        .fetch_one(&s.write)
        .await
        .unwrap();
    assert_eq!(auto, 0);
    let size = || std::fs::metadata(&path).unwrap().len();
    let before = size();
    for i in 0..50 {
        let mut j = new_job(&format!("w{i}"), "u");
        j.prompt = big(8_000);
        s.enqueue(j, EnqueueLimits::default()).await.unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while size() < before + 300_000 {
        assert!(
            std::time::Instant::now() < deadline,
            "the database file did not grow: nothing was checkpointed ({} -> {})",
            before,
            size()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A session looked up once is served from memory; a change through the same store ends
/// it at once, a change by another process (the CLI) within `RECHECK`.
#[tokio::test]
async fn cached_sessions_end_with_their_account() {
    let (_dir, path) = temp_db();
    let server = SqliteStore::open(&path).await.unwrap();
    let cli = SqliteStore::open(&path).await.unwrap();
    server
        .create_user("ann", "pw", crate::Role::Participant)
        .await
        .unwrap();
    let token = server.create_session("ann", 3_600_000).await.unwrap();
    assert!(server.session_user(&token).await.unwrap().is_some());

    // Another process disables the account: seen within RECHECK, not later.
    cli.set_disabled("ann", true).await.unwrap();
    let t0 = std::time::Instant::now();
    while server.session_user(&token).await.unwrap().is_some() {
        assert!(
            t0.elapsed() < crate::session_cache::RECHECK + Duration::from_millis(500),
            "a disabled account kept its session"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Through the same store: at once, both ways.
    server.set_disabled("ann", false).await.unwrap();
    assert!(server.session_user(&token).await.unwrap().is_some());
    server.set_disabled("ann", true).await.unwrap();
    assert!(server.session_user(&token).await.unwrap().is_none());
    server.set_disabled("ann", false).await.unwrap();
    assert!(server.session_user(&token).await.unwrap().is_some());
    server.delete_session(&token).await.unwrap();
    assert!(server.session_user(&token).await.unwrap().is_none());
}

/// A file system of its own, filled up: `mount -t tmpfs` (root only; `None` elsewhere).
struct SmallDisk(tempfile::TempDir);

impl SmallDisk {
    fn mount(mib: u64) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .output()
            .is_ok_and(|o| o.status.success());
        ok.then_some(SmallDisk(dir))
    }

    /// Writes zeros until the disk refuses; the filler file's path.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let path = self.0.path().join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let block = vec![0u8; 64 * 1024];
        while f.write_all(&block).is_ok() {}
        // The last pages: a block at a time fails before a byte at a time does.
        while f.write_all(&[0]).is_ok() {}
        let _ = f.flush();
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.path())
            .status();
    }
}

/// The data disk full when a write commits: the one-statement submission and transition (no
/// BEGIN ... COMMIT, so the commit is at the statement's last step) answer Unavailable and
/// store nothing, as a transaction's failed COMMIT does. (A statement stopped after its first
/// row would commit when reset, where the failure is not reported: the job was acknowledged
/// but lost.)
#[tokio::test]
async fn a_commit_on_a_full_disk_is_refused_not_lost() {
    let Some(disk) = SmallDisk::mount(4) else {
        eprintln!("SKIPPED: mount -t tmpfs is not permitted here");
        return;
    };
    let path = disk.0.path().join("comfyume.db");
    let s = SqliteStore::open(&path).await.unwrap();
    assert!(
        s.lock_wait_bounded,
        "the one-statement paths are under test"
    );
    s.enqueue(new_job("before", "u"), EnqueueLimits::default())
        .await
        .unwrap();
    let filler = disk.fill();
    let mut refused = 0;
    for i in 0..20 {
        let mut j = new_job(&format!("full{i}"), "u");
        j.prompt = big(20_000);
        match s.enqueue(j, EnqueueLimits::default()).await {
            Err(StoreError::Unavailable(_)) => refused += 1,
            Err(e) => panic!("full{i}: {e:?}"),
            // Fitted in space SQLite already had; it must be there.
            Ok(r) => assert!(s.get_job(&r.id).await.unwrap().is_some()),
        }
    }
    assert!(refused > 0, "the disk never filled");
    let moved = s
        .transition(
            "before",
            &[JobState::Queued],
            JobState::Succeeded,
            JobPatch {
                outputs: Some(big(200_000)),
                ..JobPatch::default()
            },
        )
        .await;
    assert!(
        matches!(moved, Err(StoreError::Unavailable(_))),
        "{moved:?}"
    );
    std::fs::remove_file(filler).unwrap();
    let before = s.get_job("before").await.unwrap().unwrap();
    assert_eq!(before.state, JobState::Queued);
    let stored = s.count_jobs(None, &[]).await.unwrap();
    assert_eq!(stored, 1 + 20 - refused, "every acknowledged job, no other");
    s.enqueue(new_job("after", "u"), EnqueueLimits::default())
        .await
        .unwrap();
    s.close().await;
    // And what the file holds after a restart.
    let s = SqliteStore::open(&path).await.unwrap();
    assert_eq!(s.count_jobs(None, &[]).await.unwrap(), stored + 1);
    s.close().await;
}

/// A row whose prompt is not JSON (a damaged file, a hand edit) is an error for the pages
/// that parse it and for the one that writes its text out unparsed alike: never broken JSON
/// on to a participant's browser.
#[tokio::test]
async fn a_corrupt_prompt_is_an_error_in_either_page() {
    let (_dir, path) = temp_db();
    let s = SqliteStore::open(&path).await.unwrap();
    s.enqueue(new_job("ok", "u1"), EnqueueLimits::default())
        .await
        .unwrap();
    assert_eq!(
        s.list_jobs_text(&JobQuery::default()).await.unwrap().len(),
        1
    );
    sqlx::query("UPDATE jobs SET prompt = '{\"3\": ' WHERE id = 'ok'")
        .execute(&s.write)
        .await
        .unwrap();
    for err in [
        s.list_jobs(&JobQuery::default()).await.unwrap_err(),
        s.list_jobs_text(&JobQuery::default()).await.unwrap_err(),
    ] {
        assert!(err.to_string().contains("prompt"), "{err}");
    }
}
