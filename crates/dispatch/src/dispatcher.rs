//! The dispatcher: keeps every backend slot busy while work is queued, relays
//! each job's events to its owner, records outcomes, and retries jobs whose
//! GPU server failed (bounded attempts), telling the participant so.
//!
//! Every job runs in a task of its own holding a [`Lease`]: its backend slot
//! and its [`Claim`] (the owner's running cap, the job's registration). The
//! lease is released when the task ends, whichever way: outcome, failure,
//! timeout, or a panic. A job's time on a backend is bounded twice: it must
//! start (ComfyUI's `execution_start`) within `start_timeout`, then end within
//! `job_timeout`; past either, the backend is asked to stop it and given
//! `stop_grace`, after which the attempt is abandoned and the backend told
//! once more, best effort and bounded, so that no GPU keeps running a job we
//! no longer follow.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use comfyume_store::{JobPatch, JobRecord, JobState, StoreError};
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

use crate::backend::{
    Backend, BackendError, BackendEvent, InputFile, JobSpec, Outcome, OutcomeKind,
};
use crate::queue::{Claim, Queue, now_ms};
use crate::telemetry as tm;
use tracing::Instrument;

#[derive(Debug, Clone)]
pub struct DispatchConfig {
    /// `MAX_ATTEMPTS`: tries per job on backends that failed (not on errors of
    /// the workflow itself).
    pub max_attempts: u32,
    /// `JOB_TIMEOUT`: the longest a job may run on a backend, counted from its
    /// `execution_start` (its wait in the backend's own queue excluded).
    pub job_timeout: Duration,
    /// `JOB_START_TIMEOUT`: the longest a job handed to a backend may wait
    /// there before it starts while no other job of ours runs on that backend
    /// (a hung or cold GPU); then it is retried elsewhere.
    pub start_timeout: Duration,
    /// After a timeout, how long a backend gets to stop the job before the
    /// attempt is abandoned.
    pub stop_grace: Duration,
    /// How often the queue is reconciled with the store (also soon after any
    /// store error whose outcome is unknown).
    pub reconcile_every: Duration,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        DispatchConfig {
            max_attempts: 3,
            job_timeout: Duration::from_secs(600),
            start_timeout: Duration::from_secs(600),
            stop_grace: Duration::from_secs(15),
            reconcile_every: Duration::from_secs(30),
        }
    }
}

/// Events a backend may have sent that the job's task has not read yet.
const EVENT_BUFFER: usize = 1024;

struct Slotted {
    backend: Arc<dyn Backend>,
    /// Jobs handed to it and not yet ended.
    active: AtomicUsize,
    /// Of those, the ones that have started (the GPU is on them).
    started: AtomicUsize,
    /// Model files of the last job placed here (loading a model is the
    /// expensive part, so the same models go to the same GPU when possible).
    last_models: Mutex<Vec<String>>,
    /// When a job last failed here through the backend's fault (ms; 0: never,
    /// or a job succeeded since). Such a backend gets work only when no other
    /// is free, so a retry really goes to another GPU.
    failed_at_ms: AtomicI64,
    /// For the instructor's GPU view: latest errors here, and jobs ended here.
    recent_errors: Mutex<std::collections::VecDeque<ErrorNote>>,
    jobs_done: std::sync::atomic::AtomicU64,
    jobs_failed: std::sync::atomic::AtomicU64,
}

/// Errors kept per backend for the GPU view.
const RECENT_ERRORS: usize = 10;

/// An error on a backend, for the GPU view.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ErrorNote {
    pub at_ms: i64,
    pub job_id: String,
    pub user: String,
    pub message: String,
}

impl Slotted {
    fn note_error(&self, rec: &JobRecord, message: &str) {
        self.jobs_failed.fetch_add(1, Ordering::Relaxed);
        let mut e = lock(&self.recent_errors);
        e.push_back(ErrorNote {
            at_ms: now_ms(),
            job_id: rec.id.clone(),
            user: rec.user.clone(),
            message: message.chars().take(300).collect(),
        });
        while e.len() > RECENT_ERRORS {
            e.pop_front();
        }
    }
}

/// How long a backend that failed a job is passed over while others are free.
const FAILED_BACKEND_COOLDOWN_MS: i64 = 30_000;

pub struct Dispatcher {
    queue: Arc<Queue>,
    backends: Vec<Arc<Slotted>>,
    cfg: DispatchConfig,
    data_dir: PathBuf,
    slot_freed: Notify,
}

/// A job's hold on its backend slot and its claim in the queue; dropped
/// (released) exactly once, on whatever path the job's task ends.
struct Lease {
    dispatcher: Arc<Dispatcher>,
    slot: Arc<Slotted>,
    _claim: Claim,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.slot.active.fetch_sub(1, Ordering::SeqCst);
        self.dispatcher.slot_freed.notify_waiters();
        // `_claim` drops after this, releasing the owner's cap.
    }
}

/// Counts a started job on its slot until dropped.
struct StartedMark(Arc<Slotted>);

impl Drop for StartedMark {
    fn drop(&mut self) {
        self.0.started.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How an attempt on a backend ended.
enum Ended {
    /// The backend's own answer.
    Finished(Result<Outcome, BackendError>),
    /// It never started within the start timeout.
    NeverStarted,
    /// It started but did not end within the job timeout; the backend's answer
    /// if it wound down within the grace.
    TimedOut(Option<Result<Outcome, BackendError>>),
}

/// What the dashboard and banner can say about a backend.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackendStatus {
    pub name: String,
    pub slots: usize,
    pub active: usize,
    /// Of the active jobs, those running (the others wait in its own queue).
    pub started: usize,
    /// `ready`, `busy`, or `failing` (a job failed here through its fault lately).
    pub state: String,
    pub jobs_done: u64,
    pub jobs_failed: u64,
    pub recent_errors: Vec<ErrorNote>,
    /// The endpoints behind it, if it has several (see [`Backend::endpoints`]).
    pub endpoints: Vec<crate::backend::EndpointStatus>,
}

impl Dispatcher {
    pub fn new(
        queue: Arc<Queue>,
        backends: Vec<Arc<dyn Backend>>,
        cfg: DispatchConfig,
        data_dir: PathBuf,
    ) -> Arc<Self> {
        Arc::new(Dispatcher {
            queue,
            backends: backends
                .into_iter()
                .map(|backend| {
                    Arc::new(Slotted {
                        backend,
                        active: AtomicUsize::new(0),
                        started: AtomicUsize::new(0),
                        last_models: Mutex::new(Vec::new()),
                        failed_at_ms: AtomicI64::new(0),
                        recent_errors: Mutex::new(Default::default()),
                        jobs_done: Default::default(),
                        jobs_failed: Default::default(),
                    })
                })
                .collect(),
            cfg,
            data_dir,
            slot_freed: Notify::new(),
        })
    }

    pub fn backends(&self) -> Vec<BackendStatus> {
        let now = now_ms();
        self.backends
            .iter()
            .map(|b| {
                let failed = b.failed_at_ms.load(Ordering::SeqCst);
                let started = b.started.load(Ordering::SeqCst);
                let state = if failed > 0 && now - failed < FAILED_BACKEND_COOLDOWN_MS {
                    "failing"
                } else if started > 0 {
                    "busy"
                } else {
                    "ready"
                };
                BackendStatus {
                    name: b.backend.name().to_string(),
                    slots: b.backend.slots(),
                    active: b.active.load(Ordering::SeqCst),
                    started,
                    state: state.into(),
                    jobs_done: b.jobs_done.load(Ordering::Relaxed),
                    jobs_failed: b.jobs_failed.load(Ordering::Relaxed),
                    recent_errors: lock(&b.recent_errors).iter().cloned().collect(),
                    endpoints: b.backend.endpoints(),
                }
            })
            .collect()
    }

    /// Sets the backend gauges (slots, slots in use, state); called at each metrics scrape.
    pub fn record_metrics(&self) {
        let now = now_ms();
        for b in &self.backends {
            let name = b.backend.name();
            metrics::gauge!(tm::BACKEND_SLOTS, "backend" => name.to_owned())
                .set(b.backend.slots() as f64);
            metrics::gauge!(tm::BACKEND_SLOTS_IN_USE, "backend" => name.to_owned())
                .set(b.active.load(Ordering::SeqCst) as f64);
            let failed = b.failed_at_ms.load(Ordering::SeqCst);
            let failing = failed > 0 && now - failed < FAILED_BACKEND_COOLDOWN_MS;
            tm::backend_state(name, if failing { "failing" } else { "ready" });
        }
    }

    /// The backends themselves (to refresh node definitions from one).
    pub fn backend_handles(&self) -> Vec<Arc<dyn Backend>> {
        self.backends.iter().map(|b| b.backend.clone()).collect()
    }

    /// Starts the dispatch loop and the reconciler (both supervised: restarted
    /// if they ever end), after taking over the jobs a previous process left
    /// dispatched or running.
    pub fn start(self: &Arc<Self>, in_flight: Vec<JobRecord>) -> tokio::task::JoinHandle<()> {
        for rec in in_flight {
            self.adopt(rec, "the server restarted before the job started");
        }
        let me = self.clone();
        supervise("reconciler", move || {
            let me = me.clone();
            async move { me.reconcile_loop().await }
        });
        let me = self.clone();
        supervise("dispatch loop", move || {
            let me = me.clone();
            async move { me.run_loop().await }
        })
    }

    /// Takes over a job the store has as dispatched or running but that no
    /// task follows (left by a previous process, or found by a reconcile):
    /// re-attached where it was sent, else queued again.
    fn adopt(self: &Arc<Self>, rec: JobRecord, why: &str) {
        let claim = self.queue.claim_existing(&rec);
        match self
            .backends
            .iter()
            .find(|b| Some(b.backend.name()) == rec.backend.as_deref())
            .cloned()
        {
            Some(slot) => {
                tracing::info!(job_id = %rec.id, user = %rec.user, backend = %slot.backend.name(), attempt = rec.attempts, "re-attaching a job");
                slot.active.fetch_add(1, Ordering::SeqCst);
                let lease = Lease {
                    dispatcher: self.clone(),
                    slot,
                    _claim: claim,
                };
                self.spawn_job(lease, rec, true);
            }
            None => {
                let me = self.clone();
                let why = why.to_string();
                let span = job_span(&rec, rec.backend.as_deref().unwrap_or("none"));
                tokio::spawn(
                    async move {
                        me.retry_or_fail(rec, why).await;
                        drop(claim);
                    }
                    .instrument(span),
                );
            }
        }
    }

    async fn reconcile_loop(self: &Arc<Self>) {
        // Reconciles that keep finding trouble (a store that cannot be written: every
        // orphan adopted fails to record again) back off, up to `reconcile_every`,
        // instead of spinning; a clean one resets the pace.
        let mut gap = RECONCILE_MIN_GAP;
        loop {
            self.queue.reconcile_due(self.cfg.reconcile_every).await;
            let troubled = match self.queue.reconcile().await {
                Ok(r) => {
                    let troubled = !r.orphans.is_empty();
                    if !r.added.is_empty() || !r.removed.is_empty() || !r.orphans.is_empty() {
                        tracing::warn!(
                            added = ?r.added,
                            removed = ?r.removed,
                            orphans = ?r.orphans.iter().map(|o| &o.id).collect::<Vec<_>>(),
                            "the queue disagreed with the store; brought in line"
                        );
                    }
                    for rec in r.orphans {
                        self.adopt(rec, "the server lost track of the job");
                    }
                    troubled
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not reconcile the queue with the store; retrying soon");
                    self.queue.reconcile_soon();
                    true
                }
            };
            gap = if troubled {
                (gap * 2).min(self.cfg.reconcile_every.max(RECONCILE_MIN_GAP))
            } else {
                RECONCILE_MIN_GAP
            };
            tokio::time::sleep(gap).await;
        }
    }

    async fn run_loop(self: &Arc<Self>) {
        if self.backends.is_empty() {
            tracing::warn!("no backend configured: jobs stay queued");
            std::future::pending::<()>().await;
        }
        loop {
            // Take a job only when a slot is free, so the scheduler decides at
            // the last moment (a participant who arrives now is considered).
            loop {
                let freed = self.slot_freed.notified();
                tokio::pin!(freed);
                freed.as_mut().enable();
                if !self.eligible(now_ms()).is_empty() {
                    break;
                }
                // Also wakes when a failed backend's cooldown ends.
                let _ = tokio::time::timeout(Duration::from_secs(1), freed).await;
            }
            // The backend is chosen before the job is marked dispatched, so one
            // transaction records both.
            let chosen: Mutex<Option<(Arc<Slotted>, Vec<String>)>> = Mutex::new(None);
            let place = |models: &[String]| {
                let slot = self.choose(models);
                let name = slot.backend.name().to_string();
                *lock(&chosen) = Some((slot, models.to_vec()));
                Some(name)
            };
            let ready = || !self.eligible(now_ms()).is_empty();
            let (rec, claim) = match self.queue.wait_next(ready, place).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "could not take the next job; retrying shortly");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            let Some((slot, models)) = lock(&chosen).take() else {
                let span = job_span(&rec, "none");
                span.in_scope(|| {
                    tracing::error!("a job was taken without a backend; queueing it again")
                });
                let me = self.clone();
                tokio::spawn(
                    async move {
                        me.retry_or_fail(rec, "internal error in the dispatcher".into())
                            .await;
                        drop(claim);
                    }
                    .instrument(span),
                );
                continue;
            };
            slot.active.fetch_add(1, Ordering::SeqCst);
            *lock(&slot.last_models) = models;
            let lease = Lease {
                dispatcher: self.clone(),
                slot,
                _claim: claim,
            };
            self.spawn_job(lease, rec, false);
        }
    }

    /// The backends a job may go to now: those with a free slot that have not
    /// failed a job lately. While any backend is in good standing, a failed one
    /// gets nothing (a job waits for a healthy slot rather than spend its attempts
    /// on a dead server in milliseconds); when every backend has failed lately,
    /// each takes one job at a time to probe it.
    fn eligible(&self, now: i64) -> Vec<Arc<Slotted>> {
        let suspect = |b: &Slotted| {
            let failed = b.failed_at_ms.load(Ordering::SeqCst);
            failed > 0 && now - failed < FAILED_BACKEND_COOLDOWN_MS
        };
        let free = |b: &&Arc<Slotted>| b.active.load(Ordering::SeqCst) < b.backend.slots();
        let healthy: Vec<Arc<Slotted>> = self
            .backends
            .iter()
            .filter(free)
            .filter(|b| !suspect(b))
            .cloned()
            .collect();
        if !healthy.is_empty() || self.backends.iter().any(|b| !suspect(b)) {
            return healthy;
        }
        self.backends
            .iter()
            .filter(|b| b.active.load(Ordering::SeqCst) == 0 && b.backend.slots() > 0)
            .cloned()
            .collect()
    }

    /// Among the eligible backends, the least busy, then the one that last ran
    /// the same model files (they are still in its memory).
    fn choose(&self, models: &[String]) -> Arc<Slotted> {
        let rank = |b: &&Arc<Slotted>| {
            let same = !models.is_empty() && *lock(&b.last_models) == models;
            (b.active.load(Ordering::SeqCst), !same)
        };
        let eligible = self.eligible(now_ms());
        eligible
            .iter()
            .min_by_key(rank)
            // Only if a slot went elsewhere since the dispatch loop looked.
            .or_else(|| self.backends.iter().min_by_key(rank))
            .cloned()
            .expect("at least one backend")
    }

    /// Runs one job in its own task. The lease is released however the task
    /// ends; a panic is contained and the job recorded as failed, not stuck.
    fn spawn_job(self: &Arc<Self>, lease: Lease, rec: JobRecord, reattach: bool) {
        let me = self.clone();
        let backend = lease.slot.backend.name().to_string();
        // Every line about this attempt, the backend client's included, carries the
        // job's id, owner, backend and attempt (see docs/monitoring.md).
        let span = job_span(&rec, &backend);
        if !reattach {
            metrics::counter!(tm::DISPATCH_ATTEMPTS, "backend" => backend.clone()).increment(1);
        }
        let inner_span = span.clone();
        tokio::spawn(
            async move {
                let owner = Owner::of(&rec);
                let inner = me.clone();
                let res = tokio::spawn(
                    async move { inner.run_job(lease, rec, reattach).await }.instrument(inner_span),
                )
                .await;
                if let Err(e) = res {
                    tracing::error!(error = %e, "job task crashed");
                    metrics::counter!(tm::DISPATCH_FAILURES, "backend" => backend, "reason" => "crashed")
                        .increment(1);
                    let _ = me
                        .finish_failed(
                            &owner,
                            "internal error in the dispatcher",
                            "ComfyUMe.InternalError",
                        )
                        .await;
                }
            }
            .instrument(span),
        );
    }

    /// The participant's files the prompt may name: inputs (`x.png`, `x.png [input]`), and
    /// results reused as inputs (`video/x.png [output]`, kept whole as the name: the
    /// backend client uploads them apart from the inputs). Each is only a candidate until
    /// [`existing`] finds it on disk.
    fn input_candidates(&self, rec: &JobRecord) -> Vec<InputFile> {
        let base = self.data_dir.join("inputs").join(&rec.user);
        let outputs = self.data_dir.join("outputs").join(&rec.user);
        let mut out: Vec<InputFile> = Vec::new();
        let Some(nodes) = rec.prompt.as_object() else {
            return out;
        };
        for node in nodes.values() {
            let Some(inputs) = node.get("inputs").and_then(Value::as_object) else {
                continue;
            };
            for v in inputs.values() {
                let Some(s) = v.as_str() else { continue };
                let (rel, local_base, name) = match s.strip_suffix(" [output]") {
                    Some(rel) => (rel, &outputs, s),
                    None => {
                        let n = s.strip_suffix(" [input]").unwrap_or(s);
                        (n, &base, n)
                    }
                };
                if rel.is_empty()
                    || rel.contains("..")
                    || rel.starts_with('/')
                    || rel.contains('\\')
                    || out.iter().any(|f| f.name == name)
                {
                    continue;
                }
                out.push(InputFile {
                    local: local_base.join(rel),
                    name: name.to_string(),
                });
            }
        }
        out
    }

    async fn run_job(self: Arc<Self>, lease: Lease, rec: JobRecord, reattach: bool) {
        let backend = lease.slot.backend.clone();
        let (id, user) = (rec.id.clone(), rec.user.clone());
        let data_dir = self.data_dir.clone();
        // Only the candidates go to the blocking pool, not a copy of the whole prompt.
        let candidates = self.input_candidates(&rec);
        // Most prompts name no file of the participant: no trip to the blocking pool then.
        let inputs = if candidates.is_empty() {
            Vec::new()
        } else {
            tokio::task::spawn_blocking(move || existing(candidates))
                .await
                .unwrap_or_default()
        };
        let spec = JobSpec {
            id: id.clone(),
            user: user.clone(),
            prompt: rec.prompt.clone(),
            extra_data: rec.extra_data.clone(),
            outputs_to_execute: rec.outputs_to_execute.clone(),
            inputs,
            output_dir: data_dir.join("outputs").join(&user),
            temp_dir: data_dir.join("temp").join(&user),
            attempt: rec.attempts.max(1),
            reattach,
        };
        if reattach {
            tracing::info!("job re-attached on its backend");
        } else {
            tracing::info!(
                waited_ms = (now_ms() - rec.created_at_ms).max(0),
                "job handed to its backend"
            );
        }
        let (ended, relayed_end) = self.attempt(&lease, &rec, spec).await;
        let failed = |reason: &'static str| {
            metrics::counter!(tm::DISPATCH_FAILURES, "backend" => backend.name().to_owned(), "reason" => reason)
                .increment(1);
        };
        // A job that succeeded within the grace after its timeout keeps its result.
        let ended = match ended {
            Ended::TimedOut(Some(Ok(o))) if o.kind == OutcomeKind::Success => {
                Ended::Finished(Ok(o))
            }
            other => other,
        };
        match ended {
            Ended::Finished(Ok(outcome)) => {
                lease.slot.failed_at_ms.store(0, Ordering::SeqCst);
                match &outcome.kind {
                    OutcomeKind::ExecutionError(data) => lease.slot.note_error(
                        &rec,
                        data["exception_message"]
                            .as_str()
                            .unwrap_or("execution error"),
                    ),
                    _ => {
                        lease.slot.jobs_done.fetch_add(1, Ordering::Relaxed);
                    }
                }
                let _ = self.finish(&rec, outcome, relayed_end).await;
            }
            Ended::Finished(Err(e)) if e.retryable() => {
                lease.slot.failed_at_ms.store(now_ms(), Ordering::SeqCst);
                failed(error_reason(&e));
                lease.slot.note_error(&rec, &e.to_string());
                tracing::warn!(error = %e, "backend failed the job");
                // It may still run there (a lost socket, a /prompt that timed
                // out after all): stop it before it runs anywhere else.
                stop_on(&backend, &id, self.cfg.stop_grace).await;
                self.retry_or_fail(rec, e.to_string()).await;
            }
            Ended::Finished(Err(e)) => {
                failed(error_reason(&e));
                let (detail, kind) = match &e {
                    BackendError::Rejected(body) => (
                        body["error"]["message"]
                            .as_str()
                            .unwrap_or("the workflow was refused")
                            .to_string(),
                        "ComfyUMe.BackendRejected",
                    ),
                    // Not the GPU's fault: the slot stays in good standing.
                    BackendError::Storage(_) => (
                        format!("{e}. Ask the instructor: the workshop server's disk may be full."),
                        "ComfyUMe.OutputNotSaved",
                    ),
                    other => (other.to_string(), "ComfyUMe.BackendRejected"),
                };
                tracing::warn!(error = %e, "the job failed for good");
                lease.slot.note_error(&rec, &detail);
                let _ = self.finish_failed(&Owner::of(&rec), &detail, kind).await;
            }
            Ended::NeverStarted => {
                lease.slot.failed_at_ms.store(now_ms(), Ordering::SeqCst);
                failed("never_started");
                tracing::warn!("the backend did not start the job in time");
                let reason = format!(
                    "{} did not start the job within {} s",
                    backend.name(),
                    self.cfg.start_timeout.as_secs()
                );
                lease.slot.note_error(&rec, &reason);
                self.retry_or_fail(rec, reason).await;
            }
            Ended::TimedOut(_) => {
                failed("job_timeout");
                tracing::warn!("the job ran longer than JOB_TIMEOUT");
                let msg = format!(
                    "The job ran longer than the workshop's limit ({} s) and was stopped.",
                    self.cfg.job_timeout.as_secs()
                );
                lease.slot.note_error(&rec, &msg);
                let _ = self
                    .finish_failed(&Owner::of(&rec), &msg, "ComfyUMe.JobTimeout")
                    .await;
            }
        }
        drop(lease);
    }

    /// One attempt on the lease's backend, bounded by the start and job
    /// timeouts. Returns how it ended and whether ComfyUI's ending message was
    /// relayed to the owner.
    async fn attempt(&self, lease: &Lease, rec: &JobRecord, spec: JobSpec) -> (Ended, bool) {
        let backend = lease.slot.backend.clone();
        let (tx, mut rx) = mpsc::channel(EVENT_BUFFER);
        let interrupt = lease._claim.interrupt();
        let mut run = Box::pin(backend.run(spec, tx, interrupt));
        let mut relay = Relay::new(&self.queue, rec, backend.name());
        let mut mark = None;
        // When execution started here (for the run time histogram).
        let mut run_started = None;
        // A job re-attached while running keeps the clock it started with.
        let mut deadline = match (rec.state, rec.started_at_ms) {
            (JobState::Running, Some(at)) => {
                mark = Some(self.mark_started(&lease.slot));
                let ran = Duration::from_millis((now_ms() - at).max(0) as u64);
                run_started = Some(Instant::now() - ran);
                Instant::now() + self.cfg.job_timeout.saturating_sub(ran)
            }
            _ => Instant::now() + self.cfg.start_timeout,
        };
        let ended = loop {
            tokio::select! {
                res = &mut run => break Ended::Finished(res),
                Some(ev) = rx.recv() => {
                    if matches!(ev, BackendEvent::Started) && mark.is_none() {
                        mark = Some(self.mark_started(&lease.slot));
                        run_started = Some(Instant::now());
                        deadline = Instant::now() + self.cfg.job_timeout;
                        let waited = (now_ms() - rec.created_at_ms).max(0) as f64 / 1000.0;
                        metrics::histogram!(tm::JOB_WAIT, "backend" => backend.name().to_owned())
                            .record(waited);
                        tracing::info!(waited_ms = (waited * 1000.0) as i64, "job started");
                    }
                    relay.handle(ev).await;
                }
                _ = tokio::time::sleep_until(deadline) => {
                    if mark.is_some() {
                        break Ended::TimedOut(None);
                    }
                    // Waiting behind another of our jobs on this GPU is not a hang.
                    if lease.slot.started.load(Ordering::SeqCst) > 0 {
                        deadline = Instant::now() + self.cfg.start_timeout;
                        continue;
                    }
                    break Ended::NeverStarted;
                }
            }
        };
        if let Some(t) = run_started {
            metrics::histogram!(tm::JOB_RUN, "backend" => backend.name().to_owned())
                .record(t.elapsed().as_secs_f64());
        }
        let ended = match ended {
            Ended::Finished(res) => {
                // The run is over and its sender gone: what it sent is all here.
                while let Ok(ev) = rx.try_recv() {
                    relay.handle(ev).await;
                }
                Ended::Finished(res)
            }
            timed_out => {
                // Ask the backend to stop it, and give it a moment to wind down.
                // A job that never started is retried: nothing of this attempt
                // reaches the participant any more.
                let relaying = matches!(timed_out, Ended::TimedOut(_));
                self.queue.interrupt(&rec.user, Some(&rec.id));
                let grace = tokio::time::sleep(self.cfg.stop_grace);
                tokio::pin!(grace);
                let wound_down = loop {
                    tokio::select! {
                        res = &mut run => break Some(res),
                        Some(ev) = rx.recv() => if relaying { relay.handle(ev).await },
                        _ = &mut grace => break None,
                    }
                };
                // Abandoned: dropping the run closes its socket and stops its reader.
                drop(run);
                if wound_down.is_none() {
                    // Told again in the background until it confirms (a hung backend
                    // that recovers must not run the job we gave up on): the slot and
                    // the owner's cap are free at once.
                    let (id, grace) = (rec.id.clone(), self.cfg.stop_grace);
                    tokio::spawn(
                        async move { stop_until_confirmed(&backend, &id, grace).await }
                            .in_current_span(),
                    );
                }
                match timed_out {
                    Ended::TimedOut(_) => Ended::TimedOut(wound_down),
                    other => other,
                }
            }
        };
        (ended, relay.ended)
    }

    fn mark_started(&self, slot: &Arc<Slotted>) -> StartedMark {
        slot.started.fetch_add(1, Ordering::SeqCst);
        StartedMark(slot.clone())
    }

    /// Another attempt on another slot, or, after the last one, a failure with
    /// a readable reason.
    async fn retry_or_fail(&self, rec: JobRecord, reason: String) {
        let (id, user) = (rec.id.clone(), rec.user.clone());
        if rec.attempts < self.cfg.max_attempts {
            let next = rec.attempts + 1;
            match self
                .queue
                .store()
                .transition(
                    &id,
                    &[JobState::Dispatched, JobState::Running],
                    JobState::Queued,
                    JobPatch {
                        error: Some(json!({"retry_reason": reason})),
                        ..Default::default()
                    },
                )
                .await
            {
                Ok(r) => {
                    let on = rec.backend.as_deref().unwrap_or("none").to_owned();
                    metrics::counter!(tm::DISPATCH_RETRIES, "backend" => on).increment(1);
                    tracing::info!(next_attempt = next, reason = %reason, "job queued again for another attempt");
                    notice(
                        &self.queue,
                        &user,
                        public_id(&rec),
                        &format!(
                            "{reason}. Retrying on another GPU (attempt {next} of {}).",
                            self.cfg.max_attempts
                        ),
                    );
                    self.queue.requeue(&r);
                    self.queue.broadcast_status(&user).await;
                }
                Err(e) => {
                    tracing::error!(error = %e, "could not requeue a job");
                    self.queue.reconcile_soon();
                }
            }
        } else {
            let msg = format!("{reason}. Gave up after {} attempts.", rec.attempts);
            let _ = self
                .finish_failed(&Owner::of(&rec), &msg, "ComfyUMe.BackendFailed")
                .await;
        }
    }

    /// Records a backend outcome, then tells the owner's sockets (ComfyUI's
    /// order: the outcome message unless the relay already passed it on,
    /// `status`, then the `executing: null` end marker).
    async fn finish(
        &self,
        rec: &JobRecord,
        outcome: Outcome,
        relayed_end: bool,
    ) -> Result<(), StoreError> {
        let (state, error) = match &outcome.kind {
            OutcomeKind::Success => (JobState::Succeeded, Some(Value::Null)),
            OutcomeKind::ExecutionError(data) => (JobState::Failed, Some(data.clone())),
            OutcomeKind::Interrupted(data) => (JobState::Interrupted, Some(data.clone())),
        };
        // Learnt from history after a gap in the events (a dropped socket, a
        // re-attach): the frontend still needs to hear how the job ended.
        let owner = Owner::of(rec);
        let missed_end = (!relayed_end).then(|| end_message(&owner.prompt_id, &outcome));
        let res = self
            .queue
            .store()
            .transition(
                &rec.id,
                &[JobState::Dispatched, JobState::Running],
                state,
                JobPatch {
                    finished_at_ms: Some(now_ms()),
                    // Normally already set when execution started; a job collected
                    // from history after a restart takes ComfyUI's own timestamp.
                    started_at_ms: execution_start_ms(&outcome.messages),
                    error,
                    outputs: Some(Value::Object(outcome.outputs)),
                    messages: Some(Value::Array(outcome.messages)),
                    meta: Some(Value::Object(outcome.meta)),
                    ..Default::default()
                },
            )
            .await;
        self.recorded(&rec.id, &rec.user, &res);
        if res.is_ok() {
            tm::job_finished(state);
            tracing::info!(outcome = state.as_str(), "job finished");
        }
        if let Some(msg) = missed_end {
            self.queue.send_to_job(
                &rec.id,
                &rec.user,
                rec.client_id.as_deref(),
                &msg.to_string(),
            );
        }
        self.end_marker(&owner).await;
        res.map(|_| ())
    }

    /// After a job's last transition: it leaves the queue for good, or, if the
    /// store's answer is unknown, the reconciler finds out what it holds.
    fn recorded(&self, id: &str, user: &str, res: &Result<JobRecord, StoreError>) {
        match res {
            Ok(_) | Err(StoreError::Conflict(_)) | Err(StoreError::NotFound) => {
                self.queue.forget(id)
            }
            Err(e) => {
                tracing::error!(job_id = %id, user = %user, error = %e, "could not record a job's outcome");
                self.queue.reconcile_soon();
            }
        }
    }

    async fn finish_failed(
        &self,
        owner: &Owner,
        message: &str,
        exception_type: &str,
    ) -> Result<(), StoreError> {
        let (id, user, client_id) = (
            owner.id.as_str(),
            owner.user.as_str(),
            owner.client_id.as_deref(),
        );
        let data = json!({
            "prompt_id": owner.prompt_id,
            "node_id": null,
            "node_type": null,
            "executed": [],
            "exception_message": message,
            "exception_type": exception_type,
            "traceback": [],
            "current_inputs": {},
            "current_outputs": [],
            "timestamp": now_ms(),
        });
        let res = self
            .queue
            .store()
            .transition(
                id,
                &[JobState::Queued, JobState::Dispatched, JobState::Running],
                JobState::Failed,
                JobPatch {
                    finished_at_ms: Some(now_ms()),
                    error: Some(data.clone()),
                    messages: Some(json!([["execution_error", data.clone()]])),
                    ..Default::default()
                },
            )
            .await;
        self.recorded(id, user, &res);
        let msg = json!({"type": "execution_error", "data": data});
        self.queue
            .send_to_job(id, user, client_id, &msg.to_string());
        if res.is_ok() {
            tm::job_finished(JobState::Failed);
            tracing::info!(outcome = "failed", reason = %message, "job finished");
        }
        self.end_marker(owner).await;
        res.map(|_| ())
    }

    /// `status`, then the `executing: null` end marker to the job's tabs.
    async fn end_marker(&self, owner: &Owner) {
        self.queue.broadcast_status(&owner.user).await;
        let end =
            json!({"type": "executing", "data": {"node": null, "prompt_id": owner.prompt_id}});
        self.queue.send_to_job(
            &owner.id,
            &owner.user,
            owner.client_id.as_deref(),
            &end.to_string(),
        );
    }
}

/// The candidates that are files.
fn existing(mut candidates: Vec<InputFile>) -> Vec<InputFile> {
    candidates.retain(|f| f.local.is_file());
    candidates
}

/// The span every log line about one attempt of a job runs in.
fn job_span(rec: &JobRecord, backend: &str) -> tracing::Span {
    tracing::info_span!(
        "job",
        job_id = %rec.id,
        user = %rec.user,
        backend = %backend,
        attempt = rec.attempts,
    )
}

/// The `reason` label of a backend's error.
fn error_reason(e: &BackendError) -> &'static str {
    match e {
        BackendError::Unreachable(_) => "unreachable",
        BackendError::Lost(_) => "lost",
        BackendError::Timeout(_) => "timeout",
        BackendError::Protocol(_) => "protocol",
        BackendError::Rejected(_) => "rejected",
        BackendError::Storage(_) => "storage",
    }
}

/// Between two reconciles at least this long (and twice as long after each troubled one).
const RECONCILE_MIN_GAP: Duration = Duration::from_secs(1);
/// How long an abandoned job is asked to stop before we give up asking.
const STOP_RETRY_FOR: Duration = Duration::from_secs(15 * 60);

/// [`stop_on`] again and again (5 s, 10 s, ... 60 s apart) until the backend
/// confirms, for at most [`STOP_RETRY_FOR`].
async fn stop_until_confirmed(backend: &Arc<dyn Backend>, id: &str, limit: Duration) {
    let until = tokio::time::Instant::now() + STOP_RETRY_FOR;
    let mut pause = Duration::from_secs(5);
    while tokio::time::Instant::now() < until {
        if matches!(
            tokio::time::timeout(limit, backend.stop(id)).await,
            Ok(Ok(()))
        ) {
            return;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(60));
    }
    tracing::warn!(job_id = %id, backend = %backend.name(), "the backend never confirmed that an abandoned job stopped");
}

/// Tells a backend, best effort and bounded, to stop a job we no longer follow.
async fn stop_on(backend: &Arc<dyn Backend>, id: &str, limit: Duration) {
    match tokio::time::timeout(limit, backend.stop(id)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(job_id = %id, backend = %backend.name(), error = %e, "could not stop the job on the backend")
        }
        Err(_) => {
            tracing::warn!(job_id = %id, backend = %backend.name(), "the backend did not confirm the job stopped in time")
        }
    }
}

/// Runs a task for the life of the process: restarted (after a pause) if it
/// ends or panics, and logged each time.
pub fn supervise<F, Fut>(what: &'static str, make: F) -> tokio::task::JoinHandle<()>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            match tokio::spawn(make()).await {
                Ok(()) => tracing::error!(task = what, "background task ended; restarting it"),
                Err(e) => {
                    tracing::error!(task = what, error = %e, "background task crashed; restarting it")
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// ComfyUI's message for how a job ended (`execution_success`,
/// `execution_error` or `execution_interrupted`).
fn end_message(id: &str, outcome: &Outcome) -> Value {
    let (kind, data) = match &outcome.kind {
        OutcomeKind::Success => {
            let recorded = outcome.messages.iter().find_map(|m| {
                let a = m.as_array()?;
                (a.first()?.as_str()? == "execution_success").then(|| a.get(1).cloned())?
            });
            (
                "execution_success",
                recorded.unwrap_or_else(|| json!({"prompt_id": id, "timestamp": now_ms()})),
            )
        }
        OutcomeKind::ExecutionError(data) => ("execution_error", data.clone()),
        OutcomeKind::Interrupted(data) => ("execution_interrupted", data.clone()),
    };
    json!({"type": kind, "data": data})
}

/// Whether a relayed message is one of ComfyUI's job-ending messages.
fn is_end_message(kind: &str) -> bool {
    matches!(
        kind,
        "execution_success" | "execution_error" | "execution_interrupted"
    )
}

/// The `execution_start` timestamp among ComfyUI's status messages.
fn execution_start_ms(messages: &[Value]) -> Option<i64> {
    messages.iter().find_map(|m| {
        let a = m.as_array()?;
        (a.first()?.as_str()? == "execution_start").then(|| a.get(1)?.get("timestamp")?.as_i64())?
    })
}

/// The id a job's owner knows it by (see [`JobRecord::prompt_id`]): every message to the
/// participant names the job by it, while the store and the backends use `rec.id`.
fn public_id(rec: &JobRecord) -> &str {
    if rec.prompt_id.is_empty() {
        &rec.id
    } else {
        &rec.prompt_id
    }
}

/// Who is told about a job's end: its ids and its owner's tab.
struct Owner {
    id: String,
    prompt_id: String,
    user: String,
    client_id: Option<String>,
}

impl Owner {
    fn of(rec: &JobRecord) -> Owner {
        Owner {
            id: rec.id.clone(),
            prompt_id: public_id(rec).to_string(),
            user: rec.user.clone(),
            client_id: rec.client_id.clone(),
        }
    }
}

/// ComfyUI messages name the job by `data.prompt_id` (and `progress_state` each node by
/// `data.nodes.*.prompt_id`); the participant's copy names it by the id they know (only
/// differs when another job had their chosen id first).
fn to_public(v: &mut Value, internal: &str, public: &str) {
    if internal == public {
        return;
    }
    let swap = |p: Option<&mut Value>| {
        if let Some(p) = p
            && p.as_str() == Some(internal)
        {
            *p = Value::String(public.to_string());
        }
    };
    let Some(data) = v.get_mut("data") else {
        return;
    };
    swap(data.get_mut("prompt_id"));
    if let Some(nodes) = data.get_mut("nodes").and_then(Value::as_object_mut) {
        for node in nodes.values_mut() {
            swap(node.get_mut("prompt_id"));
        }
    }
}

/// [`to_public`] for a type-4 preview frame's metadata.
fn frame_to_public(frame: Bytes, internal: &str, public: &str) -> Bytes {
    use comfyume_wire::shapes::ws::BinaryFrame;
    if internal == public {
        return frame;
    }
    match BinaryFrame::decode(&frame) {
        Ok(BinaryFrame::PreviewImageWithMetadata {
            mut metadata,
            image,
        }) if metadata.get("prompt_id").and_then(Value::as_str) == Some(internal) => {
            metadata["prompt_id"] = Value::String(public.to_string());
            Bytes::from(BinaryFrame::PreviewImageWithMetadata { metadata, image }.encode())
        }
        _ => frame,
    }
}

/// A plain message for the participant's banner (our own message type; the
/// stock frontend ignores types it does not know).
fn notice(queue: &Queue, user: &str, id: &str, text: &str) {
    let msg = json!({"type": "comfyume", "data": {"message": text, "prompt_id": id}});
    queue.events().to_user(user, &msg.to_string());
}

/// Forwards a job's events to its owner's sockets, as ComfyUI routes them:
/// execution messages to the submitting client only; `progress_state` to all
/// of the owner's tabs. Remembers whether the job's ending message was among them,
/// and (in the queue's live registry) the job's latest step, for tabs that connect
/// while it runs. Messages name the job by the id its owner knows.
struct Relay {
    queue: Arc<Queue>,
    id: String,
    prompt_id: String,
    user: String,
    client_id: Option<String>,
    backend: String,
    ended: bool,
    /// The prompt's node classes (node id -> class), for the dashboard's progress.
    classes: HashMap<String, String>,
    /// "Running on …", held until the event after `Started` has been relayed.
    running_notice: Option<String>,
}

impl Relay {
    fn new(queue: &Arc<Queue>, rec: &JobRecord, backend: &str) -> Self {
        queue.live_begin(&rec.id, &rec.user, public_id(rec), rec.client_id.as_deref());
        Relay {
            queue: queue.clone(),
            id: rec.id.clone(),
            prompt_id: public_id(rec).to_string(),
            user: rec.user.clone(),
            client_id: rec.client_id.clone(),
            backend: backend.to_string(),
            ended: false,
            running_notice: None,
            classes: rec
                .prompt
                .as_object()
                .map(|m| {
                    m.iter()
                        .filter_map(|(k, v)| {
                            Some((k.clone(), v["class_type"].as_str()?.to_string()))
                        })
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    /// Keeps the job's progress for the instructor's dashboard.
    fn note_progress(&self, kind: &str, data: &Value) {
        let total = self.classes.len() as u64;
        match kind {
            "execution_start" => self.queue.note_progress(&self.id, |p| {
                p.nodes_total = total;
            }),
            "executing" => {
                let node = data["node"].as_str().map(str::to_string);
                let class = node.as_ref().and_then(|n| self.classes.get(n).cloned());
                self.queue.note_progress(&self.id, |p| {
                    p.nodes_total = total;
                    p.node = node;
                    p.class_type = class;
                    p.value = 0;
                    p.max = 0;
                });
            }
            "progress" => {
                let (v, m) = (data["value"].as_u64(), data["max"].as_u64());
                self.queue.note_progress(&self.id, |p| {
                    p.value = v.unwrap_or(0);
                    p.max = m.unwrap_or(0);
                });
            }
            "executed" => self.queue.note_progress(&self.id, |p| {
                p.nodes_done = (p.nodes_done + 1).min(total.max(1));
            }),
            "execution_cached" => {
                let n = data["nodes"].as_array().map_or(0, |a| a.len() as u64);
                self.queue.note_progress(&self.id, |p| {
                    p.nodes_total = total;
                    p.nodes_done = (p.nodes_done + n).min(total.max(1));
                });
            }
            _ => {}
        }
    }

    async fn handle(&mut self, ev: BackendEvent) {
        let (queue, user) = (&self.queue, self.user.as_str());
        let events = queue.events();
        match ev {
            BackendEvent::Submitted => {}
            BackendEvent::Started => {
                // Sent after the job's next event (its `execution_start`): the page's
                // progress comes first, the banner's line right after.
                self.running_notice = Some(format!("Running on {}", self.backend));
                return;
            }
            BackendEvent::Message(mut v) => {
                if v.get("type").and_then(Value::as_str) == Some("execution_error")
                    && let Some(data) = v.get_mut("data")
                {
                    // Tracebacks name the GPU server's files: the participant gets names only.
                    comfyume_wire::strip_server_paths_in(data);
                }
                to_public(&mut v, &self.id, &self.prompt_id);
                let text = v.to_string();
                let kind = v.get("type").and_then(Value::as_str).unwrap_or("");
                self.note_progress(kind, &v["data"]);
                if kind == "execution_start" {
                    // Recorded beside the relay, not before it: the participant's
                    // progress never waits for a disk write. (The outcome's own
                    // `execution_start` sets the start time again if this is lost.)
                    let at = v["data"]["timestamp"].as_i64().unwrap_or_else(now_ms);
                    let (q, id, who) = (queue.clone(), self.id.clone(), user.to_string());
                    tokio::spawn(async move {
                        let res = q
                            .store()
                            .transition(
                                &id,
                                &[JobState::Dispatched, JobState::Running],
                                JobState::Running,
                                JobPatch {
                                    started_at_ms: Some(at),
                                    ..Default::default()
                                },
                            )
                            .await;
                        if let Err(e) = res {
                            tracing::warn!(job_id = %id, user = %who, error = %e, "could not record that the job started");
                        }
                    }.in_current_span());
                    queue.touch();
                    // ComfyUI's order: its queue's `status` before `execution_start`.
                    queue.broadcast_status_now(user);
                }
                self.ended |= is_end_message(kind);
                queue.live_note(&self.id, kind, v.get("data"));
                // As ComfyUI routes them (ws_observer.txt): to the submitting
                // client (and the tabs that caught up with the job since); without one,
                // progress reaches all of the owner's tabs.
                match &self.client_id {
                    Some(c) => queue.send_to_job(&self.id, user, Some(c), &text),
                    None if matches!(kind, "progress_state" | "execution_interrupted") => {
                        events.to_user(user, &text);
                    }
                    None => {}
                }
            }
            BackendEvent::Binary(frame) => {
                if let Some(c) = &self.client_id {
                    let frame = frame_to_public(frame, &self.id, &self.prompt_id);
                    let legacy = legacy_preview(&frame).unwrap_or_else(|| frame.clone());
                    events.preview(user, c, legacy, frame);
                }
            }
            BackendEvent::Notice(text) => notice(queue, user, &self.prompt_id, &text),
        }
        if let Some(text) = self.running_notice.take() {
            notice(queue, user, &self.prompt_id, &text);
        }
    }
}

/// A type-4 preview frame (with metadata) as the type-1 frame older clients
/// expect; `None` for anything else.
fn legacy_preview(frame: &Bytes) -> Option<Bytes> {
    use comfyume_wire::shapes::ws::BinaryFrame;
    match BinaryFrame::decode(frame).ok()? {
        f @ BinaryFrame::PreviewImageWithMetadata { .. } => {
            f.to_legacy().map(|l| Bytes::from(l.encode()))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend that is only ever placed, never run.
    struct Idle(&'static str);

    #[async_trait::async_trait]
    impl Backend for Idle {
        fn name(&self) -> &str {
            self.0
        }
        fn slots(&self) -> usize {
            2
        }
        async fn object_info(&self) -> Result<Value, BackendError> {
            Err(BackendError::Unreachable("placement test".into()))
        }
        async fn run(
            &self,
            _: JobSpec,
            _: crate::backend::EventTx,
            _: tokio::sync::watch::Receiver<bool>,
        ) -> Result<Outcome, BackendError> {
            Err(BackendError::Unreachable("placement test".into()))
        }
    }

    async fn dispatcher() -> Arc<Dispatcher> {
        let store = Arc::new(
            comfyume_store::sqlite::SqliteStore::open_in_memory()
                .await
                .unwrap(),
        );
        let (queue, _) = Queue::open(store, Default::default(), Arc::new(crate::events::NoEvents))
            .await
            .unwrap();
        let backends: Vec<Arc<dyn Backend>> =
            vec![Arc::new(Idle("gpu-a")), Arc::new(Idle("gpu-b"))];
        Dispatcher::new(
            queue,
            backends,
            DispatchConfig::default(),
            PathBuf::from("unused"),
        )
    }

    #[tokio::test]
    async fn placement_prefers_the_least_busy_then_the_same_models() {
        let d = dispatcher().await;
        let flux = vec!["flux-2-klein-9b.safetensors".to_string()];
        *d.backends[1].last_models.lock().unwrap() = flux.clone();
        // Both idle: the one that already has the model loaded.
        assert_eq!(d.choose(&flux).backend.name(), "gpu-b");
        // A different model: no preference, the first idle one.
        assert_eq!(
            d.choose(&["ltx-2.safetensors".to_string()]).backend.name(),
            "gpu-a"
        );
        // Busier with the same model loses to an idle one (a GPU never waits).
        d.backends[1].active.store(1, Ordering::SeqCst);
        assert_eq!(d.choose(&flux).backend.name(), "gpu-a");
        // A backend that just failed a job is avoided while another has room.
        d.backends[1].active.store(0, Ordering::SeqCst);
        d.backends[1].failed_at_ms.store(now_ms(), Ordering::SeqCst);
        assert_eq!(d.choose(&flux).backend.name(), "gpu-a");
        // A healthy backend that is full: the failed one still gets nothing; the
        // job waits for a healthy slot instead of spending an attempt on it.
        d.backends[0].active.store(2, Ordering::SeqCst);
        assert!(d.eligible(now_ms()).is_empty());
        // Once its cooldown is over it is in good standing again.
        d.backends[1]
            .failed_at_ms
            .store(now_ms() - FAILED_BACKEND_COOLDOWN_MS - 1, Ordering::SeqCst);
        let names = |v: Vec<Arc<Slotted>>| {
            v.iter()
                .map(|b| b.backend.name().to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(d.eligible(now_ms())), ["gpu-b"]);
        // Every backend failed lately: each takes one job at a time, to probe it.
        d.backends[0].active.store(0, Ordering::SeqCst);
        for b in &d.backends {
            b.failed_at_ms.store(now_ms(), Ordering::SeqCst);
        }
        assert_eq!(names(d.eligible(now_ms())), ["gpu-a", "gpu-b"]);
        d.backends[0].active.store(1, Ordering::SeqCst);
        assert_eq!(names(d.eligible(now_ms())), ["gpu-b"]);
    }

    #[test]
    fn messages_name_the_job_by_its_owners_id() {
        let mut v = json!({"type": "progress_state", "data": {"prompt_id": "in", "nodes": {
            "1": {"state": "running", "prompt_id": "in"}, "2": {"prompt_id": "other"}}}});
        to_public(&mut v, "in", "mine");
        assert_eq!(v["data"]["prompt_id"], "mine");
        assert_eq!(v["data"]["nodes"]["1"]["prompt_id"], "mine");
        assert_eq!(v["data"]["nodes"]["2"]["prompt_id"], "other");
        let mut e = json!({"type": "execution_cached", "data": {"nodes": [], "prompt_id": "in"}});
        to_public(&mut e, "in", "mine");
        assert_eq!(e["data"]["prompt_id"], "mine");
        let meta = br#"{"node_id":"4","prompt_id":"in","image_type":"image/png"}"#;
        let mut f = Vec::new();
        f.extend_from_slice(&4u32.to_be_bytes());
        f.extend_from_slice(&(meta.len() as u32).to_be_bytes());
        f.extend_from_slice(meta);
        f.extend_from_slice(b"\x89PNG");
        let out = frame_to_public(Bytes::from(f.clone()), "in", "mine");
        use comfyume_wire::shapes::ws::BinaryFrame;
        match BinaryFrame::decode(&out).unwrap() {
            BinaryFrame::PreviewImageWithMetadata { metadata, image } => {
                assert_eq!(metadata["prompt_id"], "mine");
                assert_eq!(image, b"\x89PNG");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            frame_to_public(Bytes::from(f.clone()), "in", "in"),
            Bytes::from(f)
        );
    }

    #[test]
    fn type4_preview_becomes_type1() {
        let meta = br#"{"node_id":"4","prompt_id":"p","image_type":"image/png"}"#;
        let mut f = Vec::new();
        f.extend_from_slice(&4u32.to_be_bytes());
        f.extend_from_slice(&(meta.len() as u32).to_be_bytes());
        f.extend_from_slice(meta);
        f.extend_from_slice(b"\x89PNG");
        let legacy = legacy_preview(&Bytes::from(f)).unwrap();
        assert_eq!(&legacy[0..4], &1u32.to_be_bytes());
        assert_eq!(&legacy[4..8], &2u32.to_be_bytes());
        assert_eq!(&legacy[8..], b"\x89PNG");
        assert!(legacy_preview(&Bytes::from_static(b"\0\0\0\x01\0\0\0\x02x")).is_none());
    }
}
