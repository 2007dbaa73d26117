//! The embedded SQLite backend (the default).
//!
//! Layout: one write connection (every write is a `BEGIN IMMEDIATE` transaction on it, so
//! writers queue in the pool instead of failing with "database is locked") and a small pool of
//! read connections that see each committed write at once (WAL).
//!
//! Durability: the database runs in WAL mode. With the default [`Synchronous::Normal`] a
//! transaction is in the WAL (handed to the OS) when `COMMIT` returns, so it survives a crash or
//! kill of this process; SQLite documents that a *power loss or OS crash* may roll back the last
//! transactions before the next checkpoint (the database itself is never corrupted). Choose
//! [`Synchronous::Full`] to fsync the WAL at every commit and survive power loss too, at the
//! cost of one fsync per write.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sha2::{Digest, Sha256};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Connection, QueryBuilder, Row, Sqlite};

use crate::password::{self, Hasher, Verified};
use crate::session_cache::SessionCache;
use crate::{
    AccountChange, AccountChangeKind, AuditEntry, AuditStore, EnqueueLimits, JobOrder, JobPatch,
    JobQuery, JobRecord, JobState, JobStore, JobSummary, JobWithText, MetaEntry, MetaStore,
    NewAudit, NewJob, PasswordScheme, Role, StoreError, SummaryOrder, SummaryQuery, User,
    UserJobStats, UserStore, now_ms, valid_user_name,
};

mod enqueue;
#[cfg(test)]
mod tests;

/// How hard each commit is pushed to disk (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Synchronous {
    /// Durable against a crash of this process; a power loss may lose the latest commits.
    #[default]
    Normal,
    /// fsync at every commit: durable against power loss as well.
    Full,
}

/// Tuning for [`SqliteStore::open_with`].
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// How long SQLite itself waits for a lock held by another process.
    pub busy_timeout: Duration,
    /// Upper bound on every store call (waiting for a connection included); past it the call
    /// fails with [`StoreError::Unavailable`].
    pub op_timeout: Duration,
    pub synchronous: Synchronous,
    pub read_connections: u32,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            // Shorter than `op_timeout`: a write that waits for another process's lock is
            // refused by SQLite before its caller gives up, so it never commits later (see
            // `SqliteStore::transition`).
            busy_timeout: Duration::from_secs(4),
            op_timeout: Duration::from_secs(5),
            synchronous: Synchronous::Normal,
            read_connections: 4,
        }
    }
}

/// The SQLite implementation of [`crate::Store`].
#[derive(Debug, Clone)]
pub struct SqliteStore {
    write: SqlitePool,
    read: SqlitePool,
    /// Runs the WAL checkpoints (see [`start_checkpointer`]); `None` in memory.
    checkpoint: Option<SqlitePool>,
    /// Background tasks stop once every clone of the store is gone.
    _alive: std::sync::Arc<()>,
    op_timeout: Duration,
    /// SQLite stops waiting for a lock before a call times out (`busy_timeout <
    /// op_timeout`): a one-statement write may then run without `BEGIN IMMEDIATE`.
    lock_wait_bounded: bool,
    hasher: Hasher,
    enqueuer: enqueue::Enqueuer,
    sessions: std::sync::Arc<SessionCache>,
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

impl SqliteStore {
    /// Opens (creating if missing) the database file and applies pending migrations.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with(path, SqliteOptions::default()).await
    }

    pub async fn open_with(path: &Path, opts: SqliteOptions) -> Result<Self, StoreError> {
        let base = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .foreign_keys(true)
            .busy_timeout(opts.busy_timeout)
            .synchronous(match opts.synchronous {
                Synchronous::Normal => SqliteSynchronous::Normal,
                Synchronous::Full => SqliteSynchronous::Full,
            });
        let write = pool_options(1, opts.op_timeout)
            .connect_with(
                base.clone()
                    .journal_mode(SqliteJournalMode::Wal)
                    .pragma("wal_autocheckpoint", "0"),
            )
            .await
            .db()?;
        MIGRATOR.run(&write).await.map_err(migrate_error)?;
        // Opened after the migrations so the file is already in WAL mode; query_only guards
        // against a write slipping onto a reader and racing the write connection.
        let read = pool_options(opts.read_connections.max(1), opts.op_timeout)
            .connect_with(base.clone().pragma("query_only", "ON"))
            .await
            .db()?;
        let checkpoint = pool_options(1, opts.op_timeout)
            .connect_with(base)
            .await
            .db()?;
        let alive = std::sync::Arc::new(());
        let lock_wait_bounded = opts.busy_timeout < opts.op_timeout;
        start_checkpointer(checkpoint.clone(), std::sync::Arc::downgrade(&alive));
        tracing::debug!(path = %path.display(), "sqlite store open");
        Ok(SqliteStore {
            enqueuer: enqueue::Enqueuer::start(write.clone(), opts.op_timeout, lock_wait_bounded),
            write,
            read,
            checkpoint: Some(checkpoint),
            _alive: alive,
            op_timeout: opts.op_timeout,
            lock_wait_bounded,
            hasher: Hasher::new(),
            sessions: Default::default(),
        })
    }

    /// A private in-memory database (tests, demos). Reads and writes share one connection,
    /// which must never be recycled or the data would vanish.
    pub async fn open_in_memory() -> Result<Self, StoreError> {
        let opts = SqliteOptions::default();
        let conn = SqliteConnectOptions::from_str("sqlite::memory:")
            .db()?
            .foreign_keys(true);
        let pool = pool_options(1, opts.op_timeout)
            .min_connections(1)
            .connect_with(conn)
            .await
            .db()?;
        MIGRATOR.run(&pool).await.map_err(migrate_error)?;
        Ok(SqliteStore {
            // Nothing else can lock a private in-memory database.
            enqueuer: enqueue::Enqueuer::start(pool.clone(), opts.op_timeout, true),
            write: pool.clone(),
            read: pool,
            checkpoint: None,
            _alive: std::sync::Arc::new(()),
            op_timeout: opts.op_timeout,
            lock_wait_bounded: true,
            hasher: Hasher::new(),
            sessions: Default::default(),
        })
    }

    /// Waits for running calls and closes every connection (checkpointing the WAL).
    pub async fn close(&self) {
        if let Some(c) = &self.checkpoint {
            c.close().await;
        }
        self.read.close().await;
        // Last: closing the last connection checkpoints the WAL into the database file.
        self.write.close().await;
    }

    /// Runs `fut` with the per-call timeout.
    async fn timed<T>(
        &self,
        what: &'static str,
        fut: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let started = std::time::Instant::now();
        let res = match tokio::time::timeout(self.op_timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Unavailable(format!(
                "{what} timed out after {} ms",
                self.op_timeout.as_millis()
            ))),
        };
        crate::telemetry::record(what, started.elapsed(), &res);
        res
    }

    /// [`Self::timed`] for a change to accounts or sessions: cached session lookups are
    /// dropped after it, whatever its outcome.
    async fn account_change<T>(
        &self,
        what: &'static str,
        fut: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let r = self.timed(what, fut).await;
        self.sessions.invalidate();
        r
    }

    async fn begin(&self) -> Result<sqlx::Transaction<'static, Sqlite>, StoreError> {
        self.write.begin_with("BEGIN IMMEDIATE").await.db()
    }

    /// Numbers a change to who may sign in, in the transaction that makes it (see
    /// [`UserStore::account_changes`]); forgets entries nobody polls any more.
    async fn record_change(
        tx: &mut sqlx::Transaction<'static, Sqlite>,
        user: &str,
        kind: AccountChangeKind,
    ) -> Result<(), StoreError> {
        let now = now_ms();
        sqlx::query("INSERT INTO account_changes (user_name, kind, at_ms) VALUES (?, ?, ?)")
            .bind(user)
            .bind(kind.as_str())
            .bind(now)
            .execute(&mut **tx)
            .await
            .db()?;
        sqlx::query("DELETE FROM account_changes WHERE at_ms < ?")
            .bind(now.saturating_sub(ACCOUNT_CHANGES_KEPT_MS))
            .execute(&mut **tx)
            .await
            .db()?;
        Ok(())
    }

    async fn user_row(&self, name: &str) -> Result<Option<(User, String)>, StoreError> {
        let row = sqlx::query(
            "SELECT name, role, disabled, created_at_ms, last_login_ms, password_hash \
             FROM users WHERE name = ?",
        )
        .bind(name)
        .fetch_optional(&self.read)
        .await
        .db()?;
        row.map(|r| Ok((user_from_row(&r)?, r.try_get("password_hash").db()?)))
            .transpose()
    }

    async fn insert_user(
        &self,
        name: &str,
        hash: &str,
        role: Role,
        what: &'static str,
    ) -> Result<User, StoreError> {
        let now = now_ms();
        self.timed(what, async {
            // One statement, so the case-insensitive check and the insert are atomic:
            // `USER001` beside `user001` would be two workspaces a person cannot tell apart.
            let n = sqlx::query(
                "INSERT INTO users (name, role, password_hash, disabled, created_at_ms) \
                 SELECT ?1, ?2, ?3, 0, ?4 \
                 WHERE NOT EXISTS (SELECT 1 FROM users WHERE name = ?1 COLLATE NOCASE)",
            )
            .bind(name)
            .bind(role.as_str())
            .bind(hash)
            .bind(now)
            .execute(&self.write)
            .await
            .db()?
            .rows_affected();
            if n == 0 {
                return Err(StoreError::AlreadyExists);
            }
            Ok(())
        })
        .await?;
        Ok(User {
            name: name.to_owned(),
            role,
            disabled: false,
            created_at_ms: now,
            last_login_ms: None,
        })
    }

    /// No account of that name in any letter case.
    async fn ensure_user_absent(&self, name: &str) -> Result<(), StoreError> {
        let taken: Option<i64> = self
            .timed("user_exists", async {
                sqlx::query_scalar("SELECT 1 FROM users WHERE name = ? COLLATE NOCASE LIMIT 1")
                    .bind(name)
                    .fetch_optional(&self.read)
                    .await
                    .db()
            })
            .await?;
        if taken.is_some() {
            return Err(StoreError::AlreadyExists);
        }
        Ok(())
    }

    /// Moves that user's queued jobs (all, or those whose prompt_ids are among `ids`) to
    /// cancelled; answers (seq, internal id, prompt_id) of each.
    async fn cancel_queued(
        &self,
        user: &str,
        ids: Option<&[String]>,
    ) -> Result<Vec<Cancelled>, StoreError> {
        let now = now_ms();
        let mut tx = self.begin().await?;
        let mut cancelled = Vec::new();
        let chunks: Vec<&[String]> = match ids {
            Some(ids) => ids.chunks(ID_CHUNK).collect(),
            None => vec![&[]],
        };
        for chunk in chunks {
            let mut qb = QueryBuilder::<Sqlite>::new("UPDATE jobs SET state = 'cancelled', ");
            qb.push("finished_at_ms = ")
                .push_bind(now)
                .push(" WHERE state = 'queued' AND user_name = ")
                .push_bind(user);
            if ids.is_some() {
                push_id_list(&mut qb, chunk);
            }
            qb.push(" RETURNING seq, id, prompt_id");
            for r in qb.build().fetch_all(&mut *tx).await.db()? {
                cancelled.push((
                    r.try_get("seq").db()?,
                    r.try_get("id").db()?,
                    r.try_get::<Option<String>, _>("prompt_id").db()?,
                ));
            }
        }
        tx.commit().await.db()?;
        Ok(cancelled)
    }

    async fn delete_finished(&self, user: &str, ids: Option<&[String]>) -> Result<u64, StoreError> {
        let mut tx = self.begin().await?;
        let mut n = 0;
        let chunks: Vec<&[String]> = match ids {
            Some(ids) => ids.chunks(ID_CHUNK).collect(),
            None => vec![&[]],
        };
        for chunk in chunks {
            let mut qb = QueryBuilder::<Sqlite>::new("DELETE FROM jobs WHERE user_name = ");
            qb.push_bind(user);
            push_state_list(&mut qb, &JobState::FINISHED);
            if ids.is_some() {
                push_id_list(&mut qb, chunk);
            }
            n += qb.build().execute(&mut *tx).await.db()?.rows_affected();
        }
        tx.commit().await.db()?;
        Ok(n)
    }
}

/// A job [`SqliteStore::cancel_queued`] cancelled: (seq, internal id, prompt_id).
type Cancelled = (i64, String, Option<String>);

/// Keeps each `IN (...)` well under SQLite's bound-parameter limit.
const ID_CHUNK: usize = 500;

/// How long account changes are kept for pollers (a server notices them within seconds).
const ACCOUNT_CHANGES_KEPT_MS: i64 = 30 * 24 * 3600 * 1000;

/// How often the WAL is copied back into the database file. Each checkpoint fsyncs, and
/// submissions arriving meanwhile wait longer: every 250 ms gave a p99 of 4.1-5.5 ms at 4 in
/// flight, every second 3.1-3.4 ms, every 3 s 2.8 ms (a bigger WAL between checkpoints).
const CHECKPOINT_EVERY: Duration = Duration::from_millis(1000);

/// Checkpoints the WAL from a connection of its own, off the write path. SQLite's automatic
/// checkpoint (turned off on the write connection) runs inside whichever COMMIT takes the
/// WAL past 1000 pages and fsyncs there: the submissions waiting on that commit took
/// 10-20 ms instead of 1-2 (the p99 of `comfyume-bench submit`). A PASSIVE checkpoint
/// never blocks the writer or the readers; what it cannot copy yet, the next one does.
fn start_checkpointer(pool: SqlitePool, alive: std::sync::Weak<()>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tick.tick().await;
            if alive.strong_count() == 0 || pool.is_closed() {
                break;
            }
            let r: Result<(i64, i64, i64), _> = sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
                .fetch_one(&pool)
                .await;
            match r {
                Ok(_) if failing => {
                    tracing::info!("WAL checkpoints work again");
                    failing = false;
                }
                Ok(_) => {}
                Err(_) if pool.is_closed() => break,
                Err(e) => {
                    // Logged once per failing stretch; the WAL only grows meanwhile.
                    if !failing {
                        tracing::warn!(error = %e, "WAL checkpoint failed; retrying");
                    }
                    failing = true;
                }
            }
        }
        pool.close().await;
    });
}

fn pool_options(max: u32, acquire_timeout: Duration) -> SqlitePoolOptions {
    SqlitePoolOptions::new()
        .max_connections(max)
        .acquire_timeout(acquire_timeout)
        .idle_timeout(None)
        .max_lifetime(None)
        // sqlx pings every connection it hands out, a round trip to the connection's worker
        // thread before each call (on a busy machine, a wait for a core each time). A SQLite
        // connection is a file in this process: nothing can hang up on it. A broken one
        // fails its statement instead, and `after_release` drops one left in a transaction.
        .test_before_acquire(false)
        .after_release(|conn, _| {
            Box::pin(async move {
                // After SQLITE_FULL/IOERR SQLite may have rolled the transaction back itself;
                // sqlx's ROLLBACK then fails and the connection would stay marked as inside a
                // transaction, refusing every later BEGIN. The ping runs after any pending
                // ROLLBACK; a connection still marked is closed and the pool opens a new one.
                // A connection not marked has nothing pending (its worker clears the mark when
                // it runs the COMMIT or ROLLBACK): no ping, which would cost a round trip to
                // the worker thread on every release.
                if !conn.is_in_transaction() {
                    return Ok(true);
                }
                conn.ping().await?;
                Ok(!conn.is_in_transaction())
            })
        })
}

/// The row a one-statement write returns, outside a transaction, read to its end: SQLite
/// commits such a statement at its last step, and only there does a failed commit (a full
/// disk) show as an error; sqlx's `fetch_optional` and `fetch_one` stop after the first row
/// and the failure is lost (docs/RELIABILITY.md R5).
async fn write_returning<'q, 'c, E>(
    q: sqlx::query::Query<'q, Sqlite, <Sqlite as sqlx::Database>::Arguments>,
    conn: E,
) -> Result<Option<sqlx::sqlite::SqliteRow>, StoreError>
where
    E: sqlx::Executor<'c, Database = Sqlite> + 'q,
    'c: 'q,
{
    Ok(q.fetch_all(conn).await.db()?.into_iter().next())
}

/// A job's state, if the job exists.
async fn state_of(
    conn: &mut sqlx::SqliteConnection,
    id: &str,
) -> Result<Option<String>, StoreError> {
    sqlx::query_scalar("SELECT state FROM jobs WHERE id = ?")
        .bind(id)
        .fetch_optional(conn)
        .await
        .db()
}

/// ` AND prompt_id IN (...)`: the ids a participant names their jobs by.
fn push_id_list(qb: &mut QueryBuilder<Sqlite>, ids: &[String]) {
    qb.push(" AND prompt_id IN (");
    let mut sep = qb.separated(", ");
    for id in ids {
        sep.push_bind(id.clone());
    }
    qb.push(")");
}

fn push_state_list(qb: &mut QueryBuilder<Sqlite>, states: &[JobState]) {
    qb.push(" AND state IN (");
    let mut sep = qb.separated(", ");
    for s in states {
        sep.push_bind(s.as_str());
    }
    qb.push(")");
}

/// Turns sqlx errors into [`StoreError`]s at every call site.
trait Db<T> {
    fn db(self) -> Result<T, StoreError>;
}

impl<T> Db<T> for Result<T, sqlx::Error> {
    fn db(self) -> Result<T, StoreError> {
        self.map_err(map_sqlx)
    }
}

// Primary result codes (the low byte of extended codes) that mean "try again later".
const SQLITE_BUSY: i64 = 5;
const SQLITE_LOCKED: i64 = 6;
const SQLITE_NOMEM: i64 = 7;
const SQLITE_READONLY: i64 = 8;
const SQLITE_INTERRUPT: i64 = 9;
const SQLITE_IOERR: i64 = 10;
const SQLITE_FULL: i64 = 13;
const SQLITE_CANTOPEN: i64 = 14;
const SQLITE_PROTOCOL: i64 = 15;

fn map_sqlx(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Database(d) => {
            if d.is_unique_violation() {
                return StoreError::AlreadyExists;
            }
            let code = d.code().and_then(|c| c.parse::<i64>().ok()).unwrap_or(0) & 0xff;
            match code {
                SQLITE_BUSY | SQLITE_LOCKED | SQLITE_NOMEM | SQLITE_READONLY | SQLITE_INTERRUPT
                | SQLITE_IOERR | SQLITE_FULL | SQLITE_CANTOPEN | SQLITE_PROTOCOL => {
                    StoreError::Unavailable(d.message().to_owned())
                }
                _ => StoreError::Other(format!("database error: {}", d.message())),
            }
        }
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => StoreError::Unavailable(e.to_string()),
        _ => StoreError::Other(e.to_string()),
    }
}

fn migrate_error(e: sqlx::migrate::MigrateError) -> StoreError {
    match e {
        sqlx::migrate::MigrateError::Execute(e) => map_sqlx(e),
        other => StoreError::Other(format!("migration failed: {other}")),
    }
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Other(format!("corrupt row: {what}"))
}

fn user_from_row(r: &SqliteRow) -> Result<User, StoreError> {
    let role: String = r.try_get("role").db()?;
    Ok(User {
        name: r.try_get("name").db()?,
        role: role.parse().map_err(|_| corrupt("role"))?,
        disabled: r.try_get::<i64, _>("disabled").db()? != 0,
        created_at_ms: r.try_get("created_at_ms").db()?,
        last_login_ms: r.try_get("last_login_ms").db()?,
    })
}

macro_rules! job_cols {
    () => {
        "seq, id, COALESCE(prompt_id, id) AS prompt_id, user_name, number, priority, prompt, \
         extra_data, outputs_to_execute, client_id, state, attempts, created_at_ms, started_at_ms, finished_at_ms, backend, \
         error, outputs, messages, meta"
    };
}

fn json_col(r: &SqliteRow, col: &str) -> Result<serde_json::Value, StoreError> {
    let s: String = r.try_get(col).db()?;
    serde_json::from_str(&s).map_err(|_| corrupt(col))
}

/// The columns a job record and a job summary share, each checked.
fn state_col(r: &SqliteRow) -> Result<JobState, StoreError> {
    let state: String = r.try_get("state").db()?;
    state.parse().map_err(|_| corrupt("state"))
}

fn priority_col(r: &SqliteRow) -> Result<Option<u8>, StoreError> {
    let priority: Option<i64> = r.try_get("priority").db()?;
    priority
        .map(u8::try_from)
        .transpose()
        .map_err(|_| corrupt("priority"))
}

fn attempts_col(r: &SqliteRow) -> Result<u32, StoreError> {
    let attempts: i64 = r.try_get("attempts").db()?;
    u32::try_from(attempts).map_err(|_| corrupt("attempts"))
}

fn error_col(r: &SqliteRow) -> Result<Option<serde_json::Value>, StoreError> {
    let error: Option<String> = r.try_get("error").db()?;
    error
        .map(|e| serde_json::from_str(&e))
        .transpose()
        .map_err(|_| corrupt("error"))
}

/// `FROM jobs WHERE ...` for `q`'s filters.
fn job_filters(qb: &mut QueryBuilder<Sqlite>, q: &JobQuery) {
    qb.push(" FROM jobs WHERE 1 = 1");
    if let Some(u) = &q.user {
        qb.push(" AND user_name = ").push_bind(u.clone());
    }
    if !q.states.is_empty() {
        push_state_list(qb, &q.states);
    }
    if let Some(w) = &q.workflow_id {
        qb.push(" AND workflow_id = ").push_bind(w.clone());
    }
}

/// The statement reading `q`'s page of jobs.
fn page_query(q: &JobQuery) -> QueryBuilder<Sqlite> {
    let mut page = QueryBuilder::<Sqlite>::new(concat!("SELECT ", job_cols!()));
    job_filters(&mut page, q);
    page.push(match q.order {
        JobOrder::CreatedAsc => " ORDER BY created_at_ms ASC, seq ASC",
        JobOrder::CreatedDesc => " ORDER BY created_at_ms DESC, seq DESC",
        JobOrder::DurationAsc => {
            " ORDER BY COALESCE(finished_at_ms - started_at_ms, 0) ASC, seq ASC"
        }
        JobOrder::DurationDesc => {
            " ORDER BY COALESCE(finished_at_ms - started_at_ms, 0) DESC, seq DESC"
        }
        JobOrder::SeqAsc => " ORDER BY seq ASC",
    });
    // SQLite needs a LIMIT before OFFSET; -1 means none.
    page.push(" LIMIT ")
        .push_bind(q.limit.map_or(-1, clamp_i64))
        .push(" OFFSET ")
        .push_bind(clamp_i64(q.offset));
    page
}

fn job_from_row(r: &SqliteRow) -> Result<JobRecord, StoreError> {
    let mut job = job_without_bulk(r)?;
    job.prompt = json_col(r, "prompt")?;
    job.extra_data = json_col(r, "extra_data")?;
    Ok(job)
}

fn job_with_text(r: &SqliteRow) -> Result<JobWithText, StoreError> {
    let text = |col: &str| {
        let s: String = r.try_get(col).db()?;
        // Checked (a scan, no values built), so a corrupt row is an error here as in
        // `job_from_row`, not broken JSON sent to a browser.
        serde_json::value::RawValue::from_string(s).map_err(|_| corrupt(col))
    };
    Ok(JobWithText {
        job: job_without_bulk(r)?,
        prompt: text("prompt")?,
        extra_data: text("extra_data")?,
    })
}

/// A job record from its row, but for its prompt and workflow (left `Null`).
fn job_without_bulk(r: &SqliteRow) -> Result<JobRecord, StoreError> {
    let outputs_to_execute: String = r.try_get("outputs_to_execute").db()?;
    Ok(JobRecord {
        seq: r.try_get("seq").db()?,
        id: r.try_get("id").db()?,
        prompt_id: r.try_get("prompt_id").db()?,
        user: r.try_get("user_name").db()?,
        number: r.try_get("number").db()?,
        priority: priority_col(r)?,
        prompt: serde_json::Value::Null,
        extra_data: serde_json::Value::Null,
        outputs_to_execute: serde_json::from_str(&outputs_to_execute)
            .map_err(|_| corrupt("outputs_to_execute"))?,
        client_id: r.try_get("client_id").db()?,
        state: state_col(r)?,
        attempts: attempts_col(r)?,
        created_at_ms: r.try_get("created_at_ms").db()?,
        started_at_ms: r.try_get("started_at_ms").db()?,
        finished_at_ms: r.try_get("finished_at_ms").db()?,
        backend: r.try_get("backend").db()?,
        error: error_col(r)?,
        outputs: json_col(r, "outputs")?,
        messages: json_col(r, "messages")?,
        meta: json_col(r, "meta")?,
    })
}

const SUMMARY_COLS: &str = "seq, id, user_name, state, priority, attempts, created_at_ms, \
     started_at_ms, finished_at_ms, backend, error, outputs";

fn summary_from_row(r: &SqliteRow) -> Result<JobSummary, StoreError> {
    Ok(JobSummary {
        seq: r.try_get("seq").db()?,
        id: r.try_get("id").db()?,
        user: r.try_get("user_name").db()?,
        state: state_col(r)?,
        priority: priority_col(r)?,
        attempts: attempts_col(r)?,
        created_at_ms: r.try_get("created_at_ms").db()?,
        started_at_ms: r.try_get("started_at_ms").db()?,
        finished_at_ms: r.try_get("finished_at_ms").db()?,
        backend: r.try_get("backend").db()?,
        error: error_col(r)?,
        outputs: json_col(r, "outputs")?,
    })
}

fn audit_from_row(r: &SqliteRow) -> Result<AuditEntry, StoreError> {
    Ok(AuditEntry {
        seq: r.try_get("seq").db()?,
        at_ms: r.try_get("at_ms").db()?,
        actor: r.try_get("actor").db()?,
        action: r.try_get("action").db()?,
        target: r.try_get("target").db()?,
        detail: json_col(r, "detail")?,
    })
}

fn token_hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

fn clamp_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn count_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

#[async_trait]
impl UserStore for SqliteStore {
    async fn create_user(
        &self,
        name: &str,
        password: &str,
        role: Role,
    ) -> Result<User, StoreError> {
        if !valid_user_name(name) {
            return Err(StoreError::Other(format!("invalid user name {name:?}")));
        }
        password::validate_password(password)?;
        // Cheap check first so a duplicate does not cost an argon2 hash; the insert still
        // catches a race through the primary key.
        self.ensure_user_absent(name).await?;
        let hash = self.hasher.hash(password).await?;
        self.insert_user(name, &hash, role, "create_user").await
    }

    async fn import_bcrypt(
        &self,
        name: &str,
        bcrypt_hash: &str,
        role: Role,
    ) -> Result<User, StoreError> {
        if !valid_user_name(name) {
            return Err(StoreError::Other(format!("invalid user name {name:?}")));
        }
        password::validate_bcrypt(bcrypt_hash)?;
        self.insert_user(name, bcrypt_hash, role, "import_bcrypt")
            .await
    }

    async fn get_user(&self, name: &str) -> Result<Option<User>, StoreError> {
        self.timed("get_user", async {
            Ok(self.user_row(name).await?.map(|(u, _)| u))
        })
        .await
    }

    async fn list_users(&self) -> Result<Vec<User>, StoreError> {
        self.timed("list_users", async {
            sqlx::query(
                "SELECT name, role, disabled, created_at_ms, last_login_ms \
                 FROM users ORDER BY name",
            )
            .fetch_all(&self.read)
            .await
            .db()?
            .iter()
            .map(user_from_row)
            .collect()
        })
        .await
    }

    async fn set_password(&self, name: &str, password: &str) -> Result<(), StoreError> {
        password::validate_password(password)?;
        if self.get_user(name).await?.is_none() {
            return Err(StoreError::NotFound);
        }
        let hash = self.hasher.hash(password).await?;
        self.account_change("set_password", async {
            let mut tx = self.begin().await?;
            let n = sqlx::query("UPDATE users SET password_hash = ? WHERE name = ?")
                .bind(&hash)
                .bind(name)
                .execute(&mut *tx)
                .await
                .db()?
                .rows_affected();
            if n == 0 {
                return Err(StoreError::NotFound);
            }
            // A new password ends every existing login.
            sqlx::query("DELETE FROM sessions WHERE user_name = ?")
                .bind(name)
                .execute(&mut *tx)
                .await
                .db()?;
            Self::record_change(&mut tx, name, AccountChangeKind::Password).await?;
            tx.commit().await.db()
        })
        .await
    }

    async fn set_disabled(&self, name: &str, disabled: bool) -> Result<(), StoreError> {
        self.account_change("set_disabled", async {
            let mut tx = self.begin().await?;
            let current: Option<i64> =
                sqlx::query_scalar("SELECT disabled FROM users WHERE name = ?")
                    .bind(name)
                    .fetch_optional(&mut *tx)
                    .await
                    .db()?;
            match current {
                None => return Err(StoreError::NotFound),
                // Already so: nothing changes, nothing to tell.
                Some(d) if (d != 0) == disabled => return Ok(()),
                Some(_) => {}
            }
            sqlx::query("UPDATE users SET disabled = ? WHERE name = ?")
                .bind(i64::from(disabled))
                .bind(name)
                .execute(&mut *tx)
                .await
                .db()?;
            let kind = if disabled {
                AccountChangeKind::Disabled
            } else {
                AccountChangeKind::Enabled
            };
            Self::record_change(&mut tx, name, kind).await?;
            tx.commit().await.db()
        })
        .await
    }

    async fn remove_user(&self, name: &str) -> Result<(), StoreError> {
        self.account_change("remove_user", async {
            let mut tx = self.begin().await?;
            // Explicit, though the foreign key cascades too.
            sqlx::query("DELETE FROM sessions WHERE user_name = ?")
                .bind(name)
                .execute(&mut *tx)
                .await
                .db()?;
            let n = sqlx::query("DELETE FROM users WHERE name = ?")
                .bind(name)
                .execute(&mut *tx)
                .await
                .db()?
                .rows_affected();
            if n == 0 {
                return Err(StoreError::NotFound);
            }
            Self::record_change(&mut tx, name, AccountChangeKind::Removed).await?;
            tx.commit().await.db()
        })
        .await
    }

    async fn verify_password(
        &self,
        name: &str,
        password: &str,
    ) -> Result<Option<User>, StoreError> {
        let row = if valid_user_name(name) {
            self.timed("verify_password", self.user_row(name)).await?
        } else {
            None
        };
        let (user, stored) = match row {
            Some((u, h)) => (Some(u), Some(h)),
            None => (None, None),
        };
        // Always hash, so unknown and disabled users take as long as a wrong password.
        let verified = self.hasher.verify(password, stored.clone()).await?;
        let (Some(user), Verified::Yes { rehash }, Some(old)) = (user, verified, stored) else {
            return Ok(None);
        };
        if user.disabled {
            return Ok(None);
        }
        let now = now_ms();
        // The sign-in changes the account (last login, maybe the hash): cached copies go.
        self.account_change("verify_password", async {
            // The rehash only replaces the exact hash that was verified, so a concurrent
            // set_password is never overwritten.
            let update = sqlx::query(
                "UPDATE users SET last_login_ms = ?1, \
                 password_hash = CASE WHEN ?2 IS NOT NULL AND password_hash = ?3 \
                                      THEN ?2 ELSE password_hash END \
                 WHERE name = ?4 AND disabled = 0 \
                 RETURNING name, role, disabled, created_at_ms, last_login_ms",
            )
            .bind(now)
            .bind(rehash.as_deref())
            .bind(&old)
            .bind(name);
            let row = write_returning(update, &self.write).await?;
            row.as_ref().map(user_from_row).transpose()
        })
        .await
    }

    async fn password_scheme(&self, name: &str) -> Result<Option<PasswordScheme>, StoreError> {
        self.timed("password_scheme", async {
            Ok(self
                .user_row(name)
                .await?
                .and_then(|(_, h)| password::scheme_of(&h)))
        })
        .await
    }

    async fn create_session(&self, user: &str, ttl_ms: i64) -> Result<String, StoreError> {
        if ttl_ms <= 0 {
            return Err(StoreError::Other("session ttl must be positive".into()));
        }
        let mut raw = [0u8; 32];
        rand::fill(&mut raw);
        let token = base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, raw);
        let hash = token_hash(&token);
        let now = now_ms();
        self.timed("create_session", async {
            let mut tx = self.begin().await?;
            let disabled: Option<i64> =
                sqlx::query_scalar("SELECT disabled FROM users WHERE name = ?")
                    .bind(user)
                    .fetch_optional(&mut *tx)
                    .await
                    .db()?;
            match disabled {
                None => return Err(StoreError::NotFound),
                Some(0) => {}
                Some(_) => return Err(StoreError::Conflict("user is disabled".into())),
            }
            // Expired sessions are swept here, so no separate maintenance task is needed.
            sqlx::query("DELETE FROM sessions WHERE expires_at_ms <= ?")
                .bind(now)
                .execute(&mut *tx)
                .await
                .db()?;
            sqlx::query(
                "INSERT INTO sessions (token_hash, user_name, created_at_ms, expires_at_ms) \
                 VALUES (?, ?, ?, ?)",
            )
            .bind(&hash)
            .bind(user)
            .bind(now)
            .bind(now.saturating_add(ttl_ms))
            .execute(&mut *tx)
            .await
            .db()?;
            tx.commit().await.db()
        })
        .await?;
        Ok(token)
    }

    async fn session_user(&self, token: &str) -> Result<Option<User>, StoreError> {
        let hash = token_hash(token);
        let now = now_ms();
        if let Some(u) = self.sessions.get(&hash, now) {
            return Ok(Some(u));
        }
        let generation = self.sessions.generation();
        self.timed("session_user", async {
            let row = sqlx::query(
                "SELECT u.name, u.role, u.disabled, u.created_at_ms, u.last_login_ms, \
                 s.expires_at_ms \
                 FROM sessions s JOIN users u ON u.name = s.user_name \
                 WHERE s.token_hash = ? AND s.expires_at_ms > ? AND u.disabled = 0",
            )
            .bind(&hash)
            .bind(now)
            .fetch_optional(&self.read)
            .await
            .db()?;
            let Some(row) = row else { return Ok(None) };
            let user = user_from_row(&row)?;
            let expires: i64 = row.try_get("expires_at_ms").db()?;
            self.sessions.put(generation, hash, user.clone(), expires);
            Ok(Some(user))
        })
        .await
    }

    async fn delete_session(&self, token: &str) -> Result<(), StoreError> {
        let hash = token_hash(token);
        self.account_change("delete_session", async {
            sqlx::query("DELETE FROM sessions WHERE token_hash = ?")
                .bind(&hash)
                .execute(&self.write)
                .await
                .db()?;
            Ok(())
        })
        .await
    }

    async fn user_revision(&self, name: &str) -> Result<Option<(User, i64)>, StoreError> {
        self.timed("user_revision", async {
            let row = sqlx::query(
                "SELECT name, role, disabled, created_at_ms, last_login_ms, \
                 (SELECT COALESCE(MAX(seq), 0) FROM account_changes c \
                  WHERE c.user_name = u.name) AS revision \
                 FROM users u WHERE name = ?",
            )
            .bind(name)
            .fetch_optional(&self.read)
            .await
            .db()?;
            row.map(|r| Ok((user_from_row(&r)?, r.try_get("revision").db()?)))
                .transpose()
        })
        .await
    }

    async fn account_changes(
        &self,
        after: i64,
        limit: u32,
    ) -> Result<Vec<AccountChange>, StoreError> {
        let changes = self
            .timed("account_changes", async {
                sqlx::query(
                    "SELECT seq, user_name, kind, at_ms FROM account_changes \
                     WHERE seq > ? ORDER BY seq LIMIT ?",
                )
                .bind(after)
                .bind(i64::from(limit))
                .fetch_all(&self.read)
                .await
                .db()?
                .iter()
                .map(|r| {
                    let kind: String = r.try_get("kind").db()?;
                    Ok(AccountChange {
                        seq: r.try_get("seq").db()?,
                        user: r.try_get("user_name").db()?,
                        kind: kind.parse().map_err(|_| corrupt("account change kind"))?,
                        at_ms: r.try_get("at_ms").db()?,
                    })
                })
                .collect::<Result<Vec<_>, StoreError>>()
            })
            .await?;
        if !changes.is_empty() {
            // Possibly made by another process: sessions cached before it go.
            self.sessions.invalidate();
        }
        Ok(changes)
    }

    async fn last_account_change(&self) -> Result<i64, StoreError> {
        self.timed("last_account_change", async {
            sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM account_changes")
                .fetch_one(&self.read)
                .await
                .db()
        })
        .await
    }
}

#[async_trait]
impl MetaStore for SqliteStore {
    async fn get_meta(&self, key: &str) -> Result<Option<MetaEntry>, StoreError> {
        self.timed("get_meta", async {
            let row = sqlx::query("SELECT value, updated_at_ms, source FROM meta WHERE key = ?")
                .bind(key)
                .fetch_optional(&self.read)
                .await
                .db()?;
            row.map(|r| {
                Ok(MetaEntry {
                    value: r.try_get("value").db()?,
                    updated_at_ms: r.try_get("updated_at_ms").db()?,
                    source: r.try_get("source").db()?,
                })
            })
            .transpose()
        })
        .await
    }

    async fn put_meta(&self, key: &str, value: &str, source: &str) -> Result<(), StoreError> {
        self.timed("put_meta", async {
            sqlx::query(
                "INSERT INTO meta (key, value, updated_at_ms, source) VALUES (?, ?, ?, ?) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value, \
                 updated_at_ms = excluded.updated_at_ms, source = excluded.source",
            )
            .bind(key)
            .bind(value)
            .bind(now_ms())
            .bind(source)
            .execute(&self.write)
            .await
            .db()?;
            Ok(())
        })
        .await
    }
}

#[async_trait]
impl JobStore for SqliteStore {
    async fn enqueue(&self, job: NewJob, limits: EnqueueLimits) -> Result<JobRecord, StoreError> {
        Ok(self.enqueue_counted(job, limits).await?.0)
    }

    async fn enqueue_counted(
        &self,
        job: NewJob,
        limits: EnqueueLimits,
    ) -> Result<(JobRecord, Option<u64>), StoreError> {
        if job.id.is_empty() {
            return Err(StoreError::Other("empty job id".into()));
        }
        if !job.number.is_finite() {
            return Err(StoreError::Other("job number must be finite".into()));
        }
        // Group commit (see `enqueue.rs`): the checks and the insert are one statement in a
        // transaction shared with the submissions that arrived meanwhile.
        let started = std::time::Instant::now();
        let res = self.enqueuer.enqueue(job, limits, now_ms()).await;
        crate::telemetry::record("enqueue", started.elapsed(), &res);
        let (rec, n) = res?;
        Ok((rec, Some(n)))
    }

    async fn get_job(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        self.timed("get_job", async {
            let row = sqlx::query(concat!("SELECT ", job_cols!(), " FROM jobs WHERE id = ?"))
                .bind(id)
                .fetch_optional(&self.read)
                .await
                .db()?;
            row.as_ref().map(job_from_row).transpose()
        })
        .await
    }

    async fn get_user_job(
        &self,
        user: &str,
        prompt_id: &str,
    ) -> Result<Option<JobRecord>, StoreError> {
        self.timed("get_user_job", async {
            let row = sqlx::query(concat!(
                "SELECT ",
                job_cols!(),
                " FROM jobs WHERE user_name = ? AND prompt_id = ?"
            ))
            .bind(user)
            .bind(prompt_id)
            .fetch_optional(&self.read)
            .await
            .db()?;
            row.as_ref().map(job_from_row).transpose()
        })
        .await
    }

    async fn list_jobs(&self, q: &JobQuery) -> Result<(Vec<JobRecord>, u64), StoreError> {
        self.timed("list_jobs", async {
            // Both statements run in one read transaction, so total and page agree.
            let mut tx = self.read.begin().await.db()?;
            let mut count = QueryBuilder::<Sqlite>::new("SELECT COUNT(*)");
            job_filters(&mut count, q);
            let total: i64 = count.build_query_scalar().fetch_one(&mut *tx).await.db()?;
            let rows = page_query(q).build().fetch_all(&mut *tx).await.db()?;
            let jobs = rows
                .iter()
                .map(job_from_row)
                .collect::<Result<Vec<_>, _>>()?;
            tx.commit().await.db()?;
            Ok((jobs, count_u64(total)))
        })
        .await
    }

    async fn list_jobs_text(&self, q: &JobQuery) -> Result<Vec<JobWithText>, StoreError> {
        // One statement, one trip to the connection's thread: a consistent snapshot without
        // a transaction, and no count (its callers do not need one).
        self.timed("list_jobs_text", async {
            let rows = page_query(q).build().fetch_all(&self.read).await.db()?;
            rows.iter().map(job_with_text).collect()
        })
        .await
    }

    async fn unfinished_jobs(&self) -> Result<Vec<JobRecord>, StoreError> {
        self.timed("unfinished_jobs", async {
            sqlx::query(concat!(
                "SELECT ",
                job_cols!(),
                " FROM jobs WHERE state IN ('queued', 'dispatched', 'running') ORDER BY seq"
            ))
            .fetch_all(&self.read)
            .await
            .db()?
            .iter()
            .map(job_from_row)
            .collect()
        })
        .await
    }

    async fn transition(
        &self,
        id: &str,
        from: &[JobState],
        to: JobState,
        patch: JobPatch,
    ) -> Result<JobRecord, StoreError> {
        // `Some(Null)` clears the error column (stored as SQL NULL).
        let error = patch
            .error
            .as_ref()
            .map(|e| (!e.is_null()).then(|| e.to_string()));
        // The states it may leave, as a JSON array for `json_each`.
        let from_json = serde_json::to_string(&from.iter().map(|s| s.as_str()).collect::<Vec<_>>())
            .map_err(|e| StoreError::Other(e.to_string()))?;
        // The compare-and-set is one statement; only when it matched nothing does a second
        // read tell an unknown job from one in another state.
        let update = || {
            sqlx::query(concat!(
                "UPDATE jobs SET state = ?1, attempts = attempts + ?2, \
                 backend = COALESCE(?3, backend), \
                 started_at_ms = COALESCE(?4, started_at_ms), \
                 finished_at_ms = COALESCE(?5, finished_at_ms), \
                 error = CASE WHEN ?6 THEN ?7 ELSE error END, \
                 outputs = COALESCE(?8, outputs), \
                 messages = COALESCE(?9, messages), \
                 meta = COALESCE(?10, meta), \
                 priority = CASE WHEN ?12 THEN ?13 ELSE priority END \
                 WHERE id = ?11 AND state IN (SELECT value FROM json_each(?14)) RETURNING ",
                job_cols!()
            ))
            .bind(to.as_str())
            .bind(i64::from(patch.attempts_inc))
            .bind(&patch.backend)
            .bind(patch.started_at_ms)
            .bind(patch.finished_at_ms)
            .bind(error.is_some())
            .bind(error.flatten())
            .bind(patch.outputs.as_ref().map(ToString::to_string))
            .bind(patch.messages.as_ref().map(ToString::to_string))
            .bind(patch.meta.as_ref().map(ToString::to_string))
            .bind(id)
            .bind(patch.priority.is_some())
            .bind(patch.priority.flatten().map(i64::from))
            .bind(&from_json)
        };
        let explain = |current: Option<String>| match current {
            None => StoreError::NotFound,
            Some(current) => {
                StoreError::Conflict(format!("job {id} is {current}, not one of {from:?}"))
            }
        };
        if self.lock_wait_bounded {
            // One round trip to the connection's thread instead of three (BEGIN, UPDATE,
            // COMMIT): on a busy machine each is a wait for a core, and this is on the path
            // of every hand-over. SQLite gives up waiting for another process's lock before
            // this call times out, so a call that timed out waiting has not committed, as
            // with BEGIN IMMEDIATE below.
            return self
                .timed("transition", async {
                    let mut conn = self.write.acquire().await.db()?;
                    match write_returning(update(), &mut *conn).await? {
                        Some(row) => job_from_row(&row),
                        None => Err(explain(state_of(&mut conn, id).await?)),
                    }
                })
                .await;
        }
        self.timed("transition", async {
            // BEGIN IMMEDIATE waits for the write lock on its own: a call that times out
            // there never commits later.
            let mut tx = self.begin().await?;
            match update().fetch_optional(&mut *tx).await.db()? {
                Some(row) => {
                    let rec = job_from_row(&row)?;
                    tx.commit().await.db()?;
                    Ok(rec)
                }
                None => Err(explain(state_of(&mut tx, id).await?)),
            }
        })
        .await
    }

    async fn delete_queued(&self, user: &str, ids: &[String]) -> Result<Vec<String>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let cancelled = self
            .timed("delete_queued", self.cancel_queued(user, Some(ids)))
            .await?;
        // prompt_id -> internal id (a row from before prompt_ids were stored has only an id).
        let mut hit: std::collections::HashMap<String, String> = cancelled
            .into_iter()
            .map(|(_, id, pid)| (pid.unwrap_or_else(|| id.clone()), id))
            .collect();
        // In the caller's order, each job once.
        Ok(ids.iter().filter_map(|pid| hit.remove(pid)).collect())
    }

    async fn clear_queued(&self, user: &str) -> Result<Vec<String>, StoreError> {
        let mut cancelled = self
            .timed("clear_queued", self.cancel_queued(user, None))
            .await?;
        cancelled.sort_unstable();
        Ok(cancelled.into_iter().map(|(_, id, _)| id).collect())
    }

    async fn delete_history(&self, user: &str, ids: &[String]) -> Result<u64, StoreError> {
        if ids.is_empty() {
            return Ok(0);
        }
        self.timed("delete_history", self.delete_finished(user, Some(ids)))
            .await
    }

    async fn clear_history(&self, user: &str) -> Result<u64, StoreError> {
        self.timed("clear_history", self.delete_finished(user, None))
            .await
    }

    async fn count_jobs(&self, user: Option<&str>, states: &[JobState]) -> Result<u64, StoreError> {
        self.timed("count_jobs", async {
            if user.is_none() && !states.is_empty() {
                // Kept by triggers (migration 0002): no scan of the queue.
                let mut qb = QueryBuilder::<Sqlite>::new(
                    "SELECT COALESCE(SUM(n), 0) FROM job_state_counts WHERE 1 = 1",
                );
                push_state_list(&mut qb, states);
                let n: i64 = qb.build_query_scalar().fetch_one(&self.read).await.db()?;
                return Ok(count_u64(n));
            }
            let mut qb = QueryBuilder::<Sqlite>::new("SELECT COUNT(*) FROM jobs WHERE 1 = 1");
            if let Some(u) = user {
                qb.push(" AND user_name = ").push_bind(u.to_owned());
            }
            if !states.is_empty() {
                push_state_list(&mut qb, states);
            }
            let n: i64 = qb.build_query_scalar().fetch_one(&self.read).await.db()?;
            Ok(count_u64(n))
        })
        .await
    }

    async fn job_state_counts(&self) -> Result<Vec<(JobState, u64)>, StoreError> {
        let rows: Vec<(String, i64)> = self
            .timed("job_state_counts", async {
                // Kept by triggers (migration 0002): one small read, no scan of the jobs.
                sqlx::query_as("SELECT state, n FROM job_state_counts")
                    .fetch_all(&self.read)
                    .await
                    .db()
            })
            .await?;
        Ok(JobState::ALL
            .into_iter()
            .map(|state| {
                let n = rows
                    .iter()
                    .find(|(s, _)| s == state.as_str())
                    .map_or(0, |(_, n)| count_u64(*n));
                (state, n)
            })
            .collect())
    }

    async fn job_summaries(&self, q: &SummaryQuery) -> Result<Vec<JobSummary>, StoreError> {
        self.timed("job_summaries", async {
            let mut qb =
                QueryBuilder::<Sqlite>::new(format!("SELECT {SUMMARY_COLS} FROM jobs WHERE 1 = 1"));
            if !q.states.is_empty() {
                push_state_list(&mut qb, &q.states);
            }
            if let Some(t) = q.created_since_ms {
                qb.push(" AND created_at_ms >= ").push_bind(t);
            }
            qb.push(match q.order {
                SummaryOrder::SeqAsc => " ORDER BY seq ASC",
                // NULLs (unfinished) sort first in DESC order; they go last here.
                SummaryOrder::FinishedDesc => {
                    " ORDER BY finished_at_ms IS NULL, finished_at_ms DESC, seq DESC"
                }
            });
            qb.push(" LIMIT ").push_bind(q.limit.map_or(-1, clamp_i64));
            qb.build()
                .fetch_all(&self.read)
                .await
                .db()?
                .iter()
                .map(summary_from_row)
                .collect()
        })
        .await
    }

    async fn user_job_stats(&self) -> Result<Vec<UserJobStats>, StoreError> {
        self.timed("user_job_stats", async {
            let rows = sqlx::query(
                "SELECT user_name, state, COUNT(*) AS n, \
                 COALESCE(SUM(CASE WHEN started_at_ms IS NOT NULL AND finished_at_ms IS NOT NULL \
                     AND finished_at_ms > started_at_ms \
                     THEN finished_at_ms - started_at_ms ELSE 0 END), 0) AS gpu_ms, \
                 MAX(MAX(created_at_ms, COALESCE(started_at_ms, 0), COALESCE(finished_at_ms, 0))) AS last \
                 FROM jobs GROUP BY user_name, state ORDER BY user_name",
            )
            .fetch_all(&self.read)
            .await
            .db()?;
            let mut out: Vec<UserJobStats> = Vec::new();
            for r in &rows {
                let user: String = r.try_get("user_name").db()?;
                let state: String = r.try_get("state").db()?;
                let state: JobState = state.parse().map_err(|_| corrupt("state"))?;
                let n: i64 = r.try_get("n").db()?;
                let gpu: i64 = r.try_get("gpu_ms").db()?;
                let last: i64 = r.try_get("last").db()?;
                if out.last().is_none_or(|u| u.user != user) {
                    out.push(UserJobStats {
                        user,
                        ..Default::default()
                    });
                }
                let e = out.last_mut().expect("just pushed");
                *e.counts.entry(state).or_default() += count_u64(n);
                // Only finished jobs have both times; the CASE leaves the others at 0.
                e.gpu_ms += count_u64(gpu);
                e.last_activity_ms = e.last_activity_ms.max(last);
            }
            Ok(out)
        })
        .await
    }
}

#[async_trait]
impl AuditStore for SqliteStore {
    async fn append_audit(&self, e: NewAudit) -> Result<AuditEntry, StoreError> {
        let detail = if e.detail.is_null() {
            "{}".to_string()
        } else {
            e.detail.to_string()
        };
        let now = now_ms();
        self.timed("append_audit", async {
            let insert = sqlx::query(
                "INSERT INTO audit_log (at_ms, actor, action, target, detail) \
                 VALUES (?, ?, ?, ?, ?) RETURNING seq, at_ms, actor, action, target, detail",
            )
            .bind(now)
            .bind(&e.actor)
            .bind(&e.action)
            .bind(&e.target)
            .bind(&detail);
            let row = write_returning(insert, &self.write)
                .await?
                .ok_or_else(|| StoreError::Other("the audit insert returned no row".into()))?;
            audit_from_row(&row)
        })
        .await
    }

    async fn list_audit(
        &self,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        self.timed("list_audit", async {
            sqlx::query(
                "SELECT seq, at_ms, actor, action, target, detail FROM audit_log \
                 WHERE seq < ? ORDER BY seq DESC LIMIT ?",
            )
            .bind(before.unwrap_or(i64::MAX))
            .bind(i64::from(limit))
            .fetch_all(&self.read)
            .await
            .db()?
            .iter()
            .map(audit_from_row)
            .collect()
        })
        .await
    }
}
