//! One job: run it on ComfyUI, turn what happens into protocol events, deliver its
//! output files (inline chunks read from disk, or the object store), end with exactly
//! one final event, and keep a finished job for replays.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use comfyume_comfyui::{BackendError, BackendEvent, InputFile, JobSpec, Outcome, OutcomeKind};
use comfyume_wire::shapes::ws::BinaryFrame;
use comfyume_wire::worker::{
    AbortReason, DeliveredFile, Delivery, ErrorKind, Event, FileRef, PROTOCOL_VERSION, RunRequest,
    StoreRef, Timing,
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::results::{Finished, KeptFile};
use crate::{Shared, lock};

/// Image previews larger than this are not sent.
const MAX_PREVIEW_BYTES: usize = 4 * 1024 * 1024;
/// After an abort or a lost client: how long ComfyUI gets to confirm the interrupt.
const WIND_DOWN: Duration = Duration::from_secs(5);

/// The job slot: while held, health says busy and other jobs get 429. Released exactly
/// once, when dropped (whatever way the job ended, a panic included).
pub(crate) struct Slot {
    shared: Arc<Shared>,
    id: String,
}

impl Slot {
    /// Takes the slot for `id` if the worker may run it now; the state is checked and
    /// changed under one lock, together with the finished-jobs cache.
    pub fn claim(shared: &Arc<Shared>, id: &str) -> Result<Admission, crate::health::Refusal> {
        let mut inner = shared.lock();
        if let Some(done) = inner.results.get(id, Instant::now()) {
            return Ok(Admission::Replay(done));
        }
        inner.health.admit(id)?;
        inner.health.job = Some(id.to_owned());
        Ok(Admission::Run(Slot {
            shared: shared.clone(),
            id: id.to_owned(),
        }))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut inner = self.shared.lock();
        if inner.health.job.as_deref() == Some(self.id.as_str()) {
            inner.health.job = None;
        }
        drop(inner);
        self.shared.slot_freed.notify_waiters();
    }
}

pub(crate) enum Admission {
    Run(Slot),
    Replay(Arc<Finished>),
}

/// Where a job's events go: the answer's body. A closed channel means the client left.
#[derive(Clone)]
pub(crate) struct Out {
    tx: mpsc::Sender<Event>,
}

impl Out {
    pub fn new(tx: mpsc::Sender<Event>) -> Self {
        Out { tx }
    }
}

/// Why a job stops before its natural end.
#[derive(Debug)]
enum Stop {
    /// Retry elsewhere (`aborted`).
    Abort(AbortReason, String),
    /// The job's own failure found by the worker (`error`, kind `worker`).
    Fail(&'static str, String),
    /// Nobody is listening any more.
    ClientGone,
}

/// A job ready to run: inline inputs already on disk.
pub(crate) struct JobRun {
    pub shared: Arc<Shared>,
    pub slot: Slot,
    pub req: RunRequest,
    pub dir: PathBuf,
    /// Inline inputs written to disk.
    pub inputs: Vec<InputFile>,
    /// `(name, key)` of inputs to fetch from the store.
    pub stored_inputs: Vec<(String, String)>,
    pub out: Out,
    /// Previews and progress text are sent (not in async mode).
    pub previews: bool,
    pub accepted_at: Instant,
}

/// Starts the job in its own task, supervised: a panic ends the stream with `aborted`
/// (reason `internal`) and the slot and directory are released whatever happens.
pub(crate) fn spawn(run: JobRun) {
    let job_id = run.req.job_id.clone();
    let out = run.out.clone();
    let accepted_at = run.accepted_at;
    let dir = run.dir.clone();
    let shared = run.shared.clone();
    tokio::spawn(async move {
        let task = tokio::spawn(execute(run));
        match task.await {
            Ok(()) => {}
            Err(e) => {
                tracing::error!(job = %job_id, error = %e, "job task failed");
                let _ = out
                    .tx
                    .send(Event::Aborted {
                        job_id: job_id.clone(),
                        reason: AbortReason::Internal,
                        message: "the worker failed; retry elsewhere".into(),
                        timing: Timing {
                            total_ms: ms(accepted_at.elapsed()),
                            execution_ms: None,
                        },
                    })
                    .await;
                // The slot went with the task; a kept result owns its directory.
                let kept = lock(&shared.inner).results.get(&job_id, Instant::now());
                if kept.is_none() {
                    let _ = tokio::fs::remove_dir_all(&dir).await;
                }
            }
        }
    });
}

/// State of one running job.
struct Job {
    shared: Arc<Shared>,
    id: String,
    comfy_id: String,
    out: Option<Out>,
    previews: bool,
    last_preview: Option<Instant>,
    aborted: watch::Receiver<Option<(AbortReason, String)>>,
    delivered: Vec<KeptFile>,
    by_ref: HashMap<FileRef, usize>,
    inline_bytes: u64,
    output_dir: PathBuf,
    temp_dir: PathBuf,
    accepted_at: Instant,
    started_at: Option<Instant>,
    ended_at: Option<Instant>,
    /// The finished job went into the results cache (which now owns its directory).
    kept: bool,
    /// Released as soon as ComfyUI is free again: before a `result` or `error` goes out
    /// (so the worker reports ready when the reader sees the end), else when the task ends.
    slot: Option<Slot>,
}

async fn execute(run: JobRun) {
    let JobRun {
        shared,
        slot,
        req,
        dir,
        mut inputs,
        stored_inputs,
        out,
        previews,
        accepted_at,
    } = run;
    let id = req.job_id.clone();
    let (abort_tx, aborted) = watch::channel(None);
    let watcher = AbortOnDrop(tokio::spawn(watch_for_abort(shared.clone(), abort_tx)));
    let mut job = Job {
        comfy_id: shared.comfy_prompt_id(&id),
        shared: shared.clone(),
        id: id.clone(),
        out: Some(out),
        previews,
        last_preview: None,
        aborted,
        delivered: Vec::new(),
        by_ref: HashMap::new(),
        inline_bytes: 0,
        output_dir: dir.join("output"),
        temp_dir: dir.join("temp"),
        accepted_at,
        started_at: None,
        ended_at: None,
        kept: false,
        slot: Some(slot),
    };
    tracing::info!(job = %id, attempt = req.attempt.unwrap_or(1), "job accepted");
    let accepted = Event::Accepted {
        job_id: id.clone(),
        worker: shared.worker_id.clone(),
        protocol: PROTOCOL_VERSION,
        replay: false,
    };
    let end = match job.send(accepted).await {
        Err(stop) => Err(stop),
        Ok(()) => match job.fetch_inputs(&stored_inputs, &dir, &mut inputs).await {
            Err(stop) => Err(stop),
            Ok(()) => job.run(req, inputs).await,
        },
    };
    match end {
        Ok(()) => {}
        Err(stop) => job.stop(stop).await,
    }
    drop(watcher);
    // A kept result owns the directory now; otherwise nothing of the job stays.
    if !job.kept {
        let _ = tokio::fs::remove_dir_all(&dir).await;
    }
    drop(job);
}

/// A task that ends with its owner.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sets the job's abort reason: SIGTERM plus the grace, or ComfyUI's death.
async fn watch_for_abort(shared: Arc<Shared>, tx: watch::Sender<Option<(AbortReason, String)>>) {
    let mut deaths = shared.deaths.subscribe();
    deaths.borrow_and_update();
    let grace = shared.args.abort_after();
    let sigterm = async {
        shared.stopping.cancelled().await;
        tokio::time::sleep(grace).await;
    };
    let why = tokio::select! {
        _ = sigterm => (
            AbortReason::Sigterm,
            "the worker is shutting down (scale-down); retry elsewhere".to_owned(),
        ),
        _ = deaths.changed() => (
            AbortReason::ComfyuiDied,
            "ComfyUI on this worker died mid-job; retry elsewhere".to_owned(),
        ),
    };
    let _ = tx.send(Some(why));
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Job {
    fn timing(&self) -> Timing {
        let end = self.ended_at.unwrap_or_else(Instant::now);
        Timing {
            total_ms: ms(self.accepted_at.elapsed()),
            execution_ms: self
                .started_at
                .map(|s| ms(end.saturating_duration_since(s))),
        }
    }

    /// Sends one event; fails when the job must stop (aborted, or the client left).
    async fn send(&mut self, ev: Event) -> Result<(), Stop> {
        let Some(out) = &self.out else {
            return Err(Stop::ClientGone);
        };
        let abort = self.aborted.wait_for(Option::is_some);
        tokio::select! {
            biased;
            r = abort => Err(abort_stop(r.ok().and_then(|v| v.clone()))),
            r = out.tx.send(ev) => r.map_err(|_| Stop::ClientGone),
        }
    }

    /// Ends the stream with `ev` (exactly one final event: the sender is gone after it).
    async fn finish(&mut self, ev: Event) {
        debug_assert!(ev.is_final());
        if let Some(out) = self.out.take() {
            let _ = out.tx.send(ev).await;
        }
    }

    async fn fetch_inputs(
        &mut self,
        stored: &[(String, String)],
        dir: &Path,
        inputs: &mut Vec<InputFile>,
    ) -> Result<(), Stop> {
        if stored.is_empty() {
            return Ok(());
        }
        let Some(store) = self.shared.store.clone() else {
            return Err(Stop::Fail(
                "input_unavailable",
                "inputs by store_key need an output store".into(),
            ));
        };
        let limit = self.shared.args.max_stored_input_bytes;
        for (i, (name, key)) in stored.iter().enumerate() {
            let local = dir.join("input").join(format!("s{i}"));
            if let Some(parent) = local.parent() {
                tokio::fs::create_dir_all(parent)
                    .await
                    .map_err(|e| Stop::Fail("input_unavailable", format!("input {name}: {e}")))?;
            }
            let abort = self.aborted.clone();
            let got = tokio::select! {
                r = store.get_file(key, &local, limit) => r,
                r = wait_abort(abort) => return Err(r),
            };
            got.map_err(|e| Stop::Fail("input_unavailable", format!("input {name}: {e}")))?;
            inputs.push(InputFile {
                local,
                name: name.clone(),
            });
        }
        Ok(())
    }

    async fn run(&mut self, req: RunRequest, inputs: Vec<InputFile>) -> Result<(), Stop> {
        let spec = JobSpec {
            id: self.comfy_id.clone(),
            user: req
                .user
                .clone()
                .filter(|u| !u.is_empty())
                .unwrap_or_else(|| "job".into()),
            prompt: req.prompt,
            extra_data: match req.extra_data {
                Value::Null => json!({}),
                other => other,
            },
            outputs_to_execute: req.outputs_to_execute,
            inputs,
            output_dir: self.output_dir.clone(),
            temp_dir: self.temp_dir.clone(),
            attempt: 1,
            reattach: false,
        };
        let (btx, mut brx) = mpsc::channel(256);
        let (itx, irx) = watch::channel(false);
        // Its own task: ComfyUI's side goes on while outputs are being sent.
        let shared = self.shared.clone();
        let mut run = AbortOnDrop(tokio::spawn(async move {
            let res = shared.comfy.run(spec, btx, irx).await;
            (Instant::now(), res)
        }));
        let mut outcome: Option<Result<Outcome, BackendError>> = None;
        let stopped = loop {
            let abort = wait_abort(self.aborted.clone());
            let client_gone = client_gone(self.out.clone());
            tokio::select! {
                biased;
                s = abort => break Some(s),
                done = &mut run.0, if outcome.is_none() => {
                    let (at, res) = done.unwrap_or_else(|e| {
                        (Instant::now(), Err(BackendError::Protocol(format!("the ComfyUI task failed: {e}"))))
                    });
                    self.ended_at = Some(at);
                    outcome = Some(res);
                }
                // Gone before ComfyUI finished: stop the job. After: keep its result.
                _ = client_gone, if outcome.is_none() => break Some(Stop::ClientGone),
                ev = brx.recv() => match ev {
                    Some(ev) => match self.on_event(ev).await {
                        Ok(()) => {}
                        Err(Stop::ClientGone) if outcome.is_some() || run.0.is_finished() => {
                            self.out = None;
                        }
                        Err(s) => break Some(s),
                    },
                    // The run is over and every event of it was handled.
                    None if outcome.is_some() => break None,
                    None => {}
                },
            }
        };
        if let Some(stop) = stopped {
            // Tell ComfyUI to stop the job, give it a moment to confirm, then let go.
            let _ = itx.send(true);
            self.final_for(stop).await;
            if outcome.is_none() {
                let wind_down = async {
                    let drain = async { while brx.recv().await.is_some() {} };
                    tokio::join!(&mut run.0, drain)
                };
                let _ = tokio::time::timeout(WIND_DOWN, wind_down).await;
            }
            return Ok(());
        }
        let Some(res) = outcome else {
            return Err(Stop::Abort(
                AbortReason::Internal,
                "the job ended without an outcome".into(),
            ));
        };
        self.conclude(res).await
    }

    /// Sends the final event for a stop.
    async fn final_for(&mut self, stop: Stop) {
        let timing = self.timing();
        match stop {
            Stop::ClientGone => {
                tracing::info!(job = %self.id, "client went away; job interrupted and forgotten");
                self.out = None;
            }
            Stop::Abort(reason, message) => {
                tracing::warn!(job = %self.id, ?reason, %message, "job aborted");
                self.finish(Event::Aborted {
                    job_id: self.id.clone(),
                    reason,
                    message,
                    timing,
                })
                .await;
            }
            Stop::Fail(reason, message) => {
                tracing::warn!(job = %self.id, reason, %message, "job failed");
                self.finish(Event::Error {
                    job_id: self.id.clone(),
                    kind: ErrorKind::Worker,
                    data: None,
                    reason: Some(reason.to_owned()),
                    message: Some(message),
                    outputs: None,
                    files: Some(self.files()),
                    status: None,
                    meta: None,
                    timing,
                })
                .await;
            }
        }
    }

    async fn stop(&mut self, stop: Stop) {
        self.final_for(stop).await;
    }

    fn files(&self) -> Vec<DeliveredFile> {
        self.delivered
            .iter()
            .map(|k| DeliveredFile {
                file: k.file.clone(),
                size: k.size,
                sha256: k.sha256.clone(),
                delivery: k.delivery,
                store: k.store.clone(),
            })
            .collect()
    }

    /// The job ran to its end on ComfyUI: deliver what is left, then the final event.
    async fn conclude(&mut self, res: Result<Outcome, BackendError>) -> Result<(), Stop> {
        let outcome = match res {
            Ok(o) => o,
            Err(BackendError::Rejected(body)) => {
                let ev = Event::Error {
                    job_id: self.id.clone(),
                    kind: ErrorKind::Rejected,
                    data: Some(body),
                    reason: None,
                    message: None,
                    outputs: None,
                    files: None,
                    status: None,
                    meta: None,
                    timing: self.timing(),
                };
                self.keep_and_finish(ev).await;
                return Ok(());
            }
            Err(e) => {
                if !matches!(e, BackendError::Protocol(_)) {
                    crate::comfy::suspect(&self.shared).await;
                }
                let reason = match e {
                    _ if self.aborted.borrow().is_some() => AbortReason::ComfyuiDied,
                    BackendError::Unreachable(_) => AbortReason::ComfyuiUnreachable,
                    BackendError::Lost(_) => AbortReason::ComfyuiLostJob,
                    BackendError::Timeout(_) => AbortReason::ComfyuiTimeout,
                    BackendError::Protocol(_) | BackendError::Rejected(_) => {
                        AbortReason::ComfyuiProtocol
                    }
                    // The worker's own disk: this replica cannot keep outputs.
                    BackendError::Storage(_) => AbortReason::Internal,
                };
                return Err(Stop::Abort(reason, format!("{e}; retry elsewhere")));
            }
        };
        let mut outputs = outcome.outputs;
        for ui in outputs.values_mut() {
            self.rename_prompt_id(ui);
        }
        for ui in outputs.values() {
            for file in file_refs(ui) {
                self.deliver(&file).await?;
            }
        }
        let mut messages = Value::Array(outcome.messages);
        self.rename_prompt_id(&mut messages);
        let (success, kind) = match outcome.kind {
            OutcomeKind::Success => (true, None),
            OutcomeKind::ExecutionError(mut d) => {
                self.rename_prompt_id(&mut d);
                (false, Some((ErrorKind::ExecutionError, d)))
            }
            OutcomeKind::Interrupted(mut d) => {
                self.rename_prompt_id(&mut d);
                (false, Some((ErrorKind::Interrupted, d)))
            }
        };
        let status = json!({
            "status_str": if success { "success" } else { "error" },
            "completed": success,
            "messages": messages,
        });
        let ev = match kind {
            None => Event::Result {
                job_id: self.id.clone(),
                outputs,
                files: self.files(),
                status,
                meta: outcome.meta,
                timing: self.timing(),
            },
            Some((kind, data)) => Event::Error {
                job_id: self.id.clone(),
                kind,
                data: Some(data),
                reason: None,
                message: None,
                outputs: Some(outputs),
                files: Some(self.files()),
                status: Some(status),
                meta: Some(outcome.meta),
                timing: self.timing(),
            },
        };
        self.keep_and_finish(ev).await;
        Ok(())
    }

    /// Records a finished job for replays, then sends its final event.
    async fn keep_and_finish(&mut self, ev: Event) {
        let dir = self.output_dir.parent().map(Path::to_path_buf);
        let bytes = self
            .delivered
            .iter()
            .filter(|k| k.path.is_some())
            .map(|k| k.size)
            .sum();
        let finished = Finished {
            job_id: self.id.clone(),
            files: self.delivered.clone(),
            final_event: ev.clone(),
            dir,
            bytes,
        };
        lock(&self.shared.inner)
            .results
            .insert(finished, Instant::now());
        self.kept = true;
        let outcome = match &ev {
            Event::Result { .. } => "result",
            Event::Error { .. } => "error",
            _ => "other",
        };
        tracing::info!(job = %self.id, outcome, files = self.delivered.len(), "job finished");
        // ComfyUI is done with it and its directory is the cache's (each run has its own).
        self.slot.take();
        self.finish(ev).await;
    }

    async fn on_event(&mut self, ev: BackendEvent) -> Result<(), Stop> {
        match ev {
            BackendEvent::Submitted => {
                let ev = Event::Submitted {
                    job_id: self.id.clone(),
                };
                self.send(ev).await
            }
            BackendEvent::Started => {
                self.started_at.get_or_insert_with(Instant::now);
                let ev = Event::Started {
                    job_id: self.id.clone(),
                };
                self.send(ev).await
            }
            BackendEvent::Notice(message) => {
                let ev = Event::Notice {
                    job_id: self.id.clone(),
                    message,
                };
                self.send(ev).await
            }
            BackendEvent::Message(mut msg) => {
                self.rename_prompt_id(&mut msg);
                if msg.get("type").and_then(Value::as_str) == Some("executed")
                    && let Some(output) = msg.pointer("/data/output")
                {
                    for file in file_refs(output) {
                        self.deliver(&file).await?;
                    }
                }
                let ev = Event::Comfyui {
                    job_id: self.id.clone(),
                    message: msg,
                };
                self.send(ev).await
            }
            BackendEvent::Binary(frame) => self.on_binary(frame).await,
        }
    }

    async fn on_binary(&mut self, frame: Bytes) -> Result<(), Stop> {
        if !self.previews || frame.len() < 4 {
            return Ok(());
        }
        let kind = u32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]]);
        let frame = if matches!(kind, 1 | 4) {
            let every = Duration::from_millis(self.shared.args.preview_interval_ms);
            let too_soon = self.last_preview.is_some_and(|t| t.elapsed() < every);
            if every.is_zero() || too_soon || frame.len() > MAX_PREVIEW_BYTES {
                return Ok(());
            }
            self.last_preview = Some(Instant::now());
            self.rename_in_frame(frame)
        } else {
            frame
        };
        let ev = Event::Preview {
            job_id: self.id.clone(),
            frame: B64.encode(&frame),
        };
        self.send(ev).await
    }

    /// A rerun has its own ComfyUI prompt id; the reader only knows the job id.
    fn rename_prompt_id(&self, v: &mut Value) {
        if self.comfy_id != self.id {
            rename_prompt_id(v, &self.comfy_id, &self.id);
        }
    }

    fn rename_in_frame(&self, frame: Bytes) -> Bytes {
        if self.comfy_id == self.id {
            return frame;
        }
        match BinaryFrame::decode(&frame) {
            Ok(BinaryFrame::PreviewImageWithMetadata {
                mut metadata,
                image,
            }) => {
                rename_prompt_id(&mut metadata, &self.comfy_id, &self.id);
                Bytes::from(BinaryFrame::PreviewImageWithMetadata { metadata, image }.encode())
            }
            _ => frame,
        }
    }

    /// Sends a file once: inline while the job's inline budget lasts, else to the store.
    async fn deliver(&mut self, file: &FileRef) -> Result<(), Stop> {
        if self.by_ref.contains_key(file) {
            return Ok(());
        }
        let dir = match file.kind.as_str() {
            "output" => &self.output_dir,
            "temp" => &self.temp_dir,
            _ => return Ok(()),
        };
        // The ComfyUI client saved it under exactly this name (subfolder "").
        if !file.subfolder.is_empty() || file.filename.contains(['/', '\\']) {
            return Ok(());
        }
        let path = dir.join(&file.filename);
        let size = tokio::fs::metadata(&path)
            .await
            .map_err(|e| {
                Stop::Abort(
                    AbortReason::Internal,
                    format!("output {} is missing on the worker: {e}", file.filename),
                )
            })?
            .len();
        let args = &self.shared.args;
        let kept = if self.inline_bytes.saturating_add(size) <= args.inline_max_bytes {
            self.inline_bytes += size;
            let chunk = usize::try_from(args.chunk_bytes).unwrap_or(196_608);
            let sha256 = match send_inline(self, file, &path, size, chunk).await {
                Ok(sha) => sha,
                // Nobody listens any more: the file is still recorded, so a finished job
                // is kept for a retry all the same.
                Err(Stop::ClientGone) => {
                    self.out = None;
                    hash_file(&path).await.map_err(|e| {
                        Stop::Abort(
                            AbortReason::Internal,
                            format!("output {} could not be read: {e}", file.filename),
                        )
                    })?
                }
                Err(e) => return Err(e),
            };
            KeptFile {
                file: file.clone(),
                size,
                sha256,
                delivery: Delivery::Inline,
                path: Some(path),
                store: None,
            }
        } else if let Some(store) = self.shared.store.clone() {
            let key = store.output_key(&self.id, &file.filename);
            let abort = self.aborted.clone();
            let put = tokio::select! {
                r = store.put_file(&key, &path) => r,
                r = wait_abort(abort) => return Err(r),
            };
            let (size, sha256) = put.map_err(|e| {
                Stop::Abort(
                    AbortReason::OutputStoreFailed,
                    format!("output {} could not be stored: {e}", file.filename),
                )
            })?;
            let store_ref = StoreRef {
                bucket: store.bucket().to_owned(),
                key,
            };
            tracing::info!(job = %self.id, file = %file.filename, size, "output stored");
            let ev = Event::OutputStored {
                job_id: self.id.clone(),
                file: file.clone(),
                size,
                sha256: sha256.clone(),
                store: store_ref.clone(),
            };
            match self.send(ev).await {
                Ok(()) => {}
                Err(Stop::ClientGone) => self.out = None,
                Err(e) => return Err(e),
            }
            // Stored: the local copy is not needed for a replay.
            let _ = tokio::fs::remove_file(&path).await;
            KeptFile {
                file: file.clone(),
                size,
                sha256,
                delivery: Delivery::Store,
                path: None,
                store: Some(store_ref),
            }
        } else {
            return Err(Stop::Fail(
                "output_too_large",
                format!(
                    "output {} ({size} bytes) does not fit the {}-byte inline limit and no output store is configured",
                    file.filename, args.inline_max_bytes
                ),
            ));
        };
        self.by_ref.insert(file.clone(), self.delivered.len());
        self.delivered.push(kept);
        Ok(())
    }
}

/// SHA-256 (hex) of a file, read piece by piece.
async fn hash_file(path: &Path) -> std::io::Result<String> {
    let mut f = tokio::fs::File::open(path).await?;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf).await?;
        if n == 0 {
            return Ok(hex::encode(hash.finalize()));
        }
        hash.update(&buf[..n]);
    }
}

/// `output_file`, the chunks read from disk one at a time, `output_end`; the SHA-256.
async fn send_inline(
    job: &mut Job,
    file: &FileRef,
    path: &Path,
    size: u64,
    chunk: usize,
) -> Result<String, Stop> {
    let id = job.id.clone();
    let read_err = |e: std::io::Error| {
        Stop::Abort(
            AbortReason::Internal,
            format!("output {} could not be read: {e}", file.filename),
        )
    };
    let mut f = tokio::fs::File::open(path).await.map_err(read_err)?;
    job.send(Event::OutputFile {
        job_id: id.clone(),
        file: file.clone(),
        size,
        chunks: size.div_ceil(chunk as u64),
    })
    .await?;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; chunk];
    let mut sent = 0u64;
    let mut index = 0u64;
    while sent < size {
        let want = usize::try_from((size - sent).min(chunk as u64)).unwrap_or(chunk);
        f.read_exact(&mut buf[..want]).await.map_err(read_err)?;
        hash.update(&buf[..want]);
        sent += want as u64;
        job.send(Event::OutputChunk {
            job_id: id.clone(),
            file: file.clone(),
            index,
            data: B64.encode(&buf[..want]),
        })
        .await?;
        index += 1;
    }
    let sha256 = hex::encode(hash.finalize());
    job.send(Event::OutputEnd {
        job_id: id,
        file: file.clone(),
        size,
        sha256: sha256.clone(),
    })
    .await?;
    Ok(sha256)
}

/// Replays a finished job: `accepted` (replay), its files again, its final event.
pub(crate) fn spawn_replay(
    shared: Arc<Shared>,
    done: Arc<Finished>,
    tx: mpsc::Sender<Event>,
    chunk: usize,
) {
    let job_id = done.job_id.clone();
    let task = tokio::spawn(async move {
        let id = done.job_id.clone();
        tracing::info!(job = %id, "replaying a finished job");
        let send = |ev: Event| {
            let tx = tx.clone();
            async move { tx.send(ev).await.is_ok() }
        };
        let accepted = Event::Accepted {
            job_id: id.clone(),
            worker: shared.worker_id.clone(),
            protocol: PROTOCOL_VERSION,
            replay: true,
        };
        if !send(accepted).await {
            return;
        }
        for kept in &done.files {
            let ok = match (&kept.path, &kept.store) {
                (Some(path), _) => replay_inline(&tx, &id, kept, path, chunk).await,
                (None, Some(store)) => {
                    send(Event::OutputStored {
                        job_id: id.clone(),
                        file: kept.file.clone(),
                        size: kept.size,
                        sha256: kept.sha256.clone(),
                        store: store.clone(),
                    })
                    .await
                }
                (None, None) => true,
            };
            if !ok {
                // The stream ends without a final event: the reader retries.
                return;
            }
        }
        let _ = tx.send(done.final_event.clone()).await;
    });
    // Supervised: a failure is logged; the stream then ends without a final event and
    // the reader retries.
    tokio::spawn(async move {
        if let Err(e) = task.await {
            tracing::error!(job = %job_id, error = %e, "replay task failed");
        }
    });
}

async fn replay_inline(
    tx: &mpsc::Sender<Event>,
    id: &str,
    kept: &KeptFile,
    path: &Path,
    chunk: usize,
) -> bool {
    let Ok(mut f) = tokio::fs::File::open(path).await else {
        tracing::error!(job = %id, file = %kept.file.filename, "kept output is gone");
        return false;
    };
    let file = &kept.file;
    let head = Event::OutputFile {
        job_id: id.to_owned(),
        file: file.clone(),
        size: kept.size,
        chunks: kept.size.div_ceil(chunk as u64),
    };
    if tx.send(head).await.is_err() {
        return false;
    }
    let mut buf = vec![0u8; chunk];
    let mut sent = 0u64;
    let mut index = 0;
    while sent < kept.size {
        let want = usize::try_from((kept.size - sent).min(chunk as u64)).unwrap_or(chunk);
        if f.read_exact(&mut buf[..want]).await.is_err() {
            return false;
        }
        sent += want as u64;
        let ev = Event::OutputChunk {
            job_id: id.to_owned(),
            file: file.clone(),
            index,
            data: B64.encode(&buf[..want]),
        };
        if tx.send(ev).await.is_err() {
            return false;
        }
        index += 1;
    }
    let end = Event::OutputEnd {
        job_id: id.to_owned(),
        file: file.clone(),
        size: kept.size,
        sha256: kept.sha256.clone(),
    };
    tx.send(end).await.is_ok()
}

fn abort_stop(why: Option<(AbortReason, String)>) -> Stop {
    let (reason, message) =
        why.unwrap_or((AbortReason::Internal, "the job was aborted".to_owned()));
    Stop::Abort(reason, message)
}

async fn wait_abort(mut rx: watch::Receiver<Option<(AbortReason, String)>>) -> Stop {
    let why = rx.wait_for(Option::is_some).await.map(|v| v.clone());
    match why {
        Ok(v) => abort_stop(v),
        // The watcher is gone: no abort will come.
        Err(_) => std::future::pending().await,
    }
}

async fn client_gone(out: Option<Out>) {
    match out {
        Some(o) => o.tx.closed().await,
        None => std::future::pending().await,
    }
}

/// Every `{filename, subfolder, type}` object in a node's ui dict.
pub(crate) fn file_refs(ui: &Value) -> Vec<FileRef> {
    let Some(map) = ui.as_object() else {
        return Vec::new();
    };
    map.values()
        .filter_map(Value::as_array)
        .flatten()
        .filter_map(|item| {
            let o = item.as_object()?;
            Some(FileRef {
                filename: o.get("filename")?.as_str()?.to_owned(),
                subfolder: o
                    .get("subfolder")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned(),
                kind: o
                    .get("type")
                    .and_then(Value::as_str)
                    .unwrap_or("output")
                    .to_owned(),
            })
        })
        .collect()
}

/// Replaces every `"prompt_id": from` (at any depth) with `to`.
pub(crate) fn rename_prompt_id(v: &mut Value, from: &str, to: &str) {
    match v {
        Value::Object(m) => {
            for (k, child) in m.iter_mut() {
                if k == "prompt_id" && child.as_str() == Some(from) {
                    *child = Value::String(to.to_owned());
                } else {
                    rename_prompt_id(child, from, to);
                }
            }
        }
        Value::Array(items) => {
            for child in items {
                rename_prompt_id(child, from, to);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_refs_and_prompt_ids() {
        let ui = json!({
            "images": [{"filename": "a.png", "subfolder": "", "type": "output"}, {"filename": "t.png", "type": "temp"}],
            "animated": [true],
            "text": ["hello"]
        });
        let refs = file_refs(&ui);
        assert_eq!(refs.len(), 2);
        assert_eq!(refs[1].kind, "temp");
        let mut v = json!({"type": "x", "data": {"prompt_id": "j.r1", "nodes": {"1": {"prompt_id": "j.r1"}}, "other": "j.r1"}});
        rename_prompt_id(&mut v, "j.r1", "j");
        assert_eq!(v["data"]["prompt_id"], "j");
        assert_eq!(v["data"]["nodes"]["1"]["prompt_id"], "j");
        assert_eq!(v["data"]["other"], "j.r1");
    }
}
