//! The dispatcher: keeps every backend slot busy while work is queued, relays
//! each job's events to its owner, records outcomes, and retries jobs whose
//! GPU server failed (bounded attempts), telling the participant so.

use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use comfyume_store::{JobPatch, JobRecord, JobState, StoreError};
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc};

use crate::backend::{
    Backend, BackendError, BackendEvent, InputFile, JobSpec, Outcome, OutcomeKind,
};
use crate::queue::{Queue, now_ms};

#[derive(Debug, Clone)]
pub struct DispatchConfig {
    /// `MAX_ATTEMPTS`: tries per job on backends that failed (not on errors of
    /// the workflow itself).
    pub max_attempts: u32,
    /// `JOB_TIMEOUT`: the longest a job may take on a backend, queue wait excluded.
    pub job_timeout: Duration,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        DispatchConfig {
            max_attempts: 3,
            job_timeout: Duration::from_secs(600),
        }
    }
}

struct Slotted {
    backend: Arc<dyn Backend>,
    active: AtomicUsize,
    /// Model files of the last job placed here (loading a model is the
    /// expensive part, so the same models go to the same GPU when possible).
    last_models: Mutex<Vec<String>>,
    /// When a job last failed here through the backend's fault (ms; 0: never,
    /// or a job succeeded since). Such a backend gets work only when no other
    /// is free, so a retry really goes to another GPU.
    failed_at_ms: AtomicI64,
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

/// What the dashboard and banner can say about a backend.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackendStatus {
    pub name: String,
    pub slots: usize,
    pub active: usize,
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
                        last_models: Mutex::new(Vec::new()),
                        failed_at_ms: AtomicI64::new(0),
                    })
                })
                .collect(),
            cfg,
            data_dir,
            slot_freed: Notify::new(),
        })
    }

    pub fn backends(&self) -> Vec<BackendStatus> {
        self.backends
            .iter()
            .map(|b| BackendStatus {
                name: b.backend.name().to_string(),
                slots: b.backend.slots(),
                active: b.active.load(Ordering::SeqCst),
            })
            .collect()
    }

    /// Starts the dispatch loop (supervised: restarted if it ever ends) and
    /// re-attaches the jobs a previous process left on backends.
    pub fn start(self: &Arc<Self>, in_flight: Vec<JobRecord>) -> tokio::task::JoinHandle<()> {
        for rec in in_flight {
            let me = self.clone();
            match self
                .backends
                .iter()
                .find(|b| Some(b.backend.name()) == rec.backend.as_deref())
                .cloned()
            {
                Some(slot) => {
                    slot.active.fetch_add(1, Ordering::SeqCst);
                    tracing::info!(job = %rec.id, backend = %slot.backend.name(), "re-attaching a job after restart");
                    me.spawn_job(slot, rec, true);
                }
                None => {
                    // It never reached a backend we know: queue it again.
                    tokio::spawn(async move {
                        me.retry_or_fail(
                            rec,
                            "the server restarted before the job started".into(),
                            None,
                        )
                        .await
                    });
                }
            }
        }
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let inner = me.clone();
                match tokio::spawn(async move { inner.run_loop().await }).await {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::error!(error = %e, "dispatch loop crashed; restarting it");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        })
    }

    async fn run_loop(self: &Arc<Self>) {
        if self.backends.is_empty() {
            tracing::warn!("no backend configured: jobs stay queued");
            return;
        }
        loop {
            // Take a job only when a slot is free, so the scheduler decides at
            // the last moment (a participant who arrives now is considered).
            loop {
                let freed = self.slot_freed.notified();
                tokio::pin!(freed);
                freed.as_mut().enable();
                if self
                    .backends
                    .iter()
                    .any(|b| b.active.load(Ordering::SeqCst) < b.backend.slots())
                {
                    break;
                }
                let _ = tokio::time::timeout(Duration::from_secs(1), freed).await;
            }
            let rec = match self.queue.wait_next().await {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "could not take the next job; retrying shortly");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            let models = crate::comfyui::model_files(&rec.prompt);
            let slot = self.choose(&models);
            slot.active.fetch_add(1, Ordering::SeqCst);
            *slot.last_models.lock().unwrap_or_else(|p| p.into_inner()) = models;
            self.spawn_job(slot, rec, false);
        }
    }

    /// The least busy backend with a free slot, preferring one that has not
    /// just failed a job, then one that last ran the same model files.
    fn choose(&self, models: &[String]) -> Arc<Slotted> {
        let now = now_ms();
        self.backends
            .iter()
            .filter(|b| b.active.load(Ordering::SeqCst) < b.backend.slots())
            .min_by_key(|b| {
                let failed = b.failed_at_ms.load(Ordering::SeqCst);
                let suspect = failed > 0 && now - failed < FAILED_BACKEND_COOLDOWN_MS;
                let same = !models.is_empty()
                    && *b.last_models.lock().unwrap_or_else(|p| p.into_inner()) == models;
                (suspect, b.active.load(Ordering::SeqCst), !same)
            })
            .or_else(|| self.backends.first())
            .cloned()
            .expect("at least one backend")
    }

    /// Runs one job in its own task; a panic inside stays contained and the
    /// job is recorded as failed rather than stuck.
    fn spawn_job(self: &Arc<Self>, slot: Arc<Slotted>, rec: JobRecord, reattach: bool) {
        let me = self.clone();
        tokio::spawn(async move {
            let (id, user) = (rec.id.clone(), rec.user.clone());
            let inner = me.clone();
            let slot2 = slot.clone();
            let res = tokio::spawn(async move { inner.run_job(slot2, rec, reattach).await }).await;
            if let Err(e) = res {
                tracing::error!(job = %id, error = %e, "job task crashed");
                me.queue.unregister_running(&id);
                let _ = me
                    .finish_failed(
                        &id,
                        &user,
                        None,
                        "internal error in the dispatcher",
                        "ComfyUMe.InternalError",
                    )
                    .await;
                me.queue.job_ended(&user);
            }
            slot.active.fetch_sub(1, Ordering::SeqCst);
            me.slot_freed.notify_waiters();
        });
    }

    fn input_files(&self, rec: &JobRecord) -> Vec<InputFile> {
        let base = self.data_dir.join("inputs").join(&rec.user);
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
                let name = s.strip_suffix(" [input]").unwrap_or(s);
                if name.is_empty()
                    || name.contains("..")
                    || name.starts_with('/')
                    || name.contains('\\')
                {
                    continue;
                }
                let local = base.join(name);
                if local.is_file() && !out.iter().any(|f| f.name == name) {
                    out.push(InputFile {
                        local,
                        name: name.to_string(),
                    });
                }
            }
        }
        out
    }

    async fn run_job(self: &Arc<Self>, slot: Arc<Slotted>, rec: JobRecord, reattach: bool) {
        let backend = slot.backend.clone();
        let (id, user, client_id) = (rec.id.clone(), rec.user.clone(), rec.client_id.clone());
        // Record where it runs before it reaches the backend, so a restart knows.
        let rec = match self
            .queue
            .store()
            .transition(
                &id,
                &[JobState::Dispatched, JobState::Running],
                if reattach {
                    rec.state
                } else {
                    JobState::Dispatched
                },
                JobPatch {
                    attempts_inc: !reattach,
                    backend: Some(backend.name().to_string()),
                    ..Default::default()
                },
            )
            .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(job = %id, error = %e, "job changed state before it could run");
                self.queue.job_ended(&user);
                return;
            }
        };
        let interrupt = self.queue.register_running(&id, &user);
        let spec = JobSpec {
            id: id.clone(),
            user: user.clone(),
            prompt: rec.prompt.clone(),
            extra_data: rec.extra_data.clone(),
            outputs_to_execute: rec.outputs_to_execute.clone(),
            inputs: self.input_files(&rec),
            output_dir: self.data_dir.join("outputs").join(&user),
            temp_dir: self.data_dir.join("temp").join(&user),
            attempt: rec.attempts.max(1),
            reattach,
        };
        let (tx, rx) = mpsc::channel(1024);
        let relay = tokio::spawn(relay_events(
            self.queue.clone(),
            rx,
            id.clone(),
            user.clone(),
            client_id.clone(),
            backend.name().to_string(),
        ));
        let started = now_ms();
        let run = backend.run(spec, tx, interrupt);
        tokio::pin!(run);
        let result = match tokio::time::timeout(self.cfg.job_timeout, &mut run).await {
            Ok(r) => Ok(r),
            Err(_) => {
                // Ask the backend to stop it, and give it a moment to wind down.
                self.queue.interrupt(&user, Some(&id));
                let _ = tokio::time::timeout(Duration::from_secs(15), &mut run).await;
                Err(())
            }
        };
        let relayed_end = relay.await.unwrap_or(false);
        self.queue.unregister_running(&id);
        metrics::histogram!("comfyume_job_run_seconds")
            .record((now_ms() - started) as f64 / 1000.0);
        match result {
            Ok(Ok(outcome)) => {
                slot.failed_at_ms.store(0, Ordering::SeqCst);
                let _ = self.finish(&rec, outcome, relayed_end).await;
                self.queue.job_ended(&user);
            }
            Ok(Err(e)) if e.retryable() => {
                slot.failed_at_ms.store(now_ms(), Ordering::SeqCst);
                tracing::warn!(job = %id, backend = %backend.name(), error = %e, "backend failed the job");
                self.retry_or_fail(rec, e.to_string(), Some(&e)).await;
            }
            Ok(Err(e)) => {
                let detail = match &e {
                    BackendError::Rejected(body) => body["error"]["message"]
                        .as_str()
                        .unwrap_or("the workflow was refused")
                        .to_string(),
                    other => other.to_string(),
                };
                let _ = self
                    .finish_failed(
                        &id,
                        &user,
                        client_id.as_deref(),
                        &detail,
                        "ComfyUMe.BackendRejected",
                    )
                    .await;
                self.queue.job_ended(&user);
            }
            Err(()) => {
                let msg = format!(
                    "The job ran longer than the workshop's limit ({} s) and was stopped.",
                    self.cfg.job_timeout.as_secs()
                );
                let _ = self
                    .finish_failed(
                        &id,
                        &user,
                        client_id.as_deref(),
                        &msg,
                        "ComfyUMe.JobTimeout",
                    )
                    .await;
                self.queue.job_ended(&user);
            }
        }
    }

    /// Another attempt on another slot, or, after the last one, a failure with
    /// a readable reason.
    async fn retry_or_fail(&self, rec: JobRecord, reason: String, _err: Option<&BackendError>) {
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
                    metrics::counter!("comfyume_job_retries_total").increment(1);
                    notice(
                        &self.queue,
                        &user,
                        &id,
                        &format!(
                            "{reason}. Retrying on another GPU (attempt {next} of {}).",
                            self.cfg.max_attempts
                        ),
                    );
                    self.queue.requeue(&r);
                    self.queue.broadcast_status(&user).await;
                }
                Err(e) => {
                    tracing::error!(job = %id, error = %e, "could not requeue a job");
                    self.queue.job_ended(&user);
                }
            }
        } else {
            let msg = format!("{reason}. Gave up after {} attempts.", rec.attempts);
            let _ = self
                .finish_failed(
                    &id,
                    &user,
                    rec.client_id.as_deref(),
                    &msg,
                    "ComfyUMe.BackendFailed",
                )
                .await;
            self.queue.job_ended(&user);
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
        let missed_end = (!relayed_end).then(|| end_message(&rec.id, &outcome));
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
        if let Err(e) = &res {
            tracing::error!(job = %rec.id, error = %e, "could not record a job's outcome");
        }
        metrics::counter!("comfyume_jobs_finished_total", "state" => state.as_str()).increment(1);
        if let (Some(msg), Some(c)) = (missed_end, rec.client_id.as_deref()) {
            self.queue
                .events()
                .to_client(&rec.user, c, &msg.to_string());
        }
        self.end_marker(&rec.user, rec.client_id.as_deref(), &rec.id)
            .await;
        res.map(|_| ())
    }

    async fn finish_failed(
        &self,
        id: &str,
        user: &str,
        client_id: Option<&str>,
        message: &str,
        exception_type: &str,
    ) -> Result<(), StoreError> {
        let data = json!({
            "prompt_id": id,
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
        if let Some(c) = client_id {
            let msg = json!({"type": "execution_error", "data": data});
            self.queue.events().to_client(user, c, &msg.to_string());
        }
        metrics::counter!("comfyume_jobs_finished_total", "state" => "failed").increment(1);
        self.end_marker(user, client_id, id).await;
        res.map(|_| ())
    }

    async fn end_marker(&self, user: &str, client_id: Option<&str>, id: &str) {
        self.queue.broadcast_status(user).await;
        if let Some(c) = client_id {
            let end = json!({"type": "executing", "data": {"node": null, "prompt_id": id}});
            self.queue.events().to_client(user, c, &end.to_string());
        }
    }
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

/// A plain message for the participant's banner (our own message type; the
/// stock frontend ignores types it does not know).
fn notice(queue: &Queue, user: &str, id: &str, text: &str) {
    let msg = json!({"type": "comfyume", "data": {"message": text, "prompt_id": id}});
    queue.events().to_user(user, &msg.to_string());
}

/// Forwards a job's events to its owner's sockets, as ComfyUI routes them:
/// execution messages to the submitting client only; `progress_state` to all
/// of the owner's tabs. Returns whether the job's ending message was among them.
async fn relay_events(
    queue: Arc<Queue>,
    mut rx: mpsc::Receiver<BackendEvent>,
    id: String,
    user: String,
    client_id: Option<String>,
    backend: String,
) -> bool {
    let events = queue.events().clone();
    let mut ended = false;
    while let Some(ev) = rx.recv().await {
        match ev {
            BackendEvent::Submitted => {}
            BackendEvent::Started => {
                notice(&queue, &user, &id, &format!("Running on {backend}"));
            }
            BackendEvent::Message(v) => {
                let text = v.to_string();
                let kind = v.get("type").and_then(Value::as_str).unwrap_or("");
                if kind == "execution_start" {
                    let at = v["data"]["timestamp"].as_i64().unwrap_or_else(now_ms);
                    let _ = queue
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
                    queue.broadcast_status(&user).await;
                }
                ended |= is_end_message(kind);
                // As ComfyUI routes them (ws_observer.txt): to the submitting
                // client; without one, progress reaches all of the owner's tabs.
                match &client_id {
                    Some(c) => {
                        events.to_client(&user, c, &text);
                    }
                    None if matches!(kind, "progress_state" | "execution_interrupted") => {
                        events.to_user(&user, &text);
                    }
                    None => {}
                }
            }
            BackendEvent::Binary(frame) => {
                if let Some(c) = &client_id {
                    let legacy = legacy_preview(&frame).unwrap_or_else(|| frame.clone());
                    events.preview(&user, c, legacy, frame);
                }
            }
            BackendEvent::Notice(text) => notice(&queue, &user, &id, &text),
        }
    }
    ended
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
        // Full backends are never chosen while another has a free slot.
        d.backends[0].active.store(2, Ordering::SeqCst);
        assert_eq!(d.choose(&flux).backend.name(), "gpu-b");
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
