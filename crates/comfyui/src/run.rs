//! One job's state machine on a ComfyUI server: open the job's socket, upload
//! the participant's inputs into a per-participant subfolder, `POST /prompt`
//! with `prompt_id` = our job id, relay the job's WebSocket events (outputs
//! already downloaded and renamed into the participant's folders), and confirm
//! the end in `/history/{id}`. A dropped socket, a silent backend or a restart
//! of our server are resolved against `/history` and `/queue`.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use bytes::Bytes;
use reqwest::StatusCode;
use serde_json::{Map, Value, json};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::Instrument;

use crate::client::{ComfyUiBackend, Remote, http_error};
use crate::job::{BackendError, BackendEvent, EventTx, JobSpec, Outcome, OutcomeKind};
use crate::outputs;
use crate::socket::{Subscription, WsEvent};
use comfyume_wire::shapes::queue::meta_entry;
use comfyume_wire::shapes::ws::{BinaryFrame, ws_message};

/// WebSocket re-connection attempts after a drop, before the backend is
/// considered gone.
const RECONNECT_TRIES: u32 = 5;
/// An input file is read and sent in pieces of this size.
const UPLOAD_PIECE: usize = 256 * 1024;
const RECONNECT_FIRST_DELAY: Duration = Duration::from_millis(100);
const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(1);

impl ComfyUiBackend {
    /// Deletes the job from the server's queue, or interrupts it there if it
    /// runs, whoever submitted it: for a job we no longer follow. Each call is
    /// bounded by the request timeout.
    pub async fn stop(&self, id: &str) -> Result<(), BackendError> {
        for _ in 0..2 {
            match self.locate(id).await? {
                Remote::Finished(_) | Remote::Gone => return Ok(()),
                Remote::Running => {
                    return self
                        .post_empty("POST /interrupt", "interrupt", json!({"prompt_id": id}))
                        .await;
                }
                // Look again after the delete: it may have started just before.
                Remote::Pending => {
                    self.post_empty("POST /queue", "queue", json!({"delete": [id]}))
                        .await?
                }
            }
        }
        Ok(())
    }

    /// Runs the job to its end. `interrupt` turns true when the owner cancels.
    pub async fn run(
        &self,
        job: JobSpec,
        events: EventTx,
        interrupt: watch::Receiver<bool>,
    ) -> Result<Outcome, BackendError> {
        let span = tracing::info_span!("comfyui_job", job_id = %job.id, user = %job.user, backend = %self.name, attempt = job.attempt);
        let mut run = JobRun {
            b: self,
            client_id: self.socket.client_id().to_string(),
            job,
            events,
            fetched: HashMap::new(),
            relayed: HashSet::new(),
            seen: Seen::default(),
            started: false,
            ws_error: None,
            ws_interrupted: None,
        };
        let cancel_requested = interrupt.clone();
        let res = match run.execute(interrupt).instrument(span).await {
            // The owner cancelled it: whatever went wrong since, it must not
            // be retried elsewhere.
            Err(e) if *cancel_requested.borrow() => {
                tracing::warn!(backend = %self.name, job_id = %run.job.id, error = %e, "cancelled job ended with an error; reporting it interrupted");
                Ok(run.cancelled())
            }
            other => other,
        };
        match &res {
            Ok(o) => {
                tracing::info!(backend = %self.name, job_id = %run.job.id, outcome = outcome_label(&o.kind), "job ended on backend")
            }
            Err(e) => {
                tracing::warn!(backend = %self.name, job_id = %run.job.id, error = %e, "job failed on backend")
            }
        }
        res
    }
}

/// The largest output read whole before it is saved (see `JobRun::download`).
const WHOLE_OUTPUT_MAX: u64 = 4 << 20;

/// The body of `POST /prompt`, written from the job as it is: a prompt and workflow are
/// the bulk of it and are not copied on the way.
#[derive(serde::Serialize)]
struct PromptBody<'a> {
    prompt: &'a Value,
    client_id: &'a str,
    prompt_id: &'a str,
    extra_data: ExtraData<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    partial_execution_targets: Option<Vec<String>>,
}

/// The job's `extra_data` with our socket's `client_id` (in its place if it had one, else
/// last), so the server's messages about the job come to that socket.
struct ExtraData<'a> {
    extra: Option<&'a Map<String, Value>>,
    client_id: &'a str,
}

impl serde::Serialize for ExtraData<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let entries = self.extra.into_iter().flatten();
        let had = self.extra.is_some_and(|m| m.contains_key("client_id"));
        let mut map = s.serialize_map(None)?;
        for (k, v) in entries {
            if k == "client_id" {
                map.serialize_entry(k, self.client_id)?;
            } else {
                map.serialize_entry(k, v)?;
            }
        }
        if !had {
            map.serialize_entry("client_id", self.client_id)?;
        }
        map.end()
    }
}

fn outcome_label(kind: &OutcomeKind) -> &'static str {
    match kind {
        OutcomeKind::Success => "success",
        OutcomeKind::ExecutionError(_) => "execution_error",
        OutcomeKind::Interrupted(_) => "interrupted",
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

/// What the socket showed of a job's run: enough to record a success whose history the
/// server no longer has.
#[derive(Default)]
struct Seen {
    start: Option<Value>,
    cached: Option<Value>,
    success: Option<Value>,
    /// `executed` outputs, node -> ui with the participant's own file names.
    outputs: Map<String, Value>,
    /// Their history `meta` entries.
    meta: Map<String, Value>,
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
    /// The job's story as the socket told it (see [`JobRun::seen_outcome`]).
    seen: Seen,
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
                let ws = self.subscribe().await?;
                return self.watch(ws, interrupt, true).await.map_err(mid_job);
            }
        }
        if *interrupt.borrow_and_update() {
            return Ok(self.cancelled());
        }
        // Subscribed before the prompt exists there, so no message is missed.
        let ws = self.subscribe().await?;
        let uploaded = self.upload_inputs().await?;
        if *interrupt.borrow_and_update() {
            return Ok(self.cancelled());
        }
        self.submit(uploaded.as_ref().unwrap_or(&self.job.prompt))
            .await?;
        self.emit(BackendEvent::Submitted).await;
        self.watch(ws, interrupt, false).await.map_err(mid_job)
    }

    /// The job's share of the server's socket, connected.
    async fn subscribe(&self) -> Result<Subscription, BackendError> {
        let sub = self.b.socket.subscribe(&self.job.id);
        self.b.socket.ensure_connected(self.b).await?;
        Ok(sub)
    }

    /// An interrupt outcome without node details: the job was cancelled
    /// before it ran here, or the backend could not confirm that it stopped.
    fn cancelled(&self) -> Outcome {
        Outcome::cancelled(&self.job.id)
    }

    /// Uploads the participant's input files into `comfyume/<user>/` on the
    /// backend and points the prompt at them there. A result reused as an input (named
    /// `video/x.png [output]` in the prompt) goes to `comfyume-out/<user>/video/`, apart
    /// from the inputs (the backend's own outputs are another job's, not this one's).
    /// `None` when there is nothing to upload: the job's prompt goes as it is.
    async fn upload_inputs(&self) -> Result<Option<Value>, BackendError> {
        if self.job.inputs.is_empty() {
            return Ok(None);
        }
        let mut prompt = self.job.prompt.clone();
        let user = outputs::safe_segment(&self.job.user);
        for input in &self.job.inputs {
            let (rel, user_dir) = match input.name.strip_suffix(" [output]") {
                Some(rel) => (rel, format!("comfyume-out/{user}")),
                None => (input.name.as_str(), format!("comfyume/{user}")),
            };
            let (dir, file) = match rel.rsplit_once('/') {
                Some((d, f)) if !d.split('/').any(|s| s.is_empty() || s == "." || s == "..") => {
                    (Some(d), f)
                }
                Some((_, f)) => (None, f),
                None => (None, rel),
            };
            // Streamed from disk as it is sent: a participant's video is never held
            // in memory whole (one piece per file in flight).
            let opened = match tokio::fs::File::open(&input.local).await {
                Ok(f) => f.metadata().await.map(|m| (f, m.len())),
                Err(e) => Err(e),
            };
            let (file_handle, len) = opened.map_err(|e| {
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
            let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(
                file_handle,
                UPLOAD_PIECE,
            ));
            let form = reqwest::multipart::Form::new()
                .part(
                    "image",
                    reqwest::multipart::Part::stream_with_length(body, len)
                        .file_name(file.to_owned()),
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
        Ok(Some(prompt))
    }

    async fn submit(&self, prompt: &Value) -> Result<(), BackendError> {
        let body = PromptBody {
            prompt,
            client_id: &self.client_id,
            prompt_id: &self.job.id,
            extra_data: ExtraData {
                extra: self.job.extra_data.as_object(),
                client_id: &self.client_id,
            },
            partial_execution_targets: self.partial_targets(prompt).await,
        };
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
        mut ws: Subscription,
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
                    Some(WsEvent::Json(msg)) => match self.on_message(msg).await? {
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
                        tracing::warn!(job_id = %self.job.id, backend = %self.b.name, reason = %why, "WebSocket dropped mid-job; reconnecting");
                        match self.reconnect().await {
                            Ok(()) => {}
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
                                tracing::warn!(job_id = %self.job.id, backend = %self.b.name, "the backend has not stopped the job yet; reporting it interrupted");
                                Ok(self.cancelled())
                            }
                        };
                    }
                    if now >= silence_at {
                        tracing::info!(job_id = %self.job.id, backend = %self.b.name, "no WebSocket news; asking /history and /queue");
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

    /// Re-opens the shared socket after a drop (our subscription stays).
    async fn reconnect(&self) -> Result<(), BackendError> {
        let mut delay = RECONNECT_FIRST_DELAY;
        let mut last = None;
        for attempt in 1..=RECONNECT_TRIES {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(RECONNECT_MAX_DELAY);
            match self.b.socket.ensure_connected(self.b).await {
                Ok(()) => {
                    tracing::info!(job_id = %self.job.id, backend = %self.b.name, attempt, "WebSocket open again");
                    return Ok(());
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

    async fn on_message(&mut self, mut msg: Value) -> Result<Step, BackendError> {
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
            "execution_start" => {
                self.seen.start = msg.get("data").cloned();
                self.mark_started().await
            }
            "execution_cached" => self.seen.cached = msg.get("data").cloned(),
            "execution_success" => self.seen.success = msg.get("data").cloned(),
            "executed" => {
                let node = msg
                    .pointer("/data/node")
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                if let Some(node) = &node {
                    self.relayed.insert(node.clone());
                }
                if let Some(output) = msg.pointer("/data/output").cloned() {
                    let (local, copies) = self.name_ui(&output).await?;
                    if let Some(slot) = msg.pointer_mut("/data/output") {
                        *slot = local.clone();
                    }
                    let display = msg
                        .pointer("/data/display_node")
                        .and_then(Value::as_str)
                        .map(str::to_owned);
                    if self.b.early_results {
                        // The reader learns the result's names now and the copies follow
                        // (`/view` of a name still being copied waits for it).
                        self.emit(BackendEvent::Message(msg)).await;
                        self.copy_all(copies).await?;
                    } else {
                        self.copy_all(copies).await?;
                        self.emit(BackendEvent::Message(msg)).await;
                    }
                    if let Some(node) = node {
                        let meta =
                            meta_entry(&node, display.as_deref().unwrap_or(&node), None, &node);
                        self.seen.meta.insert(node.clone(), meta);
                        self.seen.outputs.insert(node, local);
                    }
                    return Ok(Step::Continue(ours));
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

    /// After the end marker: the outcome as `/history` records it. A server that lost the
    /// history meanwhile (it restarted, or a fresh replica answers) may still have shown the
    /// whole success on the socket (see [`Self::seen_outcome`]).
    async fn finish(&mut self) -> Result<Outcome, BackendError> {
        let id = self.job.id.clone();
        let lost = match self.b.history(&id).await {
            Ok(Some(entry)) => return self.collect(entry).await,
            Ok(None) => {
                // A proxy in front of several replicas may lag; ask once more.
                tokio::time::sleep(Duration::from_millis(200)).await;
                match self.b.history(&id).await {
                    Ok(Some(entry)) => return self.collect(entry).await,
                    Ok(None) => forgot(),
                    Err(e) => e,
                }
            }
            Err(e) => e,
        };
        match self.seen_outcome() {
            Some(outcome) => {
                tracing::warn!(job_id = %id, backend = %self.b.name, error = %lost, "the GPU server lost the job's history after it ended; its success and every output were seen on the socket, so it is recorded from those and not run again");
                Ok(outcome)
            }
            None => Err(lost),
        }
    }

    /// The outcome as the socket showed it: a success, with every output as `executed`
    /// brought it (and so in the participant's folder already). ComfyUI sends `executed`
    /// for a node answered from its cache too, with the cached output, so the socket shows
    /// every output the history would.
    fn seen_outcome(&self) -> Option<Outcome> {
        let success = self.seen.success.clone()?;
        let mut messages = Vec::new();
        if let Some(start) = &self.seen.start {
            messages.push(json!(["execution_start", start]));
        }
        if let Some(c) = &self.seen.cached {
            messages.push(json!(["execution_cached", c]));
        }
        messages.push(json!(["execution_success", success]));
        Some(Outcome {
            kind: OutcomeKind::Success,
            outputs: self.seen.outputs.clone(),
            messages,
            meta: self.seen.meta.clone(),
        })
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
        let (local, copies) = self.name_ui(ui).await?;
        self.copy_all(copies).await?;
        Ok(local)
    }

    /// [`Self::localize_ui`]'s first half: the ui output with each file's local name,
    /// reserved, and the copies that give those names their bytes.
    async fn name_ui(&mut self, ui: &Value) -> Result<(Value, Vec<Copy>), BackendError> {
        let Value::Object(map) = ui else {
            return Ok((ui.clone(), Vec::new()));
        };
        let mut out = Map::new();
        let mut copies = Vec::new();
        for (key, value) in map {
            let v = match value {
                Value::Array(items) => {
                    let mut list = Vec::with_capacity(items.len());
                    for item in items {
                        list.push(match item {
                            Value::Object(file) if file.contains_key("filename") => {
                                Value::Object(self.name_file(file, &mut copies).await?)
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
        Ok((Value::Object(out), copies))
    }

    async fn name_file(
        &mut self,
        file: &Map<String, Value>,
        copies: &mut Vec<Copy>,
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
        // The layout the workflow asked for (`video/ltx2` -> subfolder `video`), kept inside
        // the participant's own folder whatever the backend answered.
        let local_sub = outputs::safe_subfolder(subfolder);
        let key = (kind.to_owned(), subfolder.to_owned(), filename.to_owned());
        let local = match self.fetched.get(&key) {
            Some(local) => local.clone(),
            None => {
                let name = outputs::reserve(&dir.join(&local_sub), filename, &self.job.id)
                    .await
                    .map_err(|e| BackendError::Storage(format!("{filename}: {e}")))?;
                let local = name.name().to_owned();
                // Once per job: the copy below is the only one (a failed one ends the job).
                self.fetched.insert(key, local.clone());
                copies.push(Copy {
                    kind: kind.to_owned(),
                    subfolder: subfolder.to_owned(),
                    filename: filename.to_owned(),
                    name,
                });
                local
            }
        };
        let mut out = file.clone();
        out.insert("filename".into(), json!(local));
        out.insert("subfolder".into(), json!(local_sub));
        Ok(out)
    }

    async fn copy_all(&self, copies: Vec<Copy>) -> Result<(), BackendError> {
        for c in copies {
            self.download(c).await?;
        }
        Ok(())
    }

    /// `GET /view` into the name reserved for it.
    async fn download(&self, c: Copy) -> Result<(), BackendError> {
        let Copy {
            kind,
            subfolder,
            filename,
            name,
        } = c;
        let what = "GET /view";
        let limit = self.b.timeouts.transfer;
        let mut url = self.b.url(&["view"]);
        url.query_pairs_mut()
            .append_pair("filename", &filename)
            .append_pair("subfolder", &subfolder)
            .append_pair("type", &kind);
        let mut resp = self.b.send(what, self.b.http.get(url), limit).await?;
        if resp.status() != StatusCode::OK {
            return Err(BackendError::Protocol(format!(
                "{what} for output {filename} answered HTTP {}",
                resp.status()
            )));
        }
        let local_err = |e: std::io::Error| BackendError::Storage(format!("{filename}: {e}"));
        // An image (the common case) is read whole and saved in one step; a file that may
        // be big (a video) is written as it arrives, never held in memory whole.
        if resp.content_length().is_some_and(|n| n <= WHOLE_OUTPUT_MAX) {
            let data = resp.bytes().await.map_err(|e| http_error(what, limit, e))?;
            name.save_whole(data).await.map_err(local_err)?;
            return Ok(());
        }
        let mut out = outputs::NewOutput::create(name.dir())
            .await
            .map_err(local_err)?;
        while let Some(chunk) = resp.chunk().await.map_err(|e| http_error(what, limit, e))? {
            out.write(&chunk).await.map_err(local_err)?;
        }
        out.publish_as(name).await.map_err(local_err)?;
        Ok(())
    }
}

/// An output named for the participant whose bytes are still on the GPU server.
struct Copy {
    kind: String,
    subfolder: String,
    filename: String,
    name: outputs::Reserved,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The body is what ComfyUI's own clients send: the job's `extra_data` with our
    /// `client_id` in its place (or last), key order kept; the targets only when given.
    #[test]
    fn the_prompt_body_carries_the_jobs_extra_data_and_our_client_id() {
        let prompt = json!({"1": {"class_type": "SaveImage", "inputs": {"x": 1.5}}});
        let cases = [
            (
                json!({"extra_pnginfo": {"workflow": {"id": "w"}}, "client_id": "tab", "z": 1}),
                r#"{"extra_pnginfo":{"workflow":{"id":"w"}},"client_id":"ours","z":1}"#,
            ),
            (
                json!({"extra_pnginfo": {"workflow": {}}}),
                r#"{"extra_pnginfo":{"workflow":{}},"client_id":"ours"}"#,
            ),
            (Value::Null, r#"{"client_id":"ours"}"#),
        ];
        for (extra, want) in cases {
            let body = PromptBody {
                prompt: &prompt,
                client_id: "ours",
                prompt_id: "p",
                extra_data: ExtraData {
                    extra: extra.as_object(),
                    client_id: "ours",
                },
                partial_execution_targets: None,
            };
            assert_eq!(
                serde_json::to_string(&body).unwrap(),
                format!(
                    r#"{{"prompt":{{"1":{{"class_type":"SaveImage","inputs":{{"x":1.5}}}}}},"client_id":"ours","prompt_id":"p","extra_data":{want}}}"#
                )
            );
        }
        let body = PromptBody {
            prompt: &prompt,
            client_id: "ours",
            prompt_id: "p",
            extra_data: ExtraData {
                extra: None,
                client_id: "ours",
            },
            partial_execution_targets: Some(vec!["9".into()]),
        };
        let v = serde_json::to_value(&body).unwrap();
        assert_eq!(v["partial_execution_targets"], json!(["9"]));
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
}
