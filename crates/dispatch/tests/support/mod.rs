//! Test support for the dispatcher in virtual time (`tokio::time::pause`):
//! the real SQLite store driven from a runtime of its own, scripted backends
//! whose every step is a virtual-time sleep, and an event sink that records.

#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use comfyume_dispatch::backend::{
    Backend, BackendError, BackendEvent, EventTx, JobSpec, Outcome, OutcomeKind,
};
use comfyume_dispatch::{DispatchConfig, Dispatcher, EventSink, Queue, QueueConfig};
use comfyume_store::sqlite::SqliteStore;
use comfyume_store::{
    AccountChange, EnqueueLimits, JobPatch, JobQuery, JobRecord, JobState, JobStore, JobWithText,
    MetaEntry, MetaStore, NewJob, PasswordScheme, Role, Store, StoreError, User, UserStore,
};
use serde_json::{Map, Value, json};
use tokio::sync::watch;

/// The real SQLite store, each call run to completion on a runtime of its own
/// while the test's (paused) runtime waits without yielding. Otherwise the
/// paused clock would jump ahead to the next timer whenever the test runtime
/// sat idle waiting for SQLite's thread, and timeouts would fire early.
pub struct BlockingStore {
    inner: Arc<SqliteStore>,
    rt: Option<tokio::runtime::Runtime>,
    /// Faults to inject (see [`Faults`]).
    pub faults: Mutex<Faults>,
}

#[derive(Debug, Default, Clone)]
pub struct Faults {
    /// The next `Queued -> Dispatched` transition commits but reports a timeout.
    pub dispatch_commits_then_times_out: bool,
    /// Every enqueue commits, then its answer takes this long (virtual time).
    pub enqueue_answer_delay: Option<Duration>,
    /// No job's end (nor its requeue) can be written: a full disk under the store.
    pub endings_fail: bool,
}

impl BlockingStore {
    pub fn open() -> Arc<Self> {
        // Built on a plain thread: the test's own runtime may not block.
        let (rt, inner) = std::thread::spawn(|| {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let inner = rt.block_on(SqliteStore::open_in_memory()).unwrap();
            (rt, inner)
        })
        .join()
        .unwrap();
        Arc::new(BlockingStore {
            inner: Arc::new(inner),
            rt: Some(rt),
            faults: Mutex::new(Faults::default()),
        })
    }

    fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(Arc<SqliteStore>) -> std::pin::Pin<Box<dyn Future<Output = T> + Send>>,
    ) -> T {
        let fut = f(self.inner.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        self.rt.as_ref().expect("runtime").spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv().expect("the store's runtime answered")
    }

    fn faults(&self) -> std::sync::MutexGuard<'_, Faults> {
        self.faults.lock().unwrap()
    }
}

impl Drop for BlockingStore {
    fn drop(&mut self) {
        // Dropped on the test's runtime, where blocking on shutdown is refused.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

macro_rules! blocking {
    ($self:ident, |$s:ident| $body:expr) => {
        $self.run(move |$s| Box::pin(async move { $body }))
    };
}

#[async_trait]
impl UserStore for BlockingStore {
    async fn create_user(
        &self,
        name: &str,
        password: &str,
        role: Role,
    ) -> Result<User, StoreError> {
        let (n, p) = (name.to_string(), password.to_string());
        blocking!(self, |s| s.create_user(&n, &p, role).await)
    }
    async fn import_bcrypt(&self, name: &str, hash: &str, role: Role) -> Result<User, StoreError> {
        let (n, h) = (name.to_string(), hash.to_string());
        blocking!(self, |s| s.import_bcrypt(&n, &h, role).await)
    }
    async fn get_user(&self, name: &str) -> Result<Option<User>, StoreError> {
        let n = name.to_string();
        blocking!(self, |s| s.get_user(&n).await)
    }
    async fn list_users(&self) -> Result<Vec<User>, StoreError> {
        blocking!(self, |s| s.list_users().await)
    }
    async fn set_password(&self, name: &str, password: &str) -> Result<(), StoreError> {
        let (n, p) = (name.to_string(), password.to_string());
        blocking!(self, |s| s.set_password(&n, &p).await)
    }
    async fn set_disabled(&self, name: &str, disabled: bool) -> Result<(), StoreError> {
        let n = name.to_string();
        blocking!(self, |s| s.set_disabled(&n, disabled).await)
    }
    async fn remove_user(&self, name: &str) -> Result<(), StoreError> {
        let n = name.to_string();
        blocking!(self, |s| s.remove_user(&n).await)
    }
    async fn verify_password(
        &self,
        name: &str,
        password: &str,
    ) -> Result<Option<User>, StoreError> {
        let (n, p) = (name.to_string(), password.to_string());
        blocking!(self, |s| s.verify_password(&n, &p).await)
    }
    async fn password_scheme(&self, name: &str) -> Result<Option<PasswordScheme>, StoreError> {
        let n = name.to_string();
        blocking!(self, |s| s.password_scheme(&n).await)
    }
    async fn create_session(&self, user: &str, ttl_ms: i64) -> Result<String, StoreError> {
        let u = user.to_string();
        blocking!(self, |s| s.create_session(&u, ttl_ms).await)
    }
    async fn session_user(&self, token: &str) -> Result<Option<User>, StoreError> {
        let t = token.to_string();
        blocking!(self, |s| s.session_user(&t).await)
    }
    async fn delete_session(&self, token: &str) -> Result<(), StoreError> {
        let t = token.to_string();
        blocking!(self, |s| s.delete_session(&t).await)
    }
    async fn user_revision(&self, name: &str) -> Result<Option<(User, i64)>, StoreError> {
        let n = name.to_string();
        blocking!(self, |s| s.user_revision(&n).await)
    }
    async fn account_changes(
        &self,
        after: i64,
        limit: u32,
    ) -> Result<Vec<AccountChange>, StoreError> {
        blocking!(self, |s| s.account_changes(after, limit).await)
    }
    async fn last_account_change(&self) -> Result<i64, StoreError> {
        blocking!(self, |s| s.last_account_change().await)
    }
}

#[async_trait]
impl comfyume_store::AuditStore for BlockingStore {
    async fn append_audit(
        &self,
        e: comfyume_store::NewAudit,
    ) -> Result<comfyume_store::AuditEntry, StoreError> {
        blocking!(self, |s| s.append_audit(e).await)
    }
    async fn list_audit(
        &self,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<comfyume_store::AuditEntry>, StoreError> {
        blocking!(self, |s| s.list_audit(before, limit).await)
    }
}

#[async_trait]
impl MetaStore for BlockingStore {
    async fn get_meta(&self, key: &str) -> Result<Option<MetaEntry>, StoreError> {
        let k = key.to_string();
        blocking!(self, |s| s.get_meta(&k).await)
    }
    async fn put_meta(&self, key: &str, value: &str, source: &str) -> Result<(), StoreError> {
        let (k, v, src) = (key.to_string(), value.to_string(), source.to_string());
        blocking!(self, |s| s.put_meta(&k, &v, &src).await)
    }
}

#[async_trait]
impl JobStore for BlockingStore {
    async fn enqueue(&self, job: NewJob, limits: EnqueueLimits) -> Result<JobRecord, StoreError> {
        Ok(self.enqueue_counted(job, limits).await?.0)
    }
    async fn enqueue_counted(
        &self,
        job: NewJob,
        limits: EnqueueLimits,
    ) -> Result<(JobRecord, Option<u64>), StoreError> {
        let r = blocking!(self, |s| s.enqueue_counted(job, limits).await);
        let delay = self.faults().enqueue_answer_delay;
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        r
    }
    async fn get_job(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        let i = id.to_string();
        blocking!(self, |s| s.get_job(&i).await)
    }
    async fn get_user_job(
        &self,
        user: &str,
        prompt_id: &str,
    ) -> Result<Option<JobRecord>, StoreError> {
        let (u, p) = (user.to_string(), prompt_id.to_string());
        blocking!(self, |s| s.get_user_job(&u, &p).await)
    }
    async fn list_jobs(&self, q: &JobQuery) -> Result<(Vec<JobRecord>, u64), StoreError> {
        let q = q.clone();
        blocking!(self, |s| s.list_jobs(&q).await)
    }
    async fn list_jobs_text(&self, q: &JobQuery) -> Result<Vec<JobWithText>, StoreError> {
        let q = q.clone();
        blocking!(self, |s| s.list_jobs_text(&q).await)
    }
    async fn unfinished_jobs(&self) -> Result<Vec<JobRecord>, StoreError> {
        blocking!(self, |s| s.unfinished_jobs().await)
    }
    async fn transition(
        &self,
        id: &str,
        from: &[JobState],
        to: JobState,
        patch: JobPatch,
    ) -> Result<JobRecord, StoreError> {
        let ending = !matches!(to, JobState::Dispatched | JobState::Running);
        if ending && self.faults().endings_fail {
            return Err(StoreError::Unavailable(
                "database or disk is full (injected)".into(),
            ));
        }
        let (i, f) = (id.to_string(), from.to_vec());
        let r = blocking!(self, |s| s.transition(&i, &f, to, patch).await);
        let ambiguous = to == JobState::Dispatched
            && from == [JobState::Queued]
            && r.is_ok()
            && std::mem::take(&mut self.faults().dispatch_commits_then_times_out);
        if ambiguous {
            return Err(StoreError::Unavailable(
                "transition timed out after 5000 ms (injected: it committed)".into(),
            ));
        }
        r
    }
    async fn delete_queued(&self, user: &str, ids: &[String]) -> Result<Vec<String>, StoreError> {
        let (u, i) = (user.to_string(), ids.to_vec());
        blocking!(self, |s| s.delete_queued(&u, &i).await)
    }
    async fn clear_queued(&self, user: &str) -> Result<Vec<String>, StoreError> {
        let u = user.to_string();
        blocking!(self, |s| s.clear_queued(&u).await)
    }
    async fn delete_history(&self, user: &str, ids: &[String]) -> Result<u64, StoreError> {
        let (u, i) = (user.to_string(), ids.to_vec());
        blocking!(self, |s| s.delete_history(&u, &i).await)
    }
    async fn clear_history(&self, user: &str) -> Result<u64, StoreError> {
        let u = user.to_string();
        blocking!(self, |s| s.clear_history(&u).await)
    }
    async fn count_jobs(&self, user: Option<&str>, states: &[JobState]) -> Result<u64, StoreError> {
        let (u, st) = (user.map(str::to_string), states.to_vec());
        blocking!(self, |s| s.count_jobs(u.as_deref(), &st).await)
    }
}

/// What a scripted backend does with a job.
#[derive(Debug, Clone)]
pub enum Script {
    /// Accepted; starts after `wait`; ends with success `run` later (or when
    /// interrupted: then it reports the interrupt).
    Run { wait: Duration, run: Duration },
    /// Accepted and started, then never ends, and ignores interrupts.
    HangAfterStart,
    /// Accepted, never started, ignores interrupts.
    NeverStart,
    /// Accepted and started, then the connection is lost after `after`.
    LoseAfter(Duration),
    /// Panics inside `run`.
    Panic,
    /// Started, then a node raises: ComfyUI's `execution_error` with a traceback
    /// naming the server's files.
    RaiseWithTraceback,
    /// Refused at once: the server cannot be reached.
    Unreachable,
    /// Ran, but our side could not save the output (the data disk is full).
    DiskFull,
}

impl Script {
    /// Starts at once and succeeds after `run`.
    pub fn runs(run: Duration) -> Script {
        Script::Run {
            wait: Duration::ZERO,
            run,
        }
    }
}

/// A call the backend saw, in order, with the virtual time it came at.
#[derive(Debug, Clone, PartialEq)]
pub enum Call {
    Run { job: String, attempt: u32 },
    Stop { job: String },
    Ended { job: String },
}

#[derive(Default)]
pub struct Journal {
    pub calls: Mutex<Vec<(Duration, String, Call)>>,
}

impl Journal {
    pub fn log(&self, backend: &str, start: tokio::time::Instant, call: Call) {
        self.calls
            .lock()
            .unwrap()
            .push((start.elapsed(), backend.to_string(), call));
    }
    pub fn calls(&self) -> Vec<(Duration, String, Call)> {
        self.calls.lock().unwrap().clone()
    }
}

pub struct Scripted {
    pub name: String,
    pub slots: usize,
    /// Per job id; jobs not named run `default`.
    pub scripts: Mutex<HashMap<String, Script>>,
    pub default: Script,
    /// Whether `stop` answers at all (a hung server does not).
    pub stop_answers: bool,
    /// How many `stop` calls fail before one succeeds (a server that comes back).
    pub stop_failures: std::sync::atomic::AtomicU32,
    pub journal: Arc<Journal>,
    pub t0: tokio::time::Instant,
}

impl Scripted {
    pub fn new(name: &str, slots: usize, default: Script, journal: &Arc<Journal>) -> Self {
        Scripted {
            name: name.to_string(),
            slots,
            scripts: Mutex::new(HashMap::new()),
            default,
            stop_answers: true,
            stop_failures: Default::default(),
            journal: journal.clone(),
            t0: tokio::time::Instant::now(),
        }
    }

    pub fn script(self, job: &str, s: Script) -> Self {
        self.scripts.lock().unwrap().insert(job.to_string(), s);
        self
    }
}

fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn msg(kind: &str, data: Value) -> BackendEvent {
    BackendEvent::Message(json!({"type": kind, "data": data}))
}

fn outcome(kind: OutcomeKind) -> Outcome {
    Outcome {
        kind,
        outputs: Map::new(),
        messages: Vec::new(),
        meta: Map::new(),
    }
}

/// Waits until `interrupt` turns true (or forever, if it is dropped).
async fn interrupted(mut interrupt: watch::Receiver<bool>) {
    loop {
        if *interrupt.borrow_and_update() {
            return;
        }
        if interrupt.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

#[async_trait]
impl Backend for Scripted {
    fn name(&self) -> &str {
        &self.name
    }
    fn slots(&self) -> usize {
        self.slots
    }
    async fn object_info(&self) -> Result<Value, BackendError> {
        Ok(json!({}))
    }
    async fn run(
        &self,
        job: JobSpec,
        events: EventTx,
        interrupt: watch::Receiver<bool>,
    ) -> Result<Outcome, BackendError> {
        let id = job.id.clone();
        self.journal.log(
            &self.name,
            self.t0,
            Call::Run {
                job: id.clone(),
                attempt: job.attempt,
            },
        );
        let script = self
            .scripts
            .lock()
            .unwrap()
            .get(&id)
            .cloned()
            .unwrap_or_else(|| self.default.clone());
        let _ = events.send(BackendEvent::Submitted).await;
        let start = |events: EventTx, id: String| async move {
            let _ = events.send(BackendEvent::Started).await;
            let _ = events
                .send(msg(
                    "execution_start",
                    // Wall-clock milliseconds, as ComfyUI sends (a re-attached job's
                    // JOB_TIMEOUT counts from it).
                    json!({"prompt_id": id, "timestamp": wall_ms()}),
                ))
                .await;
        };
        let res = match script {
            Script::Run { wait, run } => {
                tokio::time::sleep(wait).await;
                start(events.clone(), id.clone()).await;
                tokio::select! {
                    _ = tokio::time::sleep(run) => {
                        let _ = events.send(msg("execution_success", json!({"prompt_id": id}))).await;
                        Ok(outcome(OutcomeKind::Success))
                    }
                    _ = interrupted(interrupt) => {
                        let data = json!({"prompt_id": id});
                        let _ = events.send(msg("execution_interrupted", data.clone())).await;
                        Ok(outcome(OutcomeKind::Interrupted(data)))
                    }
                }
            }
            Script::HangAfterStart => {
                start(events.clone(), id.clone()).await;
                std::future::pending().await
            }
            Script::NeverStart => std::future::pending().await,
            Script::LoseAfter(after) => {
                start(events.clone(), id.clone()).await;
                tokio::time::sleep(after).await;
                Err(BackendError::Lost(
                    "the GPU server went away mid-job".into(),
                ))
            }
            Script::Panic => panic!("scripted backend panics"),
            Script::Unreachable => Err(BackendError::Unreachable("connection refused".into())),
            Script::DiskFull => {
                start(events.clone(), id.clone()).await;
                Err(BackendError::Storage(
                    "out_00001_.png: No space left on device (os error 28)".into(),
                ))
            }
            Script::RaiseWithTraceback => {
                start(events.clone(), id.clone()).await;
                let data = json!({
                    "prompt_id": id,
                    "node_id": "2",
                    "exception_message": "bad value in /home/comfy/ComfyUI/custom_nodes/x/node.py",
                    "traceback": ["  File \"/home/comfy/ComfyUI/execution.py\", line 496, in execute\n"],
                });
                let _ = events.send(msg("execution_error", data.clone())).await;
                Ok(outcome(OutcomeKind::ExecutionError(data)))
            }
        };
        self.journal
            .log(&self.name, self.t0, Call::Ended { job: id.clone() });
        res
    }
    async fn stop(&self, job_id: &str) -> Result<(), BackendError> {
        self.journal.log(
            &self.name,
            self.t0,
            Call::Stop {
                job: job_id.to_string(),
            },
        );
        if !self.stop_answers {
            std::future::pending::<()>().await;
        }
        use std::sync::atomic::Ordering;
        let failing = self
            .stop_failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failing {
            return Err(BackendError::Unreachable("still down".into()));
        }
        Ok(())
    }
}

/// Records every message sent to participants: (user, client or "*", text).
#[derive(Default)]
pub struct Recorder {
    pub sent: Mutex<Vec<(String, String, String)>>,
}

impl Recorder {
    pub fn texts(&self, user: &str) -> Vec<Value> {
        self.sent
            .lock()
            .unwrap()
            .iter()
            .filter(|(u, _, _)| u == user)
            .filter_map(|(_, _, t)| serde_json::from_str(t).ok())
            .collect()
    }
}

impl EventSink for Recorder {
    fn listening(&self, _: &str) -> bool {
        true
    }
    fn to_user(&self, user: &str, text: &str) {
        self.sent
            .lock()
            .unwrap()
            .push((user.into(), "*".into(), text.into()));
    }
    fn to_client(&self, user: &str, client_id: &str, text: &str) -> bool {
        self.sent
            .lock()
            .unwrap()
            .push((user.into(), client_id.into(), text.into()));
        true
    }
    fn preview(&self, _: &str, _: &str, _: Bytes, _: Bytes) {}
}

pub struct Rig {
    pub store: Arc<BlockingStore>,
    pub queue: Arc<Queue>,
    pub dispatcher: Arc<Dispatcher>,
    pub events: Arc<Recorder>,
    pub journal: Arc<Journal>,
    pub t0: tokio::time::Instant,
}

pub async fn rig(
    backends: Vec<Arc<dyn Backend>>,
    cfg: DispatchConfig,
    queue_cfg: QueueConfig,
    journal: Arc<Journal>,
) -> Rig {
    let store = BlockingStore::open();
    let events = Arc::new(Recorder::default());
    let (queue, in_flight) =
        Queue::open(store.clone() as Arc<dyn Store>, queue_cfg, events.clone())
            .await
            .unwrap();
    let dispatcher = Dispatcher::new(
        queue.clone(),
        backends,
        cfg,
        std::env::temp_dir().join("comfyume-dispatch-tests"),
    );
    dispatcher.start(in_flight);
    Rig {
        store,
        queue,
        dispatcher,
        events,
        journal,
        t0: tokio::time::Instant::now(),
    }
}

pub fn new_job(id: &str, user: &str) -> NewJob {
    NewJob {
        id: id.to_string(),
        user: user.to_string(),
        number: 0.0,
        priority: None,
        prompt: json!({"1": {"class_type": "EmptyImage", "inputs": {}}}),
        extra_data: json!({}),
        outputs_to_execute: Vec::new(),
        client_id: Some("tab".into()),
    }
}

impl Rig {
    pub async fn state(&self, id: &str) -> JobState {
        self.store.get_job(id).await.unwrap().unwrap().state
    }
    pub async fn job(&self, id: &str) -> JobRecord {
        self.store.get_job(id).await.unwrap().unwrap()
    }
    pub fn active(&self, backend: &str) -> usize {
        self.dispatcher
            .backends()
            .into_iter()
            .find(|b| b.name == backend)
            .unwrap()
            .active
    }
    /// Sleeps in virtual time until `at` after the rig started.
    pub async fn at(&self, at: Duration) {
        tokio::time::sleep_until(self.t0 + at).await;
    }
}
