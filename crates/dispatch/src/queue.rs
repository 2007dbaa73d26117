//! The workshop queue: every accepted job is committed to the store before
//! the participant's 200, and mirrored in the in-memory fair scheduler that
//! decides which job a free backend slot takes next.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use comfyume_scheduler::{Limits, Policy, QueuedJob, Scheduler};
use comfyume_store::{EnqueueLimits, JobPatch, JobRecord, JobState, NewJob, Store, StoreError};
use tokio::sync::{Notify, watch};

use crate::events::EventSink;

#[derive(Debug, Clone)]
pub struct QueueConfig {
    pub policy: Policy,
    /// `MAX_RUNNING_PER_USER`: a participant's jobs running or handed to a backend at once.
    pub max_running_per_user: u32,
    /// `MAX_QUEUED_PER_USER`: a participant's waiting jobs.
    pub max_queued_per_user: u32,
    /// `MAX_QUEUE_DEPTH`: waiting jobs of the whole workshop.
    pub max_queue_depth: u32,
    /// Priority aging: a waiting job gains a level per this many ms.
    pub aging_ms: u64,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            policy: Policy::RoundRobin,
            max_running_per_user: 1,
            max_queued_per_user: 20,
            max_queue_depth: 100,
            aging_ms: 60_000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("invalid priority level {0} (0-3)")]
    InvalidLevel(u8),
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub struct Queue {
    store: Arc<dyn Store>,
    sched: Mutex<Scheduler>,
    /// Wakes waiting dispatcher slots when work arrives or a cap frees up.
    notify: Notify,
    limits: Mutex<EnqueueLimits>,
    /// ComfyUI's prompt counter (`number` when the client gives none).
    counter: AtomicI64,
    events: Arc<dyn EventSink>,
    /// Jobs on a backend now: id -> (owner, interrupt switch).
    running: Mutex<HashMap<String, (String, watch::Sender<bool>)>>,
}

fn queued_job(r: &JobRecord) -> QueuedJob {
    QueuedJob {
        id: r.id.clone(),
        user: r.user.clone(),
        seq: r.seq as u64,
        number: r.number,
        priority: r.priority,
        enqueued_at_ms: r.created_at_ms,
    }
}

/// The counter value a restored job's `number` requires: the counter also
/// moves on rejected prompts, so `seq` alone can be lower, and a new job
/// would then sort before (or, with `front`, after) jobs already waiting.
fn counter_floor(number: f64) -> i64 {
    if number.is_finite() {
        number.abs().ceil().min(9.0e15) as i64
    } else {
        0
    }
}

impl Queue {
    /// Opens the queue over `store`: queued jobs go back into the scheduler;
    /// jobs left dispatched or running by a previous process are returned for
    /// the dispatcher to re-attach or retry (they count toward the caps).
    pub async fn open(
        store: Arc<dyn Store>,
        cfg: QueueConfig,
        events: Arc<dyn EventSink>,
    ) -> Result<(Arc<Queue>, Vec<JobRecord>), QueueError> {
        let mut sched = Scheduler::new(
            cfg.policy,
            Limits {
                max_running_per_user: cfg.max_running_per_user,
                max_queued_per_user: None,
                aging_ms: cfg.aging_ms,
            },
        );
        let mut in_flight = Vec::new();
        let mut max_seq = 0;
        for r in store.unfinished_jobs().await? {
            max_seq = max_seq.max(r.seq).max(counter_floor(r.number));
            match r.state {
                JobState::Queued => {
                    if let Err(e) = sched.enqueue(queued_job(&r)) {
                        tracing::error!(job = %r.id, error = %e, "could not restore a queued job");
                    }
                }
                _ => {
                    sched.restore_running(&r.user);
                    in_flight.push(r);
                }
            }
        }
        let (recent, _) = store
            .list_jobs(&comfyume_store::JobQuery {
                order: comfyume_store::JobOrder::CreatedDesc,
                limit: Some(1),
                ..Default::default()
            })
            .await?;
        if let Some(r) = recent.first() {
            max_seq = max_seq.max(r.seq).max(counter_floor(r.number));
        }
        let q = Arc::new(Queue {
            store,
            sched: Mutex::new(sched),
            notify: Notify::new(),
            limits: Mutex::new(EnqueueLimits {
                max_queued_per_user: cfg.max_queued_per_user,
                max_queue_depth: cfg.max_queue_depth,
            }),
            counter: AtomicI64::new(max_seq),
            events,
            running: Mutex::new(HashMap::new()),
        });
        Ok((q, in_flight))
    }

    fn sched(&self) -> std::sync::MutexGuard<'_, Scheduler> {
        self.sched.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn events(&self) -> &Arc<dyn EventSink> {
        &self.events
    }

    /// ComfyUI's counter: taken (and incremented) by every submission without a
    /// `number`, rejected ones included.
    pub fn next_number(&self) -> i64 {
        self.counter.fetch_add(1, Ordering::SeqCst) + 1
    }

    pub fn enqueue_limits(&self) -> EnqueueLimits {
        *self.limits.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_enqueue_limits(&self, l: EnqueueLimits) {
        *self.limits.lock().unwrap_or_else(|p| p.into_inner()) = l;
    }

    /// Commits the job, then makes it schedulable. The store's answer is the
    /// durability point: only after it may the participant hear 200.
    pub async fn submit(&self, job: NewJob) -> Result<JobRecord, QueueError> {
        let user = job.user.clone();
        let (rec, remaining) = self
            .store
            .enqueue_counted(job, self.enqueue_limits())
            .await?;
        if let Err(e) = self.sched().enqueue(queued_job(&rec)) {
            // The store accepted it, so it must not vanish: this only happens
            // for an id the scheduler already holds, which the store forbids.
            tracing::error!(job = %rec.id, error = %e, "scheduler refused a stored job");
        }
        metrics::counter!("comfyume_jobs_submitted_total").increment(1);
        self.notify.notify_waiters();
        // Counted in the transaction that stored the job: no second read.
        self.send_status(&user, remaining).await;
        Ok(rec)
    }

    /// Removes the participant's own pending jobs (ComfyUI's queue `delete`).
    pub async fn cancel_queued(
        &self,
        user: &str,
        ids: &[String],
    ) -> Result<Vec<String>, QueueError> {
        let removed = self.store.delete_queued(user, ids).await?;
        {
            let mut s = self.sched();
            for id in &removed {
                s.remove(id);
            }
        }
        if !removed.is_empty() {
            self.broadcast_status(user).await;
        }
        Ok(removed)
    }

    /// Removes all of the participant's pending jobs (ComfyUI's queue `clear`).
    pub async fn clear_queued(&self, user: &str) -> Result<Vec<String>, QueueError> {
        let removed = self.store.clear_queued(user).await?;
        {
            let mut s = self.sched();
            for id in &removed {
                s.remove(id);
            }
        }
        if !removed.is_empty() {
            self.broadcast_status(user).await;
        }
        Ok(removed)
    }

    /// The next job for a free backend slot, marked `dispatched` in the store;
    /// `None` when nothing may run now.
    pub async fn take_next(&self) -> Result<Option<JobRecord>, QueueError> {
        loop {
            let Some(job) = self.sched().pick(now_ms()) else {
                return Ok(None);
            };
            match self
                .store
                .transition(
                    &job.id,
                    &[JobState::Queued],
                    JobState::Dispatched,
                    JobPatch::default(),
                )
                .await
            {
                Ok(rec) => return Ok(Some(rec)),
                // Cancelled between the pick and now: release the slot, try the next.
                Err(StoreError::Conflict(_)) | Err(StoreError::NotFound) => {
                    self.sched().finished(&job.user);
                }
                Err(e) => {
                    // Put it back so a storage hiccup loses nothing.
                    let mut s = self.sched();
                    s.finished(&job.user);
                    let _ = s.requeue(job);
                    return Err(e.into());
                }
            }
        }
    }

    /// Waits until a job may run. Event-driven (no polling delay); the timeout
    /// only guards against a missed wake-up.
    pub async fn wait_next(&self) -> Result<JobRecord, QueueError> {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(j) = self.take_next().await? {
                return Ok(j);
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), notified).await;
        }
    }

    /// A dispatched or running job ended (any outcome): frees its cap slot.
    pub fn job_ended(&self, user: &str) {
        self.sched().finished(user);
        self.notify.notify_waiters();
    }

    /// Puts a job back for another attempt (keeps its place among its owner's jobs).
    pub fn requeue(&self, rec: &JobRecord) {
        {
            let mut s = self.sched();
            s.finished(&rec.user);
            if let Err(e) = s.requeue(queued_job(rec)) {
                tracing::error!(job = %rec.id, error = %e, "could not requeue a job");
            }
        }
        self.notify.notify_waiters();
    }

    /// Marks a job as on a backend; the receiver turns `true` when its owner
    /// interrupts it.
    pub fn register_running(&self, id: &str, user: &str) -> watch::Receiver<bool> {
        let (tx, rx) = watch::channel(false);
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string(), (user.to_string(), tx));
        rx
    }

    pub fn unregister_running(&self, id: &str) {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// Interrupts `user`'s running job `prompt_id`, or all of `user`'s running
    /// jobs when none is named. Never another participant's. Returns how many.
    pub fn interrupt(&self, user: &str, prompt_id: Option<&str>) -> usize {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let mut n = 0;
        for (id, (owner, tx)) in running.iter() {
            if owner == user && prompt_id.is_none_or(|p| p == id) {
                let _ = tx.send(true);
                n += 1;
            }
        }
        n
    }

    /// 0-based place in the workshop queue under the current policy.
    pub fn position(&self, id: &str) -> Option<usize> {
        self.sched().position(id, now_ms())
    }

    /// Waiting jobs in the order they would be served.
    pub fn projected_order(&self) -> Vec<(String, String)> {
        self.sched()
            .projected_order(now_ms())
            .into_iter()
            .map(|j| (j.id.clone(), j.user.clone()))
            .collect()
    }

    pub fn queued_len(&self) -> usize {
        self.sched().len()
    }

    pub fn policy(&self) -> Policy {
        self.sched().policy()
    }

    pub fn set_policy(&self, p: Policy) {
        self.sched().set_policy(p);
        self.notify.notify_waiters();
    }

    pub fn set_user_priority(&self, user: &str, level: Option<u8>) -> Result<(), QueueError> {
        self.sched()
            .set_user_priority(user, level)
            .map_err(|_| QueueError::InvalidLevel(level.unwrap_or(0)))?;
        self.notify.notify_waiters();
        Ok(())
    }

    /// Sets a waiting job's own priority level (the instructor's call);
    /// `Conflict` once it has left the queue.
    pub async fn set_job_priority(
        &self,
        id: &str,
        level: Option<u8>,
    ) -> Result<JobRecord, QueueError> {
        if level.is_some_and(|l| l > comfyume_scheduler::MAX_LEVEL) {
            return Err(QueueError::InvalidLevel(level.unwrap_or(0)));
        }
        let patch = JobPatch {
            priority: Some(level),
            ..Default::default()
        };
        let rec = self
            .store
            .transition(id, &[JobState::Queued], JobState::Queued, patch)
            .await?;
        {
            let mut s = self.sched();
            if s.remove(id).is_some() {
                let _ = s.enqueue(queued_job(&rec));
            }
        }
        self.notify.notify_waiters();
        Ok(rec)
    }

    pub fn set_max_running_per_user(&self, n: u32) {
        let mut s = self.sched();
        let mut l = s.limits();
        l.max_running_per_user = n;
        s.set_limits(l);
        drop(s);
        self.notify.notify_waiters();
    }

    /// ComfyUI's `status` message with the participant's own `queue_remaining`,
    /// to all of their tabs.
    pub async fn broadcast_status(&self, user: &str) {
        self.send_status(user, None).await;
    }

    /// [`Self::broadcast_status`] with the count when the caller already has it.
    async fn send_status(&self, user: &str, known: Option<u64>) {
        // Counting costs a database read: not for a participant with no tab open (their
        // next page load asks for the count itself).
        if !self.events.listening(user) {
            return;
        }
        let remaining = match known {
            Some(n) => n,
            None => self
                .store
                .count_jobs(Some(user), &JobState::UNFINISHED)
                .await
                .unwrap_or(0),
        };
        let msg = comfyume_wire::shapes::status_message(remaining, None);
        self.events.to_user(user, &msg.to_string());
    }
}
