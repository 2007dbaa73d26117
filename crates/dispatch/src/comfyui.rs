//! The `comfyui` (direct) backend: any ComfyUI server reached by URL, driven
//! through ComfyUI's own API (PROTOCOL.md §2–§4).
//!
//! One job: open `/ws?clientId=comfyume-<job id>` first, upload the
//! participant's inputs into a per-participant subfolder, `POST /prompt` with
//! `prompt_id` = our job id, relay the job's WebSocket events (outputs already
//! downloaded and renamed into the participant's folders), and confirm the end
//! in `/history/{id}`. A dropped socket, a silent backend or a restart of our
//! server are resolved against `/history` and `/queue`.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use reqwest::{Method, RequestBuilder, StatusCode, Url};
use serde_json::{Map, Value, json};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite;
use tracing::Instrument;

use crate::backend::{
    Backend, BackendError, BackendEvent, EventTx, JobSpec, Outcome, OutcomeKind, Timeouts,
};
use comfyume_wire::shapes::ws::{BinaryFrame, ws_message};

/// WebSocket re-connection attempts after a drop, before the backend is
/// considered gone.
const RECONNECT_TRIES: u32 = 5;
const RECONNECT_FIRST_DELAY: Duration = Duration::from_millis(100);
const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(1);

/// Latency of each call to a ComfyUI backend, by backend and call.
pub const BACKEND_CALL_DURATION: &str = "comfyume_backend_call_duration_seconds";
/// Failed calls to a ComfyUI backend, by backend, call and error kind.
pub const BACKEND_CALL_ERRORS: &str = "comfyume_backend_call_errors_total";
/// WebSocket re-connections after a drop mid-job, by backend.
pub const BACKEND_WS_RECONNECTS: &str = "comfyume_backend_websocket_reconnects_total";

/// Registers the descriptions of this module's metrics (once per process).
pub fn describe_metrics() {
    metrics::describe_histogram!(
        BACKEND_CALL_DURATION,
        metrics::Unit::Seconds,
        "Latency of calls to ComfyUI backends by backend and call"
    );
    metrics::describe_counter!(
        BACKEND_CALL_ERRORS,
        "Failed calls to ComfyUI backends by backend, call and error kind"
    );
    metrics::describe_counter!(
        BACKEND_WS_RECONNECTS,
        "WebSocket re-connections to ComfyUI backends after a drop mid-job"
    );
}

/// File endings of model weights, for [`model_files`].
const MODEL_EXTENSIONS: &[&str] = &[
    ".safetensors",
    ".ckpt",
    ".pt",
    ".pth",
    ".bin",
    ".gguf",
    ".sft",
];

/// The model files a prompt loads: string input values that name weights,
/// sorted and de-duplicated. The dispatcher prefers the backend that last ran
/// the same set (its models are still in VRAM).
pub fn model_files(prompt: &Value) -> Vec<String> {
    let mut out: Vec<String> = prompt
        .as_object()
        .into_iter()
        .flat_map(|nodes| nodes.values())
        .filter_map(|node| node.get("inputs").and_then(Value::as_object))
        .flat_map(|inputs| inputs.values())
        .filter_map(Value::as_str)
        .filter(|s| {
            let lower = s.to_ascii_lowercase();
            MODEL_EXTENSIONS.iter().any(|ext| lower.ends_with(ext))
        })
        .map(str::to_owned)
        .collect();
    out.sort();
    out.dedup();
    out
}

/// A ComfyUI server used as a backend.
pub struct ComfyUiBackend {
    name: String,
    base: Url,
    slots: usize,
    timeouts: Timeouts,
    http: reqwest::Client,
    /// Output node classes from the last `/object_info`, to decide whether a
    /// job runs only part of its outputs.
    output_classes: Mutex<Option<Arc<HashSet<String>>>>,
}

impl std::fmt::Debug for ComfyUiBackend {
    // The URL stays out: it may carry credentials.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ComfyUiBackend")
            .field("name", &self.name)
            .field("slots", &self.slots)
            .finish_non_exhaustive()
    }
}

impl ComfyUiBackend {
    /// `base_url` is the server's root (`http://gpu-1:8188`, or with a path
    /// prefix). Only the URL's shape is checked here; nothing is contacted.
    pub fn new(
        name: impl Into<String>,
        base_url: impl AsRef<str>,
        slots: usize,
        timeouts: Timeouts,
    ) -> Result<Self, BackendError> {
        let name = name.into();
        let mut base = Url::parse(base_url.as_ref().trim()).map_err(|e| {
            BackendError::Unreachable(format!("backend {name}: invalid server URL ({e})"))
        })?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(BackendError::Unreachable(format!(
                "backend {name}: the server URL must be http:// or https://"
            )));
        }
        base.set_query(None);
        base.set_fragment(None);
        // reqwest is built without a default crypto provider; https needs one.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .connect_timeout(timeouts.request)
            // The WebSocket does not go through a proxy either.
            .no_proxy()
            .build()
            .map_err(|e| {
                BackendError::Unreachable(format!("backend {name}: no HTTP client: {e}"))
            })?;
        Ok(ComfyUiBackend {
            name,
            base,
            slots: slots.max(1),
            timeouts,
            http,
            output_classes: Mutex::new(None),
        })
    }

    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    /// `base` + path segments (each percent-encoded).
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    fn ws_url(&self, client_id: &str) -> String {
        let mut url = self.url(&["ws"]);
        let scheme = if self.base.scheme() == "https" {
            "wss"
        } else {
            "ws"
        };
        // http -> ws is allowed (both are "special" schemes).
        let _ = url.set_scheme(scheme);
        url.query_pairs_mut().append_pair("clientId", client_id);
        url.to_string()
    }

    /// Sends a request with its time limit, mapping transport failures.
    async fn send(
        &self,
        what: &str,
        req: RequestBuilder,
        limit: Duration,
    ) -> Result<reqwest::Response, BackendError> {
        let started = std::time::Instant::now();
        let res = req.timeout(limit).send().await;
        metrics::histogram!(BACKEND_CALL_DURATION, "backend" => self.name.clone(), "call" => what.to_owned())
            .record(started.elapsed().as_secs_f64());
        res.map_err(|e| self.failed(what, http_error(what, limit, e)))
    }

    /// Counts a failed call.
    fn failed(&self, what: &str, e: BackendError) -> BackendError {
        let kind = match &e {
            BackendError::Unreachable(_) => "unreachable",
            BackendError::Lost(_) => "lost",
            BackendError::Timeout(_) => "timeout",
            BackendError::Protocol(_) => "protocol",
            BackendError::Rejected(_) => "rejected",
        };
        metrics::counter!(BACKEND_CALL_ERRORS, "backend" => self.name.clone(), "call" => what.to_owned(), "kind" => kind)
            .increment(1);
        e
    }

    /// A call that must answer 200 with a JSON body.
    async fn json_call(
        &self,
        what: &str,
        req: RequestBuilder,
        limit: Duration,
    ) -> Result<Value, BackendError> {
        let resp = self.send(what, req, limit).await?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(|e| http_error(what, limit, e))?;
        if status != StatusCode::OK {
            return Err(BackendError::Protocol(format!(
                "{what} answered HTTP {status}"
            )));
        }
        serde_json::from_slice(&body)
            .map_err(|e| BackendError::Protocol(format!("{what} answered invalid JSON: {e}")))
    }

    /// A POST whose answer is ComfyUI's empty 200 (`/interrupt`, `/queue`).
    async fn post_empty(&self, what: &str, path: &str, body: Value) -> Result<(), BackendError> {
        let req = self
            .http
            .request(Method::POST, self.url(&[path]))
            .json(&body);
        let resp = self.send(what, req, self.timeouts.request).await?;
        if resp.status() != StatusCode::OK {
            return Err(BackendError::Protocol(format!(
                "{what} answered HTTP {}",
                resp.status()
            )));
        }
        Ok(())
    }

    /// `GET /history/{id}`: the entry, or `None` (ComfyUI answers `{}`).
    async fn history(&self, id: &str) -> Result<Option<Value>, BackendError> {
        let req = self.http.get(self.url(&["history", id]));
        let v = self
            .json_call("GET /history/{id}", req, self.timeouts.request)
            .await?;
        match v {
            Value::Object(mut m) => Ok(m.remove(id)),
            _ => Err(BackendError::Protocol(
                "GET /history/{id} did not answer an object".into(),
            )),
        }
    }

    /// Where `GET /queue` has the prompt.
    async fn queue_place(&self, id: &str) -> Result<Option<Place>, BackendError> {
        let req = self.http.get(self.url(&["queue"]));
        let v = self
            .json_call("GET /queue", req, self.timeouts.request)
            .await?;
        let holds = |key: &str| -> Result<bool, BackendError> {
            let items = v.get(key).and_then(Value::as_array).ok_or_else(|| {
                BackendError::Protocol(format!("GET /queue answered without {key}"))
            })?;
            Ok(items
                .iter()
                .any(|item| item.get(1).and_then(Value::as_str) == Some(id)))
        };
        if holds("queue_running")? {
            Ok(Some(Place::Running))
        } else if holds("queue_pending")? {
            Ok(Some(Place::Pending))
        } else {
            Ok(None)
        }
    }

    /// Where the prompt is on the backend right now.
    async fn locate(&self, id: &str) -> Result<Remote, BackendError> {
        if let Some(entry) = self.history(id).await? {
            return Ok(Remote::Finished(entry));
        }
        match self.queue_place(id).await? {
            Some(Place::Running) => Ok(Remote::Running),
            Some(Place::Pending) => Ok(Remote::Pending),
            // It may have finished between the two calls.
            None => Ok(match self.history(id).await? {
                Some(entry) => Remote::Finished(entry),
                None => Remote::Gone,
            }),
        }
    }

    /// The output node classes, from a cached or a fresh `/object_info`;
    /// `None` if it cannot be had.
    async fn output_classes(&self) -> Option<Arc<HashSet<String>>> {
        if let Some(c) = lock(&self.output_classes).clone() {
            return Some(c);
        }
        self.object_info().await.ok()?;
        lock(&self.output_classes).clone()
    }

    /// Opens the job's socket and announces `supports_preview_metadata` (only
    /// a client's first message counts), then reads it in a task.
    async fn connect_ws(&self, client_id: &str) -> Result<WsConn, BackendError> {
        let what = "WebSocket /ws";
        let limit = self.timeouts.request;
        let url = self.ws_url(client_id);
        let (mut ws, _) =
            match tokio::time::timeout(limit, tokio_tungstenite::connect_async(url)).await {
                Err(_) => {
                    return Err(self.failed(
                        what,
                        BackendError::Timeout(format!(
                            "{what}: no answer within {} ms",
                            limit.as_millis()
                        )),
                    ));
                }
                Ok(Err(e)) => return Err(self.failed(what, ws_error(what, e))),
                Ok(Ok(pair)) => pair,
            };
        let flags = ws_message("feature_flags", json!({"supports_preview_metadata": true}));
        match tokio::time::timeout(
            limit,
            ws.send(tungstenite::Message::text(flags.to_string())),
        )
        .await
        {
            Err(_) => {
                return Err(BackendError::Timeout(format!(
                    "{what}: could not send feature flags within {} ms",
                    limit.as_millis()
                )));
            }
            Ok(Err(e)) => return Err(ws_error(what, e)),
            Ok(Ok(())) => {}
        }
        let (tx, rx) = mpsc::unbounded_channel();
        // Read without pause: ComfyUI's publish loop waits on slow sockets,
        // which would stall every client of that server.
        let task = tokio::spawn(async move {
            loop {
                let ev = match ws.next().await {
                    Some(Ok(tungstenite::Message::Text(t))) => WsEvent::Text(t.to_string()),
                    Some(Ok(tungstenite::Message::Binary(b))) => WsEvent::Binary(b),
                    Some(Ok(tungstenite::Message::Close(_))) => {
                        let _ = tx.send(WsEvent::Closed("closed by the server".into()));
                        return;
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => {
                        let _ = tx.send(WsEvent::Closed(e.to_string()));
                        return;
                    }
                    None => {
                        let _ = tx.send(WsEvent::Closed("connection ended".into()));
                        return;
                    }
                };
                if tx.send(ev).is_err() {
                    return;
                }
            }
        });
        Ok(WsConn { rx, task })
    }
}

#[async_trait::async_trait]
impl Backend for ComfyUiBackend {
    fn name(&self) -> &str {
        &self.name
    }

    fn slots(&self) -> usize {
        self.slots
    }

    async fn object_info(&self) -> Result<Value, BackendError> {
        let req = self.http.get(self.url(&["object_info"]));
        let v = self
            .json_call("GET /object_info", req, self.timeouts.transfer)
            .await?;
        let Value::Object(classes) = &v else {
            return Err(BackendError::Protocol(
                "GET /object_info did not answer an object".into(),
            ));
        };
        let outputs: HashSet<String> = classes
            .iter()
            .filter(|(_, info)| info.get("output_node") == Some(&Value::Bool(true)))
            .map(|(class, _)| class.clone())
            .collect();
        *lock(&self.output_classes) = Some(Arc::new(outputs));
        Ok(v)
    }

    async fn run(
        &self,
        job: JobSpec,
        events: EventTx,
        interrupt: watch::Receiver<bool>,
    ) -> Result<Outcome, BackendError> {
        let span = tracing::info_span!("comfyui_job", backend = %self.name, job = %job.id, attempt = job.attempt);
        let mut run = JobRun {
            b: self,
            client_id: format!("comfyume-{}", job.id),
            job,
            events,
            fetched: HashMap::new(),
            relayed: HashSet::new(),
            started: false,
            ws_error: None,
            ws_interrupted: None,
        };
        let cancel_requested = interrupt.clone();
        let res = match run.execute(interrupt).instrument(span).await {
            // The owner cancelled it: whatever went wrong since, it must not
            // be retried elsewhere.
            Err(e) if *cancel_requested.borrow() => {
                tracing::warn!(backend = %self.name, job = %run.job.id, error = %e, "cancelled job ended with an error; reporting it interrupted");
                Ok(run.cancelled())
            }
            other => other,
        };
        match &res {
            Ok(o) => {
                tracing::info!(backend = %self.name, job = %run.job.id, outcome = outcome_label(&o.kind), "job ended on backend")
            }
            Err(e) => {
                tracing::warn!(backend = %self.name, job = %run.job.id, error = %e, "job failed on backend")
            }
        }
        res
    }
}

fn outcome_label(kind: &OutcomeKind) -> &'static str {
    match kind {
        OutcomeKind::Success => "success",
        OutcomeKind::ExecutionError(_) => "execution_error",
        OutcomeKind::Interrupted(_) => "interrupted",
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Running,
    Pending,
}

/// A prompt's state on the backend.
enum Remote {
    Finished(Value),
    Running,
    Pending,
    /// Neither in history nor in the queue: the backend forgot it.
    Gone,
}

enum WsEvent {
    Text(String),
    Binary(Bytes),
    Closed(String),
}

/// The job's socket: frames arrive on `rx`; dropping it stops the reader.
struct WsConn {
    rx: mpsc::UnboundedReceiver<WsEvent>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WsConn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What one text message meant for the job.
enum Step {
    /// Relayed (true: it was about this job, so the backend is alive).
    Continue(bool),
    /// The end-of-prompt marker.
    End,
}

/// What asking the backend to stop the job led to.
enum Cancel {
    /// It never started (deleted from the pending queue, or already gone).
    Dropped,
    /// It ended meanwhile.
    Finished(Value),
    /// An interrupt is on its way; the end marker follows.
    Stopping,
}

/// State of one job on this backend.
struct JobRun<'a> {
    b: &'a ComfyUiBackend,
    job: JobSpec,
    events: EventTx,
    client_id: String,
    /// Backend file `(type, subfolder, filename)` -> local file name, so each
    /// file is fetched once per job.
    fetched: HashMap<(String, String, String), String>,
    /// Nodes whose `executed` was relayed.
    relayed: HashSet<String>,
    started: bool,
    ws_error: Option<Value>,
    ws_interrupted: Option<Value>,
}

impl JobRun<'_> {
    async fn emit(&self, ev: BackendEvent) {
        // A dispatcher that stopped listening has given up on the job; the
        // backend still runs it to its end.
        let _ = self.events.send(ev).await;
    }

    async fn mark_started(&mut self) {
        if !self.started {
            self.started = true;
            self.emit(BackendEvent::Started).await;
        }
    }

    async fn execute(
        &mut self,
        mut interrupt: watch::Receiver<bool>,
    ) -> Result<Outcome, BackendError> {
        let id = self.job.id.clone();
        if self.job.reattach || self.job.attempt > 1 {
            // After our restart, or a retry that may land on the backend that
            // still has the earlier attempt: never run a job twice.
            if let Some(entry) = self.b.history(&id).await? {
                return self.collect(entry).await.map_err(mid_job);
            }
            if self.b.queue_place(&id).await?.is_some() {
                let ws = self.b.connect_ws(&self.client_id).await?;
                return self.watch(ws, interrupt, true).await.map_err(mid_job);
            }
        }
        if *interrupt.borrow_and_update() {
            return Ok(self.cancelled());
        }
        let ws = self.b.connect_ws(&self.client_id).await?;
        let prompt = self.upload_inputs().await?;
        if *interrupt.borrow_and_update() {
            return Ok(self.cancelled());
        }
        self.submit(prompt).await?;
        self.emit(BackendEvent::Submitted).await;
        self.watch(ws, interrupt, false).await.map_err(mid_job)
    }

    /// An interrupt outcome without node details: the job was cancelled
    /// before it ran here, or the backend could not confirm that it stopped.
    fn cancelled(&self) -> Outcome {
        let data = json!({
            "prompt_id": self.job.id,
            "node_id": null,
            "node_type": null,
            "executed": [],
            "timestamp": now_ms(),
        });
        Outcome {
            messages: vec![json!(["execution_interrupted", data.clone()])],
            kind: OutcomeKind::Interrupted(data),
            outputs: Map::new(),
            meta: Map::new(),
        }
    }

    /// Uploads the participant's input files into `comfyume/<user>/` on the
    /// backend and points the prompt at them there.
    async fn upload_inputs(&self) -> Result<Value, BackendError> {
        let mut prompt = self.job.prompt.clone();
        let user_dir = format!("comfyume/{}", safe_segment(&self.job.user));
        for input in &self.job.inputs {
            let (dir, file) = match input.name.rsplit_once('/') {
                Some((d, f)) if !d.split('/').any(|s| s.is_empty() || s == "." || s == "..") => {
                    (Some(d), f)
                }
                Some((_, f)) => (None, f),
                None => (None, input.name.as_str()),
            };
            let data = tokio::fs::read(&input.local).await.map_err(|e| {
                // The participant's own file is missing: another backend
                // would not find it either.
                BackendError::Rejected(json!({
                    "error": {
                        "type": "invalid_prompt",
                        "message": format!("Input file {} could not be read", input.name),
                        "details": e.to_string(),
                        "extra_info": {},
                    },
                    "node_errors": {},
                }))
            })?;
            let subfolder = match dir {
                Some(d) => format!("{user_dir}/{d}"),
                None => user_dir.clone(),
            };
            let form = reqwest::multipart::Form::new()
                .part(
                    "image",
                    reqwest::multipart::Part::bytes(data).file_name(file.to_owned()),
                )
                .text("subfolder", subfolder)
                .text("type", "input")
                .text("overwrite", "true");
            let req = self
                .b
                .http
                .post(self.b.url(&["upload", "image"]))
                .multipart(form);
            let v = self
                .b
                .json_call("POST /upload/image", req, self.b.timeouts.transfer)
                .await?;
            let name = v.get("name").and_then(Value::as_str).ok_or_else(|| {
                BackendError::Protocol("POST /upload/image answered without a name".into())
            })?;
            let sub = v.get("subfolder").and_then(Value::as_str).unwrap_or("");
            let uploaded = if sub.is_empty() {
                name.to_owned()
            } else {
                format!("{sub}/{name}")
            };
            replace_input(&mut prompt, &input.name, &uploaded);
        }
        Ok(prompt)
    }

    async fn submit(&self, prompt: Value) -> Result<(), BackendError> {
        let mut extra = match &self.job.extra_data {
            Value::Object(m) => m.clone(),
            _ => Map::new(),
        };
        extra.insert("client_id".into(), json!(self.client_id));
        let mut body = json!({
            "prompt": prompt,
            "client_id": self.client_id,
            "prompt_id": self.job.id,
            "extra_data": extra,
        });
        if let Some(targets) = self.partial_targets(&prompt).await {
            body["partial_execution_targets"] = json!(targets);
        }
        let what = "POST /prompt";
        let limit = self.b.timeouts.request;
        let req = self.b.http.post(self.b.url(&["prompt"])).json(&body);
        let resp = self.b.send(what, req, limit).await?;
        let status = resp.status();
        let text = resp.bytes().await.map_err(|e| http_error(what, limit, e))?;
        match status {
            StatusCode::OK => {
                let v: Value = serde_json::from_slice(&text).map_err(|e| {
                    BackendError::Protocol(format!("{what} answered invalid JSON: {e}"))
                })?;
                if v.get("prompt_id").and_then(Value::as_str) != Some(self.job.id.as_str()) {
                    return Err(BackendError::Protocol(format!(
                        "{what} did not accept our prompt_id"
                    )));
                }
                Ok(())
            }
            StatusCode::BAD_REQUEST => Err(BackendError::Rejected(
                serde_json::from_slice(&text).unwrap_or_else(|_| {
                    json!({
                        "error": {
                            "type": "invalid_prompt",
                            "message": String::from_utf8_lossy(&text).trim().to_string(),
                            "details": "",
                            "extra_info": {},
                        },
                        "node_errors": {},
                    })
                }),
            )),
            s => Err(BackendError::Protocol(format!("{what} answered HTTP {s}"))),
        }
    }

    /// `partial_execution_targets` only when the job runs some but not all of
    /// its output nodes. Without node definitions the targets are sent
    /// whenever there are any: for ComfyUI that means the same thing.
    async fn partial_targets(&self, prompt: &Value) -> Option<Vec<String>> {
        let targets = &self.job.outputs_to_execute;
        if targets.is_empty() {
            return None;
        }
        let Some(classes) = self.b.output_classes().await else {
            return Some(targets.clone());
        };
        let all_outputs: Vec<&String> = prompt
            .as_object()?
            .iter()
            .filter(|(_, node)| {
                node.get("class_type")
                    .and_then(Value::as_str)
                    .is_some_and(|c| classes.contains(c))
            })
            .map(|(id, _)| id)
            .collect();
        let strict = all_outputs.iter().any(|id| !targets.contains(id));
        strict.then(|| targets.clone())
    }

    /// Follows the job on its socket to the end.
    async fn watch(
        &mut self,
        mut ws: WsConn,
        mut interrupt: watch::Receiver<bool>,
        locate_first: bool,
    ) -> Result<Outcome, BackendError> {
        let t = self.b.timeouts;
        let mut last_seen = Instant::now();
        let mut stop_deadline: Option<Instant> = None;
        let mut interrupt_open = true;
        if locate_first {
            // Attached to a running job: it may have ended while we connected.
            if let Some(outcome) = self.check_remote().await? {
                return Ok(outcome);
            }
        }
        loop {
            if stop_deadline.is_none() && *interrupt.borrow_and_update() {
                match self.cancel().await? {
                    Cancel::Dropped => return Ok(self.cancelled()),
                    Cancel::Finished(entry) => return self.collect(entry).await,
                    Cancel::Stopping => stop_deadline = Some(Instant::now() + t.request * 3),
                }
            }
            let silence_at = last_seen + t.silence;
            let wake = stop_deadline.map_or(silence_at, |d| d.min(silence_at));
            tokio::select! {
                ev = ws.rx.recv() => match ev {
                    Some(WsEvent::Text(text)) => match self.on_text(&text).await? {
                        Step::Continue(alive) => {
                            if alive {
                                last_seen = Instant::now();
                            }
                        }
                        Step::End => return self.finish().await,
                    },
                    Some(WsEvent::Binary(frame)) => {
                        if self.on_binary(frame).await {
                            last_seen = Instant::now();
                        }
                    }
                    Some(WsEvent::Closed(why)) => {
                        tracing::warn!(job = %self.job.id, backend = %self.b.name, reason = %why, "WebSocket dropped mid-job; reconnecting");
                        ws = match self.reconnect().await {
                            Ok(ws) => ws,
                            Err(e) => {
                                // The socket stays away; the job may still
                                // have ended there.
                                if let Ok(Remote::Finished(entry)) = self.b.locate(&self.job.id).await {
                                    return self.collect(entry).await;
                                }
                                return Err(e);
                            }
                        };
                        if let Some(outcome) = self.check_remote().await? {
                            return Ok(outcome);
                        }
                        last_seen = Instant::now();
                    }
                    None => return Err(BackendError::Protocol("WebSocket reader stopped".into())),
                },
                changed = interrupt.changed(), if interrupt_open && stop_deadline.is_none() => {
                    if changed.is_err() {
                        interrupt_open = false;
                    }
                }
                _ = tokio::time::sleep_until(wake) => {
                    let now = Instant::now();
                    if stop_deadline.is_some_and(|d| now >= d) {
                        return match self.b.locate(&self.job.id).await? {
                            Remote::Finished(entry) => self.collect(entry).await,
                            Remote::Gone => Ok(self.cancelled()),
                            // The owner cancelled it: report it stopped rather
                            // than failed (a failure would be retried). ComfyUI
                            // honours the interrupt at its next node boundary.
                            Remote::Running | Remote::Pending => {
                                tracing::warn!(job = %self.job.id, backend = %self.b.name, "the backend has not stopped the job yet; reporting it interrupted");
                                Ok(self.cancelled())
                            }
                        };
                    }
                    if now >= silence_at {
                        tracing::info!(job = %self.job.id, backend = %self.b.name, "no WebSocket news; asking /history and /queue");
                        if let Some(outcome) = self.check_remote().await? {
                            return Ok(outcome);
                        }
                        last_seen = Instant::now();
                    }
                }
            }
        }
    }

    /// Where the job is, after a gap in the events: an outcome if it ended,
    /// `None` if it is still queued or running, an error if it is gone.
    async fn check_remote(&mut self) -> Result<Option<Outcome>, BackendError> {
        match self.b.locate(&self.job.id).await? {
            Remote::Finished(entry) => self.collect(entry).await.map(Some),
            Remote::Running => {
                self.mark_started().await;
                Ok(None)
            }
            Remote::Pending => Ok(None),
            Remote::Gone => Err(forgot()),
        }
    }

    async fn reconnect(&self) -> Result<WsConn, BackendError> {
        let mut delay = RECONNECT_FIRST_DELAY;
        let mut last = None;
        for attempt in 1..=RECONNECT_TRIES {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(RECONNECT_MAX_DELAY);
            match self.b.connect_ws(&self.client_id).await {
                Ok(ws) => {
                    metrics::counter!(BACKEND_WS_RECONNECTS, "backend" => self.b.name.clone())
                        .increment(1);
                    tracing::info!(job = %self.job.id, backend = %self.b.name, attempt, "WebSocket reconnected");
                    return Ok(ws);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| BackendError::Unreachable("WebSocket lost".into())))
    }

    /// Asks the backend to stop this job only: delete it while pending,
    /// interrupt it by id while running.
    async fn cancel(&mut self) -> Result<Cancel, BackendError> {
        let id = self.job.id.clone();
        let mut deleted = false;
        loop {
            match self.b.locate(&id).await? {
                Remote::Finished(entry) => return Ok(Cancel::Finished(entry)),
                Remote::Gone => return Ok(Cancel::Dropped),
                Remote::Running => {
                    self.b
                        .post_empty("POST /interrupt", "interrupt", json!({"prompt_id": id}))
                        .await?;
                    return Ok(Cancel::Stopping);
                }
                // Deleted once and still pending: let the deadline decide.
                Remote::Pending if deleted => return Ok(Cancel::Stopping),
                Remote::Pending => {
                    self.b
                        .post_empty("POST /queue", "queue", json!({"delete": [id]}))
                        .await?;
                    // Look again: it may have started just before the delete.
                    deleted = true;
                }
            }
        }
    }

    async fn on_text(&mut self, text: &str) -> Result<Step, BackendError> {
        let Ok(mut msg) = serde_json::from_str::<Value>(text) else {
            return Ok(Step::Continue(false));
        };
        let kind = msg
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        // The backend's own queue state is not the workshop's.
        if matches!(kind.as_str(), "status" | "feature_flags" | "logs") {
            return Ok(Step::Continue(false));
        }
        let id = self.job.id.as_str();
        let prompt_id = msg
            .pointer("/data/prompt_id")
            .and_then(Value::as_str)
            .map(str::to_owned);
        if prompt_id.as_deref().is_some_and(|p| p != id) {
            return Ok(Step::Continue(false));
        }
        let ours = prompt_id.is_some();
        match kind.as_str() {
            "executing" => {
                if msg.pointer("/data/node").is_some_and(Value::is_null) {
                    return Ok(Step::End);
                }
                // A reconnect greeting names the running node without a
                // prompt id; the frontend already had it.
                if !ours {
                    return Ok(Step::Continue(false));
                }
            }
            "execution_start" => self.mark_started().await,
            "executed" => {
                if let Some(data) = msg.get_mut("data").and_then(Value::as_object_mut) {
                    if let Some(node) = data.get("node").and_then(Value::as_str) {
                        self.relayed.insert(node.to_owned());
                    }
                    if let Some(output) = data.get("output").cloned() {
                        let local = self.localize_ui(&output).await?;
                        data.insert("output".into(), local);
                    }
                }
            }
            "execution_error" => self.ws_error = msg.get("data").cloned(),
            "execution_interrupted" => self.ws_interrupted = msg.get("data").cloned(),
            _ => {}
        }
        self.emit(BackendEvent::Message(msg)).await;
        Ok(Step::Continue(ours))
    }

    /// Relays a preview frame unless it names another prompt.
    async fn on_binary(&self, frame: Bytes) -> bool {
        if let Ok(BinaryFrame::PreviewImageWithMetadata { metadata, .. }) =
            BinaryFrame::decode(&frame)
            && metadata
                .get("prompt_id")
                .and_then(Value::as_str)
                .is_some_and(|p| p != self.job.id)
        {
            return false;
        }
        self.emit(BackendEvent::Binary(frame)).await;
        true
    }

    /// After the end marker: the outcome as `/history` records it.
    async fn finish(&mut self) -> Result<Outcome, BackendError> {
        let id = self.job.id.clone();
        if let Some(entry) = self.b.history(&id).await? {
            return self.collect(entry).await;
        }
        // A proxy in front of several replicas may lag; ask once more.
        tokio::time::sleep(Duration::from_millis(200)).await;
        match self.b.history(&id).await? {
            Some(entry) => self.collect(entry).await,
            None => Err(forgot()),
        }
    }

    /// Builds the outcome from a history entry, fetching every output.
    async fn collect(&mut self, entry: Value) -> Result<Outcome, BackendError> {
        let status = entry.get("status").cloned().unwrap_or(Value::Null);
        let messages: Vec<Value> = status
            .get("messages")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let event = |name: &str| {
            messages
                .iter()
                .rev()
                .find(|m| m.get(0).and_then(Value::as_str) == Some(name))
                .and_then(|m| m.get(1))
                .cloned()
        };
        if event("execution_start").is_some() {
            self.mark_started().await;
        }
        let kind = if let Some(data) = event("execution_error").or_else(|| self.ws_error.clone()) {
            OutcomeKind::ExecutionError(data)
        } else if let Some(data) =
            event("execution_interrupted").or_else(|| self.ws_interrupted.clone())
        {
            OutcomeKind::Interrupted(data)
        } else if status.get("status_str").and_then(Value::as_str) == Some("success")
            || status.get("completed") == Some(&Value::Bool(true))
        {
            OutcomeKind::Success
        } else {
            return Err(BackendError::Protocol(
                "history records the job as ended without success or a reason".into(),
            ));
        };

        let mut outputs = Map::new();
        let backend_outputs = entry
            .get("outputs")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        let meta = entry
            .get("meta")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        for (node, ui) in backend_outputs {
            let local = self.localize_ui(&ui).await?;
            // Missed on the socket (a gap, or a job re-attached after our
            // restart): the participant still sees it appear.
            if !self.relayed.contains(&node) {
                self.relayed.insert(node.clone());
                let display = meta
                    .get(&node)
                    .and_then(|m| m.get("display_node"))
                    .and_then(Value::as_str)
                    .unwrap_or(&node)
                    .to_owned();
                self.emit(BackendEvent::Message(ws_message(
                    "executed",
                    json!({"node": node, "display_node": display, "output": local, "prompt_id": self.job.id}),
                )))
                .await;
            }
            outputs.insert(node, local);
        }
        Ok(Outcome {
            kind,
            outputs,
            messages,
            meta,
        })
    }

    /// A node's ui output with every output/temp file fetched into the
    /// participant's folders and referenced there; other keys untouched.
    async fn localize_ui(&mut self, ui: &Value) -> Result<Value, BackendError> {
        let Value::Object(map) = ui else {
            return Ok(ui.clone());
        };
        let mut out = Map::new();
        for (key, value) in map {
            let v = match value {
                Value::Array(items) => {
                    let mut list = Vec::with_capacity(items.len());
                    for item in items {
                        list.push(match item {
                            Value::Object(file) if file.contains_key("filename") => {
                                Value::Object(self.localize_file(file).await?)
                            }
                            other => other.clone(),
                        });
                    }
                    Value::Array(list)
                }
                other => other.clone(),
            };
            out.insert(key.clone(), v);
        }
        Ok(Value::Object(out))
    }

    async fn localize_file(
        &mut self,
        file: &Map<String, Value>,
    ) -> Result<Map<String, Value>, BackendError> {
        let kind = file.get("type").and_then(Value::as_str).unwrap_or("output");
        let dir = match kind {
            "output" => self.job.output_dir.clone(),
            "temp" => self.job.temp_dir.clone(),
            // Inputs are the participant's own files already.
            _ => return Ok(file.clone()),
        };
        let Some(filename) = file.get("filename").and_then(Value::as_str) else {
            return Ok(file.clone());
        };
        let subfolder = file.get("subfolder").and_then(Value::as_str).unwrap_or("");
        let key = (kind.to_owned(), subfolder.to_owned(), filename.to_owned());
        let local = match self.fetched.get(&key) {
            Some(local) => local.clone(),
            None => {
                let local = self.download(kind, subfolder, filename, &dir).await?;
                self.fetched.insert(key, local.clone());
                local
            }
        };
        let mut out = file.clone();
        out.insert("filename".into(), json!(local));
        out.insert("subfolder".into(), json!(""));
        Ok(out)
    }

    /// `GET /view` into `dir` under a name no other file has; returns it.
    async fn download(
        &self,
        kind: &str,
        subfolder: &str,
        filename: &str,
        dir: &Path,
    ) -> Result<String, BackendError> {
        let what = "GET /view";
        let limit = self.b.timeouts.transfer;
        let mut url = self.b.url(&["view"]);
        url.query_pairs_mut()
            .append_pair("filename", filename)
            .append_pair("subfolder", subfolder)
            .append_pair("type", kind);
        let mut resp = self.b.send(what, self.b.http.get(url), limit).await?;
        if resp.status() != StatusCode::OK {
            return Err(BackendError::Protocol(format!(
                "{what} for output {filename} answered HTTP {}",
                resp.status()
            )));
        }
        let local_err = |e: std::io::Error| {
            BackendError::Protocol(format!("cannot save output {filename}: {e}"))
        };
        tokio::fs::create_dir_all(dir).await.map_err(local_err)?;
        let part =
            PartFile::new(dir.join(format!(".comfyume-{}.part", uuid::Uuid::new_v4().simple())));
        let mut f = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&part.0)
            .await
            .map_err(local_err)?;
        while let Some(chunk) = resp.chunk().await.map_err(|e| http_error(what, limit, e))? {
            f.write_all(&chunk).await.map_err(local_err)?;
        }
        f.flush().await.map_err(local_err)?;
        f.sync_all().await.map_err(local_err)?;
        drop(f);
        let base = local_basename(filename);
        for candidate in candidates(&base, &self.job.id) {
            let target = dir.join(&candidate);
            match publish(&part.0, &target).await {
                Ok(true) => return Ok(candidate),
                Ok(false) => continue,
                Err(e) => return Err(local_err(e)),
            }
        }
        Err(BackendError::Protocol(format!(
            "cannot save output {filename}: every candidate name is taken"
        )))
    }
}

/// A downloaded file not yet given its name; removed if the job stops first.
struct PartFile(PathBuf);

impl PartFile {
    fn new(path: PathBuf) -> Self {
        PartFile(path)
    }
}

impl Drop for PartFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Gives the finished file `target`'s name without ever replacing a file:
/// `Ok(false)` if the name is taken.
async fn publish(part: &Path, target: &Path) -> std::io::Result<bool> {
    // A hard link appears complete and fails if the name exists.
    match tokio::fs::hard_link(part, target).await {
        Ok(()) => return Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(false),
        Err(_) => {}
    }
    // Filesystems without hard links: claim the name, then move the data in.
    match tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(target)
        .await
    {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(false),
        Err(e) => return Err(e),
    }
    tokio::fs::rename(part, target).await?;
    Ok(true)
}

/// `name`, then `<stem>_<id8>.<ext>`, then `<stem>_<id8>_<n>.<ext>`.
fn candidates(name: &str, job_id: &str) -> impl Iterator<Item = String> {
    let (stem, ext) = match name.rfind('.') {
        Some(i) if i > 0 => (name[..i].to_owned(), name[i..].to_owned()),
        _ => (name.to_owned(), String::new()),
    };
    let tag: String = safe_segment(job_id).chars().take(8).collect();
    let first = name.to_owned();
    std::iter::once(first)
        .chain(std::iter::once(format!("{stem}_{tag}{ext}")))
        .chain((2..10_000).map(move |n| format!("{stem}_{tag}_{n}{ext}")))
}

/// The file name part of a backend name, safe as a local file name.
fn local_basename(filename: &str) -> String {
    let base = filename
        .rsplit(['/', '\\'])
        .next()
        .unwrap_or_default()
        .trim_start_matches('.');
    if base.is_empty() {
        "output".to_owned()
    } else {
        base.to_owned()
    }
}

/// A path segment from a user or job name: letters, digits, `-`, `_`, `.`.
fn safe_segment(s: &str) -> String {
    let out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let out = out.trim_start_matches('.').to_owned();
    if out.is_empty() { "_".to_owned() } else { out }
}

/// Points every prompt value naming `name` (also `name [input]`) at `uploaded`.
fn replace_input(prompt: &mut Value, name: &str, uploaded: &str) {
    let annotated = format!("{name} [input]");
    let Some(nodes) = prompt.as_object_mut() else {
        return;
    };
    for node in nodes.values_mut() {
        let Some(inputs) = node.get_mut("inputs").and_then(Value::as_object_mut) else {
            continue;
        };
        for value in inputs.values_mut() {
            match value.as_str() {
                Some(s) if s == name => *value = json!(uploaded),
                Some(s) if s == annotated => *value = json!(format!("{uploaded} [input]")),
                _ => {}
            }
        }
    }
}

fn forgot() -> BackendError {
    BackendError::Lost("the GPU server forgot the job".into())
}

/// Once the job is on the backend, a server that cannot be reached any more
/// has lost it.
fn mid_job(e: BackendError) -> BackendError {
    match e {
        BackendError::Unreachable(m) => {
            BackendError::Lost(format!("the GPU server went away mid-job ({m})"))
        }
        other => other,
    }
}

fn http_error(what: &str, limit: Duration, e: reqwest::Error) -> BackendError {
    // Without the URL: it may carry credentials.
    let e = e.without_url();
    if e.is_timeout() {
        return BackendError::Timeout(format!("{what}: no answer within {} ms", limit.as_millis()));
    }
    let mut detail = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        detail.push_str(": ");
        detail.push_str(&s.to_string());
        source = s.source();
    }
    if e.is_decode() {
        BackendError::Protocol(format!("{what}: {detail}"))
    } else {
        BackendError::Unreachable(format!("{what}: {detail}"))
    }
}

fn ws_error(what: &str, e: tungstenite::Error) -> BackendError {
    match e {
        tungstenite::Error::Http(resp) => {
            BackendError::Protocol(format!("{what} answered HTTP {}", resp.status()))
        }
        tungstenite::Error::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => {
            BackendError::Timeout(format!("{what}: {io}"))
        }
        other => BackendError::Unreachable(format!("{what}: {other}")),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_files_are_sorted_and_unique() {
        let prompt = json!({
            "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux.safetensors", "weight_dtype": "default"}},
            "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": "b.GGUF", "type": "flux2"}},
            "3": {"class_type": "VAELoader", "inputs": {"vae_name": "flux.safetensors"}},
            "4": {"class_type": "LoraLoader", "inputs": {"lora_name": "style.pt", "strength": 1.0, "model": ["1", 0]}},
            "5": {"class_type": "LoadImage", "inputs": {"image": "cat.png"}},
            "6": {"class_type": "X", "inputs": {"a": "m.ckpt", "b": "m.pth", "c": "m.bin", "d": "m.sft", "e": "notes.txt"}}
        });
        assert_eq!(
            model_files(&prompt),
            [
                "b.GGUF",
                "flux.safetensors",
                "m.bin",
                "m.ckpt",
                "m.pth",
                "m.sft",
                "style.pt"
            ]
        );
        assert!(model_files(&json!([])).is_empty());
    }

    #[test]
    fn candidate_names_never_repeat_the_first() {
        let c: Vec<String> = candidates("nomodel_00001_.png", "0123456789abcdef")
            .take(3)
            .collect();
        assert_eq!(
            c,
            [
                "nomodel_00001_.png",
                "nomodel_00001__01234567.png",
                "nomodel_00001__01234567_2.png"
            ]
        );
        let c: Vec<String> = candidates("README", "ab").take(2).collect();
        assert_eq!(c, ["README", "README_ab"]);
        assert_eq!(local_basename("video/../x.mp4"), "x.mp4");
        assert_eq!(local_basename(".."), "output");
        assert_eq!(safe_segment("../al ice"), "_al_ice");
    }

    #[test]
    fn inputs_are_rewritten_where_named() {
        let mut p = json!({
            "1": {"class_type": "LoadImage", "inputs": {"image": "up.png"}},
            "2": {"class_type": "LoadImage", "inputs": {"image": "up.png [input]"}},
            "3": {"class_type": "LoadImage", "inputs": {"image": "other.png"}}
        });
        replace_input(&mut p, "up.png", "comfyume/u1/up.png");
        assert_eq!(p["1"]["inputs"]["image"], "comfyume/u1/up.png");
        assert_eq!(p["2"]["inputs"]["image"], "comfyume/u1/up.png [input]");
        assert_eq!(p["3"]["inputs"]["image"], "other.png");
    }

    #[test]
    fn urls_keep_a_path_prefix_and_encode_ids() {
        let b = ComfyUiBackend::new("gpu", "http://h:8188/comfy", 1, Timeouts::default()).unwrap();
        assert_eq!(
            b.url(&["history", "a b/c"]).as_str(),
            "http://h:8188/comfy/history/a%20b%2Fc"
        );
        assert_eq!(
            b.ws_url("comfyume-1"),
            "ws://h:8188/comfy/ws?clientId=comfyume-1"
        );
        let b = ComfyUiBackend::new("gpu", "https://h/", 0, Timeouts::default()).unwrap();
        assert_eq!(b.ws_url("x"), "wss://h/ws?clientId=x");
        assert_eq!(b.slots(), 1);
        assert!(ComfyUiBackend::new("gpu", "ftp://h/", 1, Timeouts::default()).is_err());
        assert!(ComfyUiBackend::new("gpu", "not a url", 1, Timeouts::default()).is_err());
    }
}
