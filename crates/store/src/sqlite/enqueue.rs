//! Group commit for `enqueue`: submissions that arrive while a transaction is being
//! written wait for the next one and share it. One `BEGIN IMMEDIATE` ... `COMMIT` (one WAL
//! append) then carries many jobs instead of one, and each job costs a single statement
//! round trip to the write connection's thread instead of three. Every job is still
//! committed before its caller hears "accepted".
//!
//! A caller that gives up (its `op_timeout` passed, e.g. while another process held the
//! write lock) must never see its job committed later. Each request carries a claim that
//! either the writer takes (before inserting it) or the caller takes (when it gives up);
//! whoever loses the race defers to the winner.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use serde_json::json;
use sqlx::SqlitePool;
use tokio::sync::{Mutex, mpsc, oneshot};

use super::{Db, count_u64, map_sqlx};
use crate::{EnqueueLimits, JobRecord, JobState, LimitKind, NewJob, StoreError};

/// Jobs per transaction at most: bounds how long the write lock is held at once.
const MAX_BATCH: usize = 64;
/// Requests waiting for the writer; past this, callers wait to hand theirs over.
const CHANNEL: usize = 1024;

const PENDING: u8 = 0;
const CLAIMED: u8 = 1;
const ABANDONED: u8 = 2;

/// The answer to one submission: the stored job and its owner's unfinished count.
type Reply = oneshot::Sender<Result<(JobRecord, u64), StoreError>>;

pub(super) struct Request {
    job: NewJob,
    prompt: String,
    extra_data: String,
    outputs_to_execute: String,
    workflow_id: Option<String>,
    created_at_ms: i64,
    /// The internal id the job gets if its prompt_id is already another job's id.
    fresh_id: String,
    limits: EnqueueLimits,
    claim: Arc<AtomicU8>,
    reply: Reply,
}

impl Request {
    /// Whether the writer may still insert it (the caller has not given up).
    fn take(&self) -> bool {
        self.claim
            .compare_exchange(PENDING, CLAIMED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    fn record(self, seq: i64, id: String) -> (Reply, JobRecord) {
        let j = self.job;
        let rec = JobRecord {
            seq,
            id,
            prompt_id: j.id,
            user: j.user,
            number: j.number,
            priority: j.priority,
            prompt: j.prompt,
            extra_data: j.extra_data,
            outputs_to_execute: j.outputs_to_execute,
            client_id: j.client_id,
            state: JobState::Queued,
            attempts: 0,
            created_at_ms: self.created_at_ms,
            started_at_ms: None,
            finished_at_ms: None,
            backend: None,
            error: None,
            // The column defaults (see the migrations).
            outputs: json!({}),
            messages: json!([]),
            meta: json!({}),
        };
        (self.reply, rec)
    }
}

/// The callers' side: hands jobs to the writer task.
#[derive(Debug, Clone)]
pub(super) struct Enqueuer {
    tx: mpsc::Sender<Request>,
    op_timeout: Duration,
}

impl Enqueuer {
    /// Starts the writer task on `write` (supervised: a panic is logged and it restarts).
    /// `lock_wait_bounded` (SQLite gives up waiting for another process's lock before a
    /// caller gives up on its job): a submission that arrives alone is one statement
    /// ([`write_one`]); otherwise every batch is a transaction.
    pub(super) fn start(write: SqlitePool, op_timeout: Duration, lock_wait_bounded: bool) -> Self {
        let (tx, rx) = mpsc::channel(CHANNEL);
        let rx = Arc::new(Mutex::new(rx));
        tokio::spawn(async move {
            loop {
                let (rx, write) = (rx.clone(), write.clone());
                match tokio::spawn(async move {
                    writer(&mut *rx.lock().await, &write, lock_wait_bounded).await
                })
                .await
                {
                    Ok(()) => break, // every sender is gone: the store was dropped
                    Err(e) => {
                        tracing::error!(error = %e, "the job writer failed; restarting it")
                    }
                }
            }
        });
        Enqueuer { tx, op_timeout }
    }

    pub(super) async fn enqueue(
        &self,
        job: NewJob,
        limits: EnqueueLimits,
        created_at_ms: i64,
    ) -> Result<(JobRecord, u64), StoreError> {
        let encode = |v: &serde_json::Value| v.to_string();
        let outputs_to_execute = serde_json::to_string(&job.outputs_to_execute)
            .map_err(|e| StoreError::Other(e.to_string()))?;
        let claim = Arc::new(AtomicU8::new(PENDING));
        let (reply, mut answer) = oneshot::channel();
        let req = Request {
            prompt: encode(&job.prompt),
            extra_data: encode(&job.extra_data),
            outputs_to_execute,
            workflow_id: crate::workflow_id_of(&job.extra_data).map(str::to_owned),
            job,
            created_at_ms,
            fresh_id: uuid::Uuid::new_v4().to_string(),
            limits,
            claim: claim.clone(),
            reply,
        };
        let gone = || StoreError::Unavailable("the job writer has stopped".into());
        let timed_out = || {
            StoreError::Unavailable(format!(
                "enqueue timed out after {} ms",
                self.op_timeout.as_millis()
            ))
        };
        let handed = tokio::time::timeout(self.op_timeout, self.tx.send(req)).await;
        match handed {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(gone()),
            Err(_) => return Err(timed_out()),
        }
        match tokio::time::timeout(self.op_timeout, &mut answer).await {
            Ok(r) => r.unwrap_or_else(|_| Err(gone())),
            Err(_) => {
                if claim
                    .compare_exchange(PENDING, ABANDONED, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    Err(timed_out())
                } else {
                    // The writer took it first: its transaction holds the lock already and
                    // ends shortly; the answer (committed or not) is the truth.
                    answer.await.unwrap_or_else(|_| Err(gone()))
                }
            }
        }
    }
}

async fn writer(rx: &mut mpsc::Receiver<Request>, write: &SqlitePool, lock_wait_bounded: bool) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        if lock_wait_bounded && batch.len() == 1 {
            write_one(write, batch.remove(0)).await
        } else {
            write_batch(write, &mut batch).await
        }
        batch.clear();
    }
}

/// A submission that arrived alone (the usual case: a room's Run presses rarely meet within
/// a commit): the checks, the insert and the owner's count are one statement, committed on
/// its own. That is one round trip to the connection's thread instead of four (BEGIN,
/// INSERT, count, COMMIT), each a wait for a core on a busy machine, on the path of every
/// Run. The claim is taken before the statement waits for the write lock; SQLite gives that
/// wait up before the caller would, so a caller never hears "timed out" for a job that is
/// committed later (the caller waits for the claimed job's answer instead).
async fn write_one(write: &SqlitePool, req: Request) {
    if !req.take() {
        return; // the caller gave up: not a word of it may be written
    }
    let answer = async {
        let mut conn = write.acquire().await.db()?;
        match insert(&mut conn, &req).await? {
            Some(row) => Ok(row),
            None => Err(refusal(&mut conn, &req).await.unwrap_or_else(|e| e)),
        }
    }
    .await;
    match answer {
        Ok((seq, id, n)) => {
            let (reply, rec) = req.record(seq, id);
            let _ = reply.send(Ok((rec, count_u64(n))));
        }
        Err(e) => {
            let _ = req.reply.send(Err(e));
        }
    }
}

/// The same error again, for every caller of a failed batch.
fn again(e: &StoreError) -> StoreError {
    match e {
        StoreError::NotFound => StoreError::NotFound,
        StoreError::AlreadyExists => StoreError::AlreadyExists,
        StoreError::Conflict(s) => StoreError::Conflict(s.clone()),
        StoreError::Limit(k) => StoreError::Limit(*k),
        StoreError::Unavailable(s) => StoreError::Unavailable(s.clone()),
        StoreError::Other(s) => StoreError::Other(s.clone()),
    }
}

/// One transaction for the whole batch. A refused job (duplicate id, a limit) writes
/// nothing and does not disturb the others; a failed statement or commit (disk full, I/O)
/// fails every job of the batch, none of which is then stored.
async fn write_batch(write: &SqlitePool, batch: &mut Vec<Request>) {
    let mut tx = match write.begin_with("BEGIN IMMEDIATE").await {
        Ok(tx) => tx,
        Err(e) => {
            let e = map_sqlx(e);
            for r in batch.drain(..) {
                let _ = r.reply.send(Err(again(&e)));
            }
            return;
        }
    };
    let mut inserted = Vec::with_capacity(batch.len());
    // Each owner's unfinished jobs as committed, for the `status` message they are sent: the
    // count after their last insert of the batch (only inserts happen in this transaction).
    let mut counts = std::collections::HashMap::new();
    let mut failure = None;
    let mut pending = batch.drain(..);
    for req in pending.by_ref() {
        if !req.take() {
            continue; // the caller gave up: not a word of it may be written
        }
        match insert(&mut tx, &req).await {
            Ok(Some((seq, id, n))) => {
                let c = counts.entry(req.job.user.clone()).or_insert(0);
                *c = count_u64(n).max(*c);
                inserted.push((req, (seq, id)));
            }
            Ok(None) => match refusal(&mut tx, &req).await {
                Ok(why) => {
                    let _ = req.reply.send(Err(why));
                }
                Err(e) => {
                    let _ = req.reply.send(Err(again(&e)));
                    failure = Some(e);
                    break;
                }
            },
            Err(e) => {
                let _ = req.reply.send(Err(again(&e)));
                failure = Some(e);
                break;
            }
        }
    }
    let failure = match failure {
        Some(e) => {
            // Dropping `tx` rolls back; the pool checks the connection on release.
            drop(tx);
            Some(e)
        }
        None => tx.commit().await.db().err(),
    };
    match failure {
        None => {
            for (req, (seq, id)) in inserted {
                let (reply, rec) = req.record(seq, id);
                let n = counts.get(&rec.user).copied().unwrap_or(1);
                let _ = reply.send(Ok((rec, n)));
            }
        }
        Some(e) => {
            for (req, _) in inserted {
                let _ = req.reply.send(Err(again(&e)));
            }
            for req in pending {
                let _ = req.reply.send(Err(again(&e)));
            }
        }
    }
}

/// The checks and the insert in one statement; (seq, internal id, the owner's unfinished
/// jobs with this one), or `None` when a check refused it. The prompt_id must be new among
/// the owner's jobs; the internal id is the prompt_id unless some job (anyone's) has that id
/// already, then the request's fresh one. (RETURNING is evaluated after the row is
/// inserted: its count includes the new job.)
async fn insert(
    conn: &mut sqlx::SqliteConnection,
    r: &Request,
) -> Result<Option<(i64, String, i64)>, StoreError> {
    sqlx::query_as(
        "INSERT INTO jobs (id, prompt_id, user_name, number, priority, prompt, extra_data, \
         outputs_to_execute, client_id, workflow_id, state, created_at_ms) \
         SELECT CASE WHEN EXISTS (SELECT 1 FROM jobs WHERE id = ?1) THEN ?13 ELSE ?1 END, \
         ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 'queued', ?10 \
         WHERE NOT EXISTS (SELECT 1 FROM jobs WHERE user_name = ?2 AND prompt_id = ?1) \
         AND (?11 = 0 OR (SELECT COUNT(*) FROM jobs WHERE user_name = ?2 \
             AND state IN ('queued', 'dispatched')) < ?11) \
         AND (?12 = 0 OR (SELECT SUM(n) FROM job_state_counts \
             WHERE state IN ('queued', 'dispatched')) < ?12) \
         RETURNING seq, id, (SELECT COUNT(*) FROM jobs WHERE user_name = ?2 \
             AND state IN ('queued', 'dispatched', 'running'))",
    )
    .bind(&r.job.id)
    .bind(&r.job.user)
    .bind(r.job.number)
    .bind(r.job.priority.map(i64::from))
    .bind(&r.prompt)
    .bind(&r.extra_data)
    .bind(&r.outputs_to_execute)
    .bind(&r.job.client_id)
    .bind(&r.workflow_id)
    .bind(r.created_at_ms)
    .bind(i64::from(r.limits.max_queued_per_user))
    .bind(i64::from(r.limits.max_queue_depth))
    .bind(&r.fresh_id)
    // Run to its end, not stopped after the first row: out of a transaction (`write_one`)
    // the commit happens at the statement's last step, and only there does a failed commit
    // (a full disk) show as an error.
    .fetch_all(conn)
    .await
    .db()
    .map(|rows| rows.into_iter().next())
}

/// Why `insert` refused the job (same transaction, so the same view of the queue).
async fn refusal(conn: &mut sqlx::SqliteConnection, r: &Request) -> Result<StoreError, StoreError> {
    let counts: Result<(Option<i64>, i64, Option<i64>), _> = sqlx::query_as(
        "SELECT (SELECT seq FROM jobs WHERE user_name = ?2 AND prompt_id = ?1), \
         (SELECT COUNT(*) FROM jobs WHERE user_name = ?2 \
             AND state IN ('queued', 'dispatched')), \
         (SELECT SUM(n) FROM job_state_counts WHERE state IN ('queued', 'dispatched'))",
    )
    .bind(&r.job.id)
    .bind(&r.job.user)
    .fetch_one(conn)
    .await;
    let (exists, mine, all) = counts.db()?;
    let limits = r.limits;
    Ok(if exists.is_some() {
        StoreError::AlreadyExists
    } else if limits.max_queued_per_user > 0
        && count_u64(mine) >= u64::from(limits.max_queued_per_user)
    {
        StoreError::Limit(LimitKind::UserQueued {
            max: limits.max_queued_per_user,
        })
    } else if limits.max_queue_depth > 0
        && count_u64(all.unwrap_or(0)) >= u64::from(limits.max_queue_depth)
    {
        StoreError::Limit(LimitKind::QueueDepth {
            max: limits.max_queue_depth,
        })
    } else {
        StoreError::Other("the job was refused although no limit applies".into())
    })
}
