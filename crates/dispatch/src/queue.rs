//! The workshop queue: every accepted job is committed to the store before
//! the participant's 200, and mirrored in the in-memory fair scheduler that
//! decides which job a free backend slot takes next.
//!
//! The store is the single truth. The scheduler is a view of its queued jobs,
//! and every job the store has as dispatched or running is *claimed* by this
//! process (a [`Claim`], held from the moment it is taken until its last
//! transition out of those states). [`Queue::reconcile`] brings the view in line
//! with the store (at start, periodically, and soon after any store error whose
//! outcome is unknown): queued jobs missing from the scheduler are added, stale
//! entries removed, and dispatched jobs nobody claims are handed back as orphans.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use comfyume_scheduler::{Limits, Policy, QueuedJob, Scheduler};
use comfyume_store::{EnqueueLimits, JobPatch, JobRecord, JobState, NewJob, Store, StoreError};
use serde_json::{Value, json};
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
    /// A task of the queue itself failed (a bug); the job's state is in the store.
    #[error("internal error in the queue: {0}")]
    Internal(String),
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
    /// Claimed jobs' interrupt switches: id -> (owner, switch). Registered with
    /// the claim, so an interrupt reaches a job from the moment it is taken.
    running: Mutex<HashMap<String, (String, watch::Sender<bool>)>>,
    /// Jobs this process has taken (dispatched or running in the store): id ->
    /// the token of the [`Claim`] that holds it.
    claimed: Mutex<HashMap<String, u64>>,
    next_claim: AtomicU64,
    /// Model files each waiting job loads (placement prefers the GPU that has them).
    models: Mutex<HashMap<String, Arc<[String]>>>,
    /// Wakes the reconciler early (after a store error of unknown outcome).
    reconcile_soon: Notify,
    /// The instructor paused dispatch: nothing new is taken (running jobs finish).
    paused: AtomicBool,
    /// Bumped on every change to the queue (a job submitted, taken, finished, cancelled; a
    /// setting changed), for the instructor's dashboard: it re-reads what it shows.
    changes: watch::Sender<u64>,
    /// Bumped when a running job makes progress ([`Self::live`]).
    progress: watch::Sender<u64>,
    /// What each claimed job is doing (node, steps), for the dashboard.
    progress_live: Mutex<HashMap<String, LiveProgress>>,

    /// The latest step of each claimed job that has started an attempt: id -> what a tab
    /// connecting now needs to show its progress (see [`Queue::catch_up`]). Removed with
    /// the job's claim.
    live: Mutex<HashMap<String, Live>>,
}

/// Tabs (client ids) that caught up with one job and follow it; past it, the oldest is dropped.
const MAX_WATCHERS: usize = 32;

/// What a tab that connects while a job runs needs to catch up with it, and who caught up.
#[derive(Debug, Default)]
struct Live {
    user: String,
    /// The id the participant knows the job by.
    prompt_id: String,
    client_id: Option<String>,
    /// The data of the job's `execution_start`, `executing` (a node) and `progress_state`.
    start: Option<Value>,
    executing: Option<Value>,
    progress_state: Option<Value>,
    /// Its ending message passed: nothing more to catch up with.
    ended: bool,
    /// Client ids of other tabs that caught up with it: they get its later steps and end too.
    watchers: Vec<String>,
}

/// A running job's progress as its events tell it.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct LiveProgress {
    /// The node executing now, and its class.
    pub node: Option<String>,
    pub class_type: Option<String>,
    /// Steps of the current node (ComfyUI's `progress`).
    pub value: u64,
    pub max: u64,
    /// Nodes executed or cached so far, of the prompt's nodes.
    pub nodes_done: u64,
    pub nodes_total: u64,
}

/// The instructor's queue settings: what [`Queue::settings`] reports and
/// [`Queue::apply_settings`] restores (the admin API keeps them in the store, so they
/// survive a restart).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct QueueSettings {
    pub policy: Policy,
    pub max_running_per_user: u32,
    pub max_queued_per_user: u32,
    pub max_queue_depth: u32,
    pub paused: bool,
    /// Participants' own levels.
    #[serde(default)]
    pub user_priorities: BTreeMap<String, u8>,
    /// Jobs moved to the front, front-most first.
    #[serde(default)]
    pub front: Vec<String>,
}

/// A job taken by this process: while it lives, the job counts toward its
/// owner's running cap and [`Queue::reconcile`] leaves it alone. Dropping it
/// (on every exit path of the job's task, a panic included) releases both,
/// exactly once.
pub struct Claim {
    queue: Arc<Queue>,
    id: String,
    user: String,
    token: u64,
    interrupt: watch::Receiver<bool>,
}

impl Claim {
    pub fn id(&self) -> &str {
        &self.id
    }
    pub fn user(&self) -> &str {
        &self.user
    }
    /// Turns true when the job's owner (or the server) interrupts it.
    pub fn interrupt(&self) -> watch::Receiver<bool> {
        self.interrupt.clone()
    }
}

impl std::fmt::Debug for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claim")
            .field("id", &self.id)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let q = &self.queue;
        {
            let mut claimed = lock(&q.claimed);
            if claimed.get(&self.id) == Some(&self.token) {
                claimed.remove(&self.id);
                // Only the current claim ends the job's registration: a retry may
                // already run under a newer one.
                lock(&q.running).remove(&self.id);
                lock(&q.live).remove(&self.id);
                lock(&q.progress_live).remove(&self.id);
            }
        }
        q.sched().finished(&self.user);
        q.notify.notify_waiters();
        q.touch();
    }
}

/// What [`Queue::cancel_any`] did, and whose job it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelOutcome {
    /// It was waiting: cancelled.
    Cancelled(String),
    /// It was on a backend: told to stop (it ends as interrupted).
    Interrupted(String),
}

/// What [`Queue::reconcile`] found and did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Reconciled {
    /// Queued in the store, missing from the scheduler: added.
    pub added: Vec<String>,
    /// In the scheduler, but no longer queued in the store: removed.
    pub removed: Vec<String>,
    /// Dispatched or running in the store with nobody in this process on them.
    pub orphans: Vec<JobRecord>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Jobs a participant removed from the queue before they started.
fn cancelled(user: &str, ids: &[String]) {
    for id in ids {
        crate::telemetry::job_finished(JobState::Cancelled);
        tracing::info!(job_id = %id, user = %user, "job cancelled before it started");
    }
}

fn model_list(r: &JobRecord) -> Arc<[String]> {
    Arc::from(comfyume_comfyui::model_files(&r.prompt))
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
        let mut models = HashMap::new();
        for r in store.unfinished_jobs().await? {
            max_seq = max_seq.max(r.seq).max(counter_floor(r.number));
            match r.state {
                JobState::Queued => {
                    models.insert(r.id.clone(), model_list(&r));
                    if let Err(e) = sched.enqueue(queued_job(&r)) {
                        tracing::error!(job_id = %r.id, user = %r.user, error = %e, "could not restore a queued job");
                    }
                }
                // Counted toward their owners' caps once the dispatcher claims them.
                _ => in_flight.push(r),
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
            claimed: Mutex::new(HashMap::new()),
            next_claim: AtomicU64::new(1),
            models: Mutex::new(models),
            reconcile_soon: Notify::new(),
            paused: AtomicBool::new(false),
            changes: watch::Sender::new(0),
            progress: watch::Sender::new(0),
            progress_live: Mutex::new(HashMap::new()),
            live: Mutex::new(HashMap::new()),
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
        self.touch();
    }

    // ---- for the instructor's dashboard and actions (additive) ----

    /// Marks the queue changed (see [`Self::subscribe_changes`]).
    pub fn touch(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver that sees every change to the queue (coalesced: it reads the latest).
    pub fn subscribe_changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// A receiver that sees running jobs' progress (coalesced).
    pub fn subscribe_progress(&self) -> watch::Receiver<u64> {
        self.progress.subscribe()
    }

    /// Updates a claimed job's progress (the dispatcher's relay calls it per event).
    pub fn note_progress(&self, id: &str, update: impl FnOnce(&mut LiveProgress)) {
        {
            // Claimed, then progress: the order a claim's drop takes them in.
            let claimed = lock(&self.claimed);
            if !claimed.contains_key(id) {
                return;
            }
            update(lock(&self.progress_live).entry(id.to_string()).or_default());
        }
        self.progress.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Every claimed job's progress, by id.
    pub fn live_progress(&self) -> HashMap<String, LiveProgress> {
        lock(&self.progress_live).clone()
    }

    /// Stops taking new jobs; running ones finish. Participants can still queue.
    pub fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
        self.touch();
    }

    /// Takes jobs again, at once.
    pub fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
        self.notify.notify_waiters();
        self.touch();
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Puts a waiting job ahead of every other (the scheduler's front list). False if it
    /// is not waiting.
    pub fn move_to_front(&self, id: &str) -> bool {
        let moved = self.sched().move_to_front(id);
        if moved {
            self.notify.notify_waiters();
            self.touch();
        }
        moved
    }

    /// The waiting jobs as the scheduler holds them, in the order they would be served.
    pub fn projected_jobs(&self) -> Vec<comfyume_scheduler::QueuedJob> {
        self.sched()
            .projected_order(now_ms())
            .into_iter()
            .cloned()
            .collect()
    }

    /// The instructor's settings as they are now.
    pub fn settings(&self) -> QueueSettings {
        let l = self.enqueue_limits();
        let s = self.sched();
        QueueSettings {
            policy: s.policy(),
            max_running_per_user: s.limits().max_running_per_user,
            max_queued_per_user: l.max_queued_per_user,
            max_queue_depth: l.max_queue_depth,
            paused: self.is_paused(),
            user_priorities: s.user_priorities(),
            front: s.front().to_vec(),
        }
    }

    /// Restores saved settings (at start). Levels out of range and front entries no
    /// longer waiting are skipped.
    pub fn apply_settings(&self, st: &QueueSettings) {
        {
            let mut s = self.sched();
            s.set_policy(st.policy);
            let mut l = s.limits();
            l.max_running_per_user = st.max_running_per_user;
            s.set_limits(l);
            for (user, level) in &st.user_priorities {
                if s.set_user_priority(user, Some(*level)).is_err() {
                    tracing::warn!(user = %user, level, "ignoring a saved priority level out of range");
                }
            }
            for id in st.front.iter().rev() {
                s.move_to_front(id);
            }
        }
        *lock(&self.limits) = EnqueueLimits {
            max_queued_per_user: st.max_queued_per_user,
            max_queue_depth: st.max_queue_depth,
        };
        self.paused.store(st.paused, Ordering::SeqCst);
        self.notify.notify_waiters();
        self.touch();
    }

    /// Cancels a job for the instructor, whoever owns it: a waiting one is cancelled, a
    /// running one interrupted. `Conflict` once it has ended, `NotFound` for no such job.
    pub async fn cancel_any(&self, id: &str) -> Result<CancelOutcome, QueueError> {
        let rec = self.store.get_job(id).await?.ok_or(StoreError::NotFound)?;
        match rec.state {
            JobState::Queued => {
                // The store cancels by the id its owner knows the job by.
                let known_as = if rec.prompt_id.is_empty() {
                    rec.id.clone()
                } else {
                    rec.prompt_id.clone()
                };
                let removed = self.cancel_queued(&rec.user, &[known_as]).await?;
                if removed.is_empty() {
                    // Taken by a backend meanwhile: stop it there.
                    self.interrupt(&rec.user, Some(id));
                    return Ok(CancelOutcome::Interrupted(rec.user));
                }
                Ok(CancelOutcome::Cancelled(rec.user))
            }
            JobState::Dispatched | JobState::Running => {
                self.interrupt(&rec.user, Some(id));
                Ok(CancelOutcome::Interrupted(rec.user))
            }
            other => Err(QueueError::Store(StoreError::Conflict(format!(
                "job {id} is {other}"
            )))),
        }
    }

    /// Cancels every waiting job of everyone; returns the ids, by participant.
    pub async fn cancel_all_waiting(&self) -> Result<BTreeMap<String, Vec<String>>, QueueError> {
        let users: std::collections::BTreeSet<String> =
            self.projected_jobs().into_iter().map(|j| j.user).collect();
        let mut out = BTreeMap::new();
        for u in users {
            let ids = self.clear_queued(&u).await?;
            if !ids.is_empty() {
                out.insert(u, ids);
            }
        }
        Ok(out)
    }

    /// Commits the job, then makes it schedulable. The store's answer is the
    /// durability point: only after it may the participant hear 200. Runs in a
    /// task of its own, so a caller that goes away (a closed tab) after the job
    /// reached the store cannot leave it committed but unscheduled.
    pub async fn submit(self: &Arc<Self>, job: NewJob) -> Result<JobRecord, QueueError> {
        let me = self.clone();
        // In the caller's span: the "job queued" line keeps the request's id.
        tokio::spawn(tracing::Instrument::in_current_span(async move {
            me.submit_now(job).await
        }))
        .await
        .map_err(|e| {
            self.reconcile_soon.notify_one();
            QueueError::Internal(e.to_string())
        })?
    }

    async fn submit_now(&self, job: NewJob) -> Result<JobRecord, QueueError> {
        let user = job.user.clone();
        let (rec, remaining) = match self.store.enqueue_counted(job, self.enqueue_limits()).await {
            Ok(r) => r,
            Err(e) => {
                if matches!(e, StoreError::Unavailable(_)) {
                    // A timeout may still have committed it: look again soon.
                    self.reconcile_soon.notify_one();
                }
                return Err(e.into());
            }
        };
        lock(&self.models).insert(rec.id.clone(), model_list(&rec));
        if let Err(e) = self.sched().enqueue(queued_job(&rec)) {
            // Only an id the scheduler already holds (a reconcile got there first).
            tracing::debug!(job_id = %rec.id, user = %rec.user, error = %e, "job already scheduled");
        }
        metrics::counter!(crate::telemetry::JOBS_SUBMITTED).increment(1);
        tracing::info!(job_id = %rec.id, user = %rec.user, "job queued");
        self.notify.notify_waiters();
        self.touch();
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
        cancelled(user, &removed);
        {
            let mut s = self.sched();
            for id in &removed {
                s.remove(id);
            }
        }
        if !removed.is_empty() {
            self.touch();
            self.broadcast_status(user).await;
        }
        Ok(removed)
    }

    /// Removes all of the participant's pending jobs (ComfyUI's queue `clear`).
    pub async fn clear_queued(&self, user: &str) -> Result<Vec<String>, QueueError> {
        let removed = self.store.clear_queued(user).await?;
        cancelled(user, &removed);
        {
            let mut s = self.sched();
            for id in &removed {
                s.remove(id);
            }
        }
        if !removed.is_empty() {
            self.touch();
            self.broadcast_status(user).await;
        }
        Ok(removed)
    }

    /// The next job for a free backend slot, claimed and marked `dispatched`
    /// in the store (one transaction: attempt counted, backend recorded);
    /// `None` when nothing may run now (paused, `ready` says no slot, no job may go). `place` gets the job's model files and
    /// names the backend it will run on (`None`: none recorded).
    pub async fn take_next(
        self: &Arc<Self>,
        ready: impl Fn() -> bool,
        place: impl Fn(&[String]) -> Option<String>,
    ) -> Result<Option<(JobRecord, Claim)>, QueueError> {
        loop {
            // Asked before every pick: the backends may have filled up meanwhile.
            if self.is_paused() || !ready() {
                return Ok(None);
            }
            let Some(job) = self.sched().pick(now_ms()) else {
                return Ok(None);
            };
            // Claimed before the store says dispatched, so a reconcile never
            // mistakes it for an orphan.
            let claim = self.claim(&job.id, &job.user);
            let models = lock(&self.models)
                .get(&job.id)
                .cloned()
                .unwrap_or_else(|| Arc::from(Vec::new()));
            let backend = place(&models);
            match self
                .store
                .transition(
                    &job.id,
                    &[JobState::Queued],
                    JobState::Dispatched,
                    JobPatch {
                        attempts_inc: true,
                        backend,
                        ..Default::default()
                    },
                )
                .await
            {
                Ok(rec) => {
                    self.touch();
                    return Ok(Some((rec, claim)));
                }
                // Cancelled between the pick and now: release it, try the next.
                Err(StoreError::Conflict(_)) | Err(StoreError::NotFound) => {
                    lock(&self.models).remove(&job.id);
                    drop(claim);
                }
                Err(e) => {
                    // It may or may not be dispatched now: the reconciler asks the
                    // store. Queued there, it comes back; dispatched, it is an
                    // orphan and is retried. Never both.
                    drop(claim);
                    self.reconcile_soon.notify_one();
                    return Err(e.into());
                }
            }
        }
    }

    /// Claims a job the store already has as dispatched or running (found at
    /// start, or an orphan found by [`Self::reconcile`]): it counts toward its
    /// owner's cap until the claim is dropped.
    pub fn claim_existing(self: &Arc<Self>, rec: &JobRecord) -> Claim {
        self.sched().restore_running(&rec.user);
        self.claim(&rec.id, &rec.user)
    }

    fn claim(self: &Arc<Self>, id: &str, user: &str) -> Claim {
        let token = self.next_claim.fetch_add(1, Ordering::Relaxed);
        let (tx, interrupt) = watch::channel(false);
        lock(&self.claimed).insert(id.to_string(), token);
        lock(&self.running).insert(id.to_string(), (user.to_string(), tx));
        Claim {
            queue: self.clone(),
            id: id.to_string(),
            user: user.to_string(),
            token,
            interrupt,
        }
    }

    /// Whether this process holds a claim on the job.
    pub fn is_claimed(&self, id: &str) -> bool {
        lock(&self.claimed).contains_key(id)
    }

    /// Waits until a job may run (see [`Self::take_next`]). Event-driven (no
    /// polling delay); the timeout only guards against a missed wake-up.
    pub async fn wait_next(
        self: &Arc<Self>,
        ready: impl Fn() -> bool,
        place: impl Fn(&[String]) -> Option<String>,
    ) -> Result<(JobRecord, Claim), QueueError> {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(j) = self.take_next(&ready, &place).await? {
                return Ok(j);
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), notified).await;
        }
    }

    /// Waits until the next reconcile is due: after `every`, or sooner after a
    /// store error whose outcome is unknown.
    pub async fn reconcile_due(&self, every: Duration) {
        let _ = tokio::time::timeout(every, self.reconcile_soon.notified()).await;
    }

    /// Asks for a reconcile soon (after a store error whose outcome is unknown).
    pub fn reconcile_soon(&self) {
        self.reconcile_soon.notify_one();
    }

    /// Brings the scheduler in line with the store (see the module docs).
    /// Orphans are returned unclaimed, for the dispatcher to re-attach or retry.
    pub async fn reconcile(&self) -> Result<Reconciled, QueueError> {
        let unfinished = self.store.unfinished_jobs().await?;
        let mut out = Reconciled::default();
        let mut queued_in_store = HashSet::new();
        let mut stale = Vec::new();
        {
            let claimed = lock(&self.claimed);
            let mut s = self.sched();
            for r in &unfinished {
                if r.state == JobState::Queued {
                    queued_in_store.insert(r.id.as_str());
                    if !s.contains(&r.id) && !claimed.contains_key(&r.id) {
                        lock(&self.models).insert(r.id.clone(), model_list(r));
                        if s.enqueue(queued_job(r)).is_ok() {
                            out.added.push(r.id.clone());
                        }
                    }
                } else if !claimed.contains_key(&r.id) {
                    // A claim is taken before the store says dispatched and held
                    // until the job leaves that state: without one it is nobody's.
                    out.orphans.push(r.clone());
                }
            }
            stale.extend(
                s.queued_ids()
                    .filter(|id| !queued_in_store.contains(id))
                    .map(str::to_owned),
            );
        }
        // Not queued in the snapshot: gone, or submitted after it. Ask once more.
        for id in stale {
            let queued = matches!(
                self.store.get_job(&id).await?,
                Some(r) if r.state == JobState::Queued
            );
            if !queued && self.sched().remove(&id).is_some() {
                lock(&self.models).remove(&id);
                out.removed.push(id);
            }
        }
        if !out.added.is_empty() || !out.removed.is_empty() {
            self.notify.notify_waiters();
            self.touch();
        }
        Ok(out)
    }

    /// Puts a job back for another attempt (keeps its place among its owner's
    /// jobs). Its cap is released by its claim.
    pub fn requeue(&self, rec: &JobRecord) {
        lock(&self.models).insert(rec.id.clone(), model_list(rec));
        if let Err(e) = self.sched().requeue(queued_job(rec)) {
            tracing::error!(job_id = %rec.id, user = %rec.user, error = %e, "could not requeue a job");
        }
        self.notify.notify_waiters();
        self.touch();
    }

    /// A job left the queue for good: forget its placement hint.
    pub fn forget(&self, id: &str) {
        lock(&self.models).remove(id);
        self.touch();
    }

    /// Interrupts `user`'s running job `prompt_id`, or all of `user`'s running
    /// jobs when none is named (a job taken from the queue counts as running
    /// from that moment). Never another participant's. Returns how many.
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

    /// Each participant's queued and running (taken from the queue) jobs, and how long the
    /// oldest waiting job has waited (ms): what the metrics show at each scrape.
    pub fn load(&self) -> (Vec<(String, usize, u32)>, i64) {
        let s = self.sched();
        let users = s
            .user_counts()
            .map(|(u, q, r)| (u.to_owned(), q, r))
            .collect();
        let oldest = s
            .oldest_enqueued_ms()
            .map_or(0, |at| (now_ms() - at).max(0));
        (users, oldest)
    }

    pub fn policy(&self) -> Policy {
        self.sched().policy()
    }

    pub fn set_policy(&self, p: Policy) {
        self.sched().set_policy(p);
        self.notify.notify_waiters();
        self.touch();
    }

    pub fn set_user_priority(&self, user: &str, level: Option<u8>) -> Result<(), QueueError> {
        self.sched()
            .set_user_priority(user, level)
            .map_err(|_| QueueError::InvalidLevel(level.unwrap_or(0)))?;
        self.notify.notify_waiters();
        self.touch();
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
            // Re-inserted with its new level; a job moved to the front stays there.
            let front = s.front().iter().any(|f| f == id);
            if s.remove(id).is_some() {
                let _ = s.enqueue(queued_job(&rec));
                if front {
                    s.move_to_front(id);
                }
            }
        }
        self.notify.notify_waiters();
        self.touch();
        Ok(rec)
    }

    pub fn set_max_running_per_user(&self, n: u32) {
        let mut s = self.sched();
        let mut l = s.limits();
        l.max_running_per_user = n;
        s.set_limits(l);
        drop(s);
        self.notify.notify_waiters();
        self.touch();
    }

    /// A claimed job starts an attempt: from now on its steps are remembered for tabs that
    /// connect while it runs (a retry starts afresh, keeping the tabs that caught up).
    pub fn live_begin(&self, id: &str, user: &str, prompt_id: &str, client_id: Option<&str>) {
        if !self.is_claimed(id) {
            return;
        }
        let mut live = lock(&self.live);
        let e = live.entry(id.to_string()).or_default();
        let watchers = std::mem::take(&mut e.watchers);
        *e = Live {
            user: user.to_string(),
            prompt_id: prompt_id.to_string(),
            client_id: client_id.map(str::to_owned),
            watchers,
            ..Default::default()
        };
    }

    /// Notes a message of a running job (`kind` and its `data`) as its latest step.
    pub fn live_note(&self, id: &str, kind: &str, data: Option<&Value>) {
        let mut live = lock(&self.live);
        let Some(e) = live.get_mut(id) else { return };
        match (kind, data) {
            ("execution_start", Some(d)) => e.start = Some(d.clone()),
            // `executing` with no node is the end marker, never relayed from a backend.
            ("executing", Some(d)) if !d["node"].is_null() => e.executing = Some(d.clone()),
            ("progress_state", Some(d)) => e.progress_state = Some(d.clone()),
            ("execution_success" | "execution_error" | "execution_interrupted", _) => {
                e.ended = true
            }
            _ => {}
        }
    }

    /// Sends `text` about job `id` to its owner's submitting tab `client_id` and to the tabs
    /// that caught up with it since (see [`Self::catch_up`]).
    pub fn send_to_job(&self, id: &str, user: &str, client_id: Option<&str>, text: &str) {
        let watchers = lock(&self.live)
            .get(id)
            .map(|e| e.watchers.clone())
            .unwrap_or_default();
        if let Some(c) = client_id {
            self.events.to_client(user, c, text);
        }
        for w in watchers.iter().filter(|w| Some(w.as_str()) != client_id) {
            self.events.to_client(user, w, text);
        }
    }

    /// What a tab of `user` connecting now (as `client_id`) needs to show their running
    /// jobs as a live tab would: each job's `execution_start`, the node it is executing and
    /// its cumulative `progress_state`, in that order. The tab then gets those jobs' later
    /// steps and ends as well.
    pub fn catch_up(&self, user: &str, client_id: &str) -> Vec<String> {
        let mut live = lock(&self.live);
        let mut mine: Vec<(&String, &mut Live)> = live
            .iter_mut()
            .filter(|(_, e)| e.user == user && !e.ended && e.start.is_some())
            .collect();
        mine.sort_by(|a, b| a.0.cmp(b.0));
        let mut out = Vec::new();
        for (_, e) in mine {
            if e.client_id.as_deref() != Some(client_id)
                && !e.watchers.iter().any(|w| w == client_id)
            {
                // Bounded: a participant reconnecting under ever new ids keeps the latest.
                if e.watchers.len() >= MAX_WATCHERS {
                    e.watchers.remove(0);
                }
                e.watchers.push(client_id.to_string());
            }
            let msg = |kind: &str, data: &Value| {
                let mut data = data.clone();
                if let Some(m) = data.as_object_mut() {
                    m.insert("prompt_id".into(), Value::String(e.prompt_id.clone()));
                }
                json!({"type": kind, "data": data}).to_string()
            };
            for (kind, data) in [
                ("execution_start", &e.start),
                ("executing", &e.executing),
                ("progress_state", &e.progress_state),
            ] {
                if let Some(d) = data {
                    out.push(msg(kind, d));
                }
            }
        }
        out
    }

    /// ComfyUI's `status` message with the participant's own `queue_remaining`,
    /// to all of their tabs.
    pub async fn broadcast_status(&self, user: &str) {
        self.send_status(user, None).await;
    }

    /// [`Self::broadcast_status`] counted in memory (waiting and taken jobs of this
    /// process) instead of read from the store: for the `status` ComfyUI sends just before
    /// a job's `execution_start`, which must not wait behind the database (a job starting
    /// changes no count; the store's own count follows with the next `status`).
    pub fn broadcast_status_now(&self, user: &str) {
        if !self.events.listening(user) {
            return;
        }
        let remaining = {
            let s = self.sched();
            s.queued_for(user) as u64 + u64::from(s.running_for(user))
        };
        let msg = comfyume_wire::shapes::status_message(remaining, None);
        self.events.to_user(user, &msg.to_string());
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

#[cfg(test)]
mod tests {
    //! The live registry: what a tab connecting mid-job is sent, and who then follows the job.
    use super::*;

    /// Every message, with where it went.
    #[derive(Default)]
    struct Sent(Mutex<Vec<(String, String)>>);

    impl EventSink for Sent {
        fn listening(&self, _: &str) -> bool {
            true
        }
        fn to_user(&self, user: &str, text: &str) {
            lock(&self.0).push((format!("{user}/*"), text.to_string()));
        }
        fn to_client(&self, user: &str, client_id: &str, text: &str) -> bool {
            lock(&self.0).push((format!("{user}/{client_id}"), text.to_string()));
            true
        }
        fn preview(&self, _: &str, _: &str, _: bytes::Bytes, _: bytes::Bytes) {}
    }

    async fn queue(sent: Arc<Sent>) -> Arc<Queue> {
        let store = Arc::new(
            comfyume_store::sqlite::SqliteStore::open_in_memory()
                .await
                .unwrap(),
        );
        Queue::open(store, QueueConfig::default(), sent)
            .await
            .unwrap()
            .0
    }

    fn kinds(msgs: &[String]) -> Vec<String> {
        msgs.iter()
            .map(|m| {
                serde_json::from_str::<Value>(m).unwrap()["type"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    }

    #[tokio::test]
    async fn a_tab_catches_up_with_the_latest_step_and_then_follows() {
        let sent = Arc::new(Sent::default());
        let q = queue(sent.clone()).await;
        let claim = q.claim("internal", "u1");
        q.live_begin("internal", "u1", "mine", Some("tab1"));
        // Nothing started yet: nothing to catch up with.
        assert!(q.catch_up("u1", "tab2").is_empty());
        q.live_note(
            "internal",
            "execution_start",
            Some(&json!({"prompt_id": "internal", "timestamp": 5})),
        );
        q.live_note(
            "internal",
            "executing",
            Some(&json!({"node": "3", "prompt_id": "internal"})),
        );
        q.live_note(
            "internal",
            "progress_state",
            Some(&json!({"prompt_id": "internal", "nodes": {"1": {"state": "finished"}}})),
        );
        q.live_note(
            "internal",
            "progress_state",
            Some(&json!({"prompt_id": "internal", "nodes": {"3": {"state": "running"}}})),
        );
        let msgs = q.catch_up("u1", "tab2");
        assert_eq!(
            kinds(&msgs),
            ["execution_start", "executing", "progress_state"]
        );
        for m in &msgs {
            let v: Value = serde_json::from_str(m).unwrap();
            assert_eq!(
                v["data"]["prompt_id"], "mine",
                "named as its owner knows it: {v}"
            );
        }
        let last: Value = serde_json::from_str(&msgs[2]).unwrap();
        assert_eq!(
            last["data"]["nodes"]["3"]["state"], "running",
            "the latest one"
        );
        // Nobody else's tab catches up with it.
        assert!(q.catch_up("u2", "tab2").is_empty());
        // Later steps reach the submitting tab and the one that caught up, once each.
        q.send_to_job("internal", "u1", Some("tab1"), "step");
        q.catch_up("u1", "tab2");
        q.send_to_job("internal", "u1", Some("tab1"), "step2");
        let to: Vec<String> = lock(&sent.0)
            .iter()
            .map(|(t, m)| format!("{t}:{m}"))
            .collect();
        assert_eq!(
            to,
            [
                "u1/tab1:step",
                "u1/tab2:step",
                "u1/tab1:step2",
                "u1/tab2:step2"
            ]
        );
        // Once it ended, a new tab gets nothing; with the claim, the registry forgets it.
        q.live_note("internal", "execution_success", None);
        assert!(q.catch_up("u1", "tab3").is_empty());
        drop(claim);
        assert!(lock(&q.live).is_empty());
    }

    #[test]
    fn watchers_are_bounded() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let q = queue(Arc::new(Sent::default())).await;
            let _claim = q.claim("j", "u1");
            q.live_begin("j", "u1", "j", Some("tab"));
            q.live_note("j", "execution_start", Some(&json!({"prompt_id": "j"})));
            for i in 0..100 {
                q.catch_up("u1", &format!("t{i}"));
            }
            let live = lock(&q.live);
            let w = &live["j"].watchers;
            assert_eq!(w.len(), MAX_WATCHERS);
            assert_eq!(w.last().map(String::as_str), Some("t99"));
        });
    }
}
