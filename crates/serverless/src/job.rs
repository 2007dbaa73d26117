//! One attempt of a job on one endpoint: `POST <base>/run`, then the worker's events
//! (streamed as SSE, or one JSON document through the provider's async mode) turned
//! into the dispatcher's [`BackendEvent`]s, output files written as they arrive, and
//! the final event turned into an [`Outcome`] or a [`BackendError`].

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use comfyume_dispatch::{BackendError, BackendEvent, JobSpec, Outcome, OutcomeKind};
use comfyume_wire::worker::{ErrorKind, Event, FileRef, RunInput, RunRequest, SseParser};
use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::{Map, Value, json};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::ServerlessBackend;
use crate::endpoint::{ASYNC_FALLBACK_FOR, CUTS_BEFORE_ASYNC, Endpoint, InFlight, now_ms};
use crate::files::{FileError, Incoming};
use crate::policy;

/// Longest SSE line accepted (an output chunk's line is about 256 KiB).
const MAX_SSE_LINE: usize = 4 * 1024 * 1024;
/// Largest answer document read in async mode (inline outputs included).
const MAX_DOCUMENT_BYTES: usize = 512 * 1024 * 1024;
/// Async mode: how often the provider's status route is asked.
const ASYNC_POLL: Duration = Duration::from_secs(1);
/// Async mode: status calls that may fail in a row before the attempt is given up.
const ASYNC_POLL_ERRORS: u32 = 5;
/// Small calls (async status and result, error bodies).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// 409 (the same job on another stream of this worker, about to be dropped): tries.
const CONFLICT_TRIES: u32 = 10;

pub(crate) struct Attempt<'a> {
    pub b: &'a ServerlessBackend,
    pub ep: Arc<Endpoint>,
    pub job: JobSpec,
    pub events: comfyume_dispatch::backend::EventTx,
    pub flight: InFlight,
    /// `(type, filename)` on the worker -> local file name.
    delivered: HashMap<(String, String), String>,
    incoming: Option<Incoming>,
    /// Nodes whose `executed` was relayed.
    relayed: HashSet<String>,
    started: bool,
    sent_at: Instant,
    cold_noticed: bool,
}

/// How one request went, before the attempt's bookkeeping.
pub(crate) type Ended = Result<Outcome, BackendError>;

impl<'a> Attempt<'a> {
    pub fn new(
        b: &'a ServerlessBackend,
        ep: Arc<Endpoint>,
        job: JobSpec,
        events: comfyume_dispatch::backend::EventTx,
        flight: InFlight,
    ) -> Self {
        Attempt {
            b,
            ep,
            job,
            events,
            flight,
            delivered: HashMap::new(),
            incoming: None,
            relayed: HashSet::new(),
            started: false,
            sent_at: Instant::now(),
            cold_noticed: false,
        }
    }

    async fn emit(&self, ev: BackendEvent) {
        let _ = self.events.send(ev).await;
    }

    /// The job's `POST /run` body: inputs inline, or, past the inline limit, through
    /// the object store when one is configured.
    pub async fn request_body(&self) -> Result<Vec<u8>, BackendError> {
        let mut inputs = Vec::new();
        let mut total = 0u64;
        let limit = self.b.cfg.max_inline_input_bytes;
        for f in &self.job.inputs {
            let unreadable = |e: std::io::Error| {
                BackendError::Rejected(error_body(
                    "input_unavailable",
                    &format!("cannot read input {}: {e}", f.name),
                ))
            };
            let len = tokio::fs::metadata(&f.local)
                .await
                .map_err(unreadable)?
                .len();
            if total + len > limit {
                let Some(store) = &self.b.objects else {
                    return Err(BackendError::Rejected(error_body(
                        "input_too_large",
                        &format!(
                            "the job's input files exceed {} MB (SERVERLESS_MAX_INLINE_INPUT_MB) and no \
                             OUTPUT_STORE_* is configured to send them through",
                            limit / (1024 * 1024)
                        ),
                    )));
                };
                let key = store.input_key(&self.job.id, &f.name);
                store
                    .put_file(&key, &f.local)
                    .await
                    .map_err(|e| BackendError::Unreachable(e.to_string()))?;
                inputs.push(RunInput {
                    name: f.name.clone(),
                    data_base64: None,
                    store_key: Some(key),
                });
                continue;
            }
            let data = tokio::fs::read(&f.local).await.map_err(unreadable)?;
            total += data.len() as u64;
            inputs.push(RunInput {
                name: f.name.clone(),
                data_base64: Some(base64::engine::general_purpose::STANDARD.encode(&data)),
                store_key: None,
            });
        }
        let extra_data = match &self.job.extra_data {
            Value::Object(_) => self.job.extra_data.clone(),
            _ => Value::Null,
        };
        let req = RunRequest {
            job_id: self.job.id.clone(),
            prompt: self.job.prompt.clone(),
            extra_data,
            outputs_to_execute: self.job.outputs_to_execute.clone(),
            inputs,
            user: Some(self.job.user.chars().take(64).collect()),
            attempt: Some(self.job.attempt.max(1)),
        };
        serde_json::to_vec(&req).map_err(|e| BackendError::Protocol(e.to_string()))
    }

    fn request(&self, body: Vec<u8>, async_mode: bool) -> reqwest::RequestBuilder {
        let mut r = self
            .b
            .http
            .post(format!("{}/run", self.ep.cfg.url))
            .header("content-type", "application/json")
            .header("x-inference-id", &self.job.id)
            .header("cache-control", "no-cache")
            .body(body);
        r = if async_mode {
            r.header("prefer", "respond-async")
                .header("accept", "application/json")
        } else {
            r.header("accept", "text/event-stream")
        };
        self.b.authorize(r)
    }

    /// Runs the attempt to its end.
    pub async fn run(&mut self, mut interrupt: watch::Receiver<bool>) -> Ended {
        let body = self.request_body().await?;
        let async_mode = self.b.cfg.async_mode || self.ep.st().async_fallback();
        for _ in 0..CONFLICT_TRIES {
            if *interrupt.borrow_and_update() {
                return Ok(cancelled(&self.job.id));
            }
            self.sent_at = Instant::now();
            let send = self.request(body.clone(), async_mode).send();
            tokio::pin!(send);
            let cold = tokio::time::sleep(self.b.cfg.cold_start_after);
            tokio::pin!(cold);
            // The provider holds the request in its queue until a replica takes it
            // (through a cold start): no time limit here but the dispatcher's start
            // timeout; the cold-start notice goes out meanwhile.
            let resp = loop {
                tokio::select! {
                    r = &mut send => break r,
                    _ = interrupted(&mut interrupt) => return Ok(cancelled(&self.job.id)),
                    _ = &mut cold, if !self.cold_noticed => self.notice_cold().await,
                }
            };
            let resp = match resp {
                Ok(r) => r,
                Err(e) => {
                    return Err(BackendError::Unreachable(format!(
                        "{}: {}",
                        self.ep.name(),
                        e.without_url()
                    )));
                }
            };
            let status = resp.status();
            let ctype = resp
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_ascii_lowercase();
            match status {
                StatusCode::OK if ctype.starts_with("text/event-stream") => {
                    return self.read_stream(resp, &mut interrupt).await;
                }
                StatusCode::OK if ctype.starts_with("application/json") => {
                    return self.read_document(resp, &mut interrupt).await;
                }
                StatusCode::ACCEPTED if async_mode => {
                    return self.poll_async(resp, &mut interrupt).await;
                }
                StatusCode::CONFLICT => {
                    // The same job on a stream of ours this worker has not noticed
                    // closing yet: it stops it at its next write; ask again.
                    let wait = retry_after(&resp).min(Duration::from_secs(5));
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => continue,
                        _ = interrupted(&mut interrupt) => return Ok(cancelled(&self.job.id)),
                    }
                }
                _ => return Err(self.refused(resp).await),
            }
        }
        Err(BackendError::Lost(format!(
            "{}: the same job kept running on another stream",
            self.ep.name()
        )))
    }

    /// An answer that is not the job's events.
    async fn refused(&self, resp: reqwest::Response) -> BackendError {
        let status = resp.status();
        let body = tokio::time::timeout(CALL_TIMEOUT, resp.bytes())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        let parsed: Value =
            serde_json::from_slice(&body[..body.len().min(64 * 1024)]).unwrap_or(Value::Null);
        let message = match parsed.get("error") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Object(o)) => o
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned(),
            _ => String::new(),
        };
        if message.to_ascii_lowercase().contains("ttl") {
            return self.ttl_error();
        }
        let what = format!(
            "{} answered HTTP {}{}",
            self.ep.name(),
            status.as_u16(),
            if message.is_empty() {
                String::new()
            } else {
                format!(": {message}")
            }
        );
        match status.as_u16() {
            // The request itself is wrong (or our credentials): another try is too.
            400 | 401 | 403 | 413 => BackendError::Rejected(match parsed.get("error") {
                Some(Value::Object(_)) => parsed,
                _ => error_body("refused", &what),
            }),
            _ => BackendError::Unreachable(what),
        }
    }

    /// The provider's request TTL ran out: the job is not retried (it would run out
    /// again); the instructor must raise it.
    fn ttl_error(&self) -> BackendError {
        let ttl = self.ep.st().ttl_secs;
        let msg = match ttl {
            Some(t) => format!(
                "The GPU provider dropped the job when its request TTL ({t} s) ran out \
                 (cold start + queue wait + run time must fit in it). The instructor can \
                 raise the deployment's request TTL."
            ),
            None => "The GPU provider dropped the job when its request TTL ran out \
                     (cold start + queue wait + run time must fit in it). The instructor \
                     can raise the deployment's request TTL."
                .to_owned(),
        };
        self.ep.record_error("request TTL expired");
        BackendError::Rejected(error_body("ttl_expired", &msg))
    }

    /// A stream or document that ended without a final event.
    fn broken(&self, what: String) -> BackendError {
        let ttl = self.ep.st().ttl_secs;
        if let Some(t) = ttl
            && self.sent_at.elapsed() + Duration::from_secs(1) >= Duration::from_secs(t)
        {
            return self.ttl_error();
        }
        BackendError::Lost(format!("{}: {what}", self.ep.name()))
    }

    async fn read_stream(
        &mut self,
        resp: reqwest::Response,
        interrupt: &mut watch::Receiver<bool>,
    ) -> Ended {
        let mut body = resp.bytes_stream();
        let mut parser = SseParser::new(MAX_SSE_LINE);
        let silence = self.b.cfg.silence;
        let cold = tokio::time::sleep_until(self.sent_at + self.b.cfg.cold_start_after);
        tokio::pin!(cold);
        loop {
            let next = tokio::select! {
                n = tokio::time::timeout(silence, body.next()) => n,
                _ = interrupted(interrupt) => return Ok(cancelled(&self.job.id)),
                _ = &mut cold, if !self.cold_noticed && !self.flight_accepted() => {
                    self.notice_cold().await;
                    continue;
                }
            };
            let chunk = match next {
                Err(_) => {
                    self.stream_cut();
                    return Err(BackendError::Lost(format!(
                        "{}: no word from the GPU for {} s",
                        self.ep.name(),
                        silence.as_secs()
                    )));
                }
                Ok(None) => {
                    self.stream_cut();
                    return Err(self.broken("the stream ended without the job's result".into()));
                }
                Ok(Some(Err(e))) => {
                    self.stream_cut();
                    return Err(self.broken(format!("the stream broke: {}", e.without_url())));
                }
                Ok(Some(Ok(c))) => c,
            };
            let events = parser
                .feed(&chunk)
                .map_err(|e| BackendError::Protocol(format!("{}: {e}", self.ep.name())))?;
            for ev in events {
                let event: Event = serde_json::from_str(&ev.data).map_err(|e| {
                    BackendError::Protocol(format!("{}: an event is not JSON: {e}", self.ep.name()))
                })?;
                if let Some(end) = self.on_event(event).await? {
                    self.ep.st().stream_cuts = 0;
                    return end;
                }
            }
        }
    }

    fn flight_accepted(&self) -> bool {
        self.started || !self.delivered.is_empty() || self.flight.is_accepted()
    }

    /// Streams to this endpoint keep being cut: later attempts use the async mode.
    fn stream_cut(&self) {
        if !self.flight.is_accepted() {
            return;
        }
        let mut s = self.ep.st();
        s.stream_cuts += 1;
        if s.stream_cuts >= CUTS_BEFORE_ASYNC && !s.async_fallback() {
            s.async_until = Some(Instant::now() + ASYNC_FALLBACK_FOR);
            s.stream_cuts = 0;
            tracing::warn!(endpoint = %self.ep.name(), minutes = ASYNC_FALLBACK_FOR.as_secs() / 60,
                "streams to this endpoint keep being cut; using the provider's async mode for it for a while");
        }
    }

    /// One JSON document holding the events (async mode, or a gateway that buffered).
    async fn read_document(
        &mut self,
        resp: reqwest::Response,
        interrupt: &mut watch::Receiver<bool>,
    ) -> Ended {
        let mut body = resp.bytes_stream();
        let mut buf = Vec::new();
        let silence = self.b.cfg.silence;
        loop {
            let next = tokio::select! {
                n = tokio::time::timeout(silence, body.next()) => n,
                _ = interrupted(interrupt) => return Ok(cancelled(&self.job.id)),
            };
            match next {
                Err(_) => {
                    return Err(BackendError::Lost(format!(
                        "{}: no word from the GPU for {} s",
                        self.ep.name(),
                        silence.as_secs()
                    )));
                }
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    return Err(self.broken(format!("the answer broke: {}", e.without_url())));
                }
                Ok(Some(Ok(c))) => {
                    if buf.len() + c.len() > MAX_DOCUMENT_BYTES {
                        return Err(BackendError::Protocol(format!(
                            "{}: the answer is larger than {MAX_DOCUMENT_BYTES} bytes",
                            self.ep.name()
                        )));
                    }
                    buf.extend_from_slice(&c);
                }
            }
        }
        self.process_document(&buf).await
    }

    async fn process_document(&mut self, buf: &[u8]) -> Ended {
        #[derive(serde::Deserialize)]
        struct Doc {
            events: Vec<Value>,
        }
        let doc: Doc = serde_json::from_slice(buf)
            .map_err(|_| self.broken("the answer is not a complete document".into()))?;
        for v in doc.events {
            let event: Event = serde_json::from_value(v).map_err(|e| {
                BackendError::Protocol(format!("{}: an event is malformed: {e}", self.ep.name()))
            })?;
            if let Some(end) = self.on_event(event).await? {
                return end;
            }
        }
        Err(self.broken("the answer ended without the job's result".into()))
    }

    /// The provider's async mode: 202 `{Id, StatusPath, ResultPath}`, then the status
    /// route until done, then the result (the worker's answer document).
    async fn poll_async(
        &mut self,
        resp: reqwest::Response,
        interrupt: &mut watch::Receiver<bool>,
    ) -> Ended {
        let ticket: Value = tokio::time::timeout(CALL_TIMEOUT, resp.json())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or(Value::Null);
        let (Some(status_path), Some(result_path)) = (
            ticket.get("StatusPath").and_then(Value::as_str),
            ticket.get("ResultPath").and_then(Value::as_str),
        ) else {
            return Err(BackendError::Protocol(format!(
                "{}: the async answer lacks StatusPath/ResultPath",
                self.ep.name()
            )));
        };
        let id = ticket
            .get("Id")
            .and_then(Value::as_str)
            .unwrap_or(&self.job.id)
            .to_owned();
        let origin = origin(&self.ep.cfg.url);
        let status_url = format!("{origin}{}", absolute(status_path));
        let result_url = format!("{origin}{}", absolute(result_path));
        let cold = tokio::time::sleep_until(self.sent_at + self.b.cfg.cold_start_after);
        tokio::pin!(cold);
        let mut errors = 0u32;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(ASYNC_POLL) => {}
                _ = interrupted(interrupt) => return Ok(cancelled(&self.job.id)),
                _ = &mut cold, if !self.cold_noticed && !self.flight.is_accepted() => {
                    self.notice_cold().await;
                    continue;
                }
            }
            let r = self
                .b
                .authorize(self.b.http.get(&status_url))
                .header("x-inference-id", &id)
                .timeout(CALL_TIMEOUT)
                .send()
                .await;
            let st: Value = match r {
                Ok(r) if r.status() == StatusCode::NOT_FOUND => {
                    return Err(BackendError::Lost(format!(
                        "{}: the provider no longer knows the request",
                        self.ep.name()
                    )));
                }
                Ok(r) if r.status().is_success() => match r.json().await {
                    Ok(v) => {
                        errors = 0;
                        v
                    }
                    Err(_) => Value::Null,
                },
                _ => Value::Null,
            };
            if st.is_null() {
                errors += 1;
                if errors >= ASYNC_POLL_ERRORS {
                    return Err(BackendError::Unreachable(format!(
                        "{}: the provider's status route did not answer",
                        self.ep.name()
                    )));
                }
                continue;
            }
            if let Some(err) = st
                .get("Error")
                .and_then(Value::as_str)
                .filter(|e| !e.is_empty())
            {
                if err.to_ascii_lowercase().contains("ttl") {
                    return Err(self.ttl_error());
                }
                return Err(BackendError::Lost(format!("{}: {err}", self.ep.name())));
            }
            match async_status(st.get("Status")) {
                AsyncStatus::Waiting => {}
                AsyncStatus::Inference => {
                    self.on_accepted().await;
                }
                AsyncStatus::Completed => {
                    let r = self
                        .b
                        .authorize(self.b.http.get(&result_url))
                        .header("x-inference-id", &id)
                        .send()
                        .await
                        .map_err(|e| {
                            BackendError::Unreachable(format!(
                                "{}: result: {}",
                                self.ep.name(),
                                e.without_url()
                            ))
                        })?;
                    if r.status() == StatusCode::ACCEPTED {
                        continue;
                    }
                    if !r.status().is_success() {
                        return Err(self.refused(r).await);
                    }
                    return self.read_document(r, interrupt).await;
                }
            }
        }
    }

    /// No first event a few seconds after sending: unless jobs of ours already run
    /// there (then it is a queue wait), the GPU is cold. The first attempt to notice
    /// tells everyone waiting; each attempt tells its own participant.
    async fn notice_cold(&mut self) {
        self.cold_noticed = true;
        let told = {
            let mut s = self.ep.st();
            let replicas_serving = s.replicas.as_ref().is_some_and(|l| {
                l.iter().any(|r| crate::manage::replica_running(&r.status))
                    && !l.iter().any(|r| crate::manage::replica_starting(&r.status))
            });
            if s.accepted > 0 || replicas_serving {
                None
            } else {
                let first = s.cold.is_none();
                if first {
                    s.cold = Some(crate::endpoint::ColdStart {
                        began: self.sent_at,
                        began_ms: now_ms() - self.sent_at.elapsed().as_millis() as i64,
                    });
                }
                let elapsed = s
                    .cold
                    .as_ref()
                    .map(|c| c.began.elapsed().as_secs())
                    .unwrap_or(0);
                let estimate = policy::cold_start_estimate(
                    &s.cold_starts,
                    self.b.cfg.cold_start_estimate.as_secs(),
                );
                let users = s.waiting_users();
                Some((
                    first,
                    policy::cold_start_text(estimate, elapsed),
                    users,
                    estimate,
                ))
            }
        };
        if let Some((first, text, users, estimate)) = told {
            self.emit(BackendEvent::Notice(text.clone())).await;
            if first {
                tracing::info!(endpoint = %self.ep.name(), estimate_secs = estimate, "cold start: no GPU took the job yet");
                self.b.host.announce(&users, &text);
            }
        }
    }

    /// A worker has the job (the `accepted` event, or the async status `Inference`).
    async fn on_accepted(&mut self) {
        if self.flight.is_accepted() {
            return;
        }
        if let Some(secs) = self.flight.accepted() {
            tracing::info!(endpoint = %self.ep.name(), secs, "cold start over: a GPU took the job");
            self.b.save_cold_starts().await;
            let users = self.ep.st().waiting_users();
            let text = format!("GPU ready (started in {secs} s)");
            self.emit(BackendEvent::Notice(text.clone())).await;
            self.b.host.announce(&users, &text);
        }
    }

    /// Handles one event; `Some` with how the job ended on a final event.
    async fn on_event(&mut self, ev: Event) -> Result<Option<Ended>, BackendError> {
        match ev {
            Event::Accepted { replay, worker, .. } => {
                tracing::debug!(job = %self.job.id, endpoint = %self.ep.name(), %worker, replay, "accepted");
                self.on_accepted().await;
            }
            Event::Submitted { .. } => {
                self.on_accepted().await;
                self.emit(BackendEvent::Submitted).await;
            }
            Event::Started { .. } => {
                self.on_accepted().await;
                self.mark_started().await;
            }
            Event::Comfyui { message, .. } => {
                self.on_accepted().await;
                self.on_message(message).await;
            }
            Event::Preview { frame, .. } => {
                if let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(frame) {
                    self.emit(BackendEvent::Binary(Bytes::from(bytes))).await;
                }
            }
            Event::OutputFile { file, size, .. } => {
                if self.incoming.is_some() {
                    return Err(self.protocol("a new output began before the last one ended"));
                }
                let dir = self.dir_for(&file)?;
                self.incoming = Some(
                    Incoming::start(file, size, &dir)
                        .await
                        .map_err(|e| self.file_err(e))?,
                );
            }
            Event::OutputChunk {
                file, index, data, ..
            } => {
                let Some(inc) = self.incoming.as_mut() else {
                    return Err(self.protocol("an output chunk without its output_file"));
                };
                let res = inc.chunk(&file, index, &data).await;
                res.map_err(|e| self.file_err(e))?;
            }
            Event::OutputEnd {
                file, size, sha256, ..
            } => {
                let Some(inc) = self.incoming.take() else {
                    return Err(self.protocol("output_end without its output_file"));
                };
                let local = inc
                    .finish(&file, size, &sha256, &self.job.id)
                    .await
                    .map_err(|e| self.file_err(e))?;
                self.delivered.insert((file.kind, file.filename), local);
            }
            Event::OutputStored {
                file,
                size,
                sha256,
                store,
                ..
            } => {
                let Some(fetcher) = self.b.objects.clone() else {
                    return Ok(Some(Err(BackendError::Rejected(error_body(
                        "output_store_not_configured",
                        &format!(
                            "output {} was put in the object store, but this server has no OUTPUT_STORE_* settings to fetch it",
                            file.filename
                        ),
                    )))));
                };
                let dir = self.dir_for(&file)?;
                let local = fetcher
                    .fetch(&file, &store, size, &sha256, &dir, &self.job.id)
                    .await
                    .map_err(|e| self.file_err(e))?;
                self.delivered.insert((file.kind, file.filename), local);
            }
            Event::Notice { message, .. } => {
                self.emit(BackendEvent::Notice(message)).await;
            }
            Event::Keepalive | Event::Unknown => {}
            Event::Result {
                outputs,
                status,
                meta,
                timing,
                ..
            } => {
                self.on_accepted().await;
                self.b
                    .record_usage(&self.job, &self.ep, timing.execution_ms)
                    .await;
                let messages = messages_of(&status);
                if messages
                    .iter()
                    .any(|m| m.get(0).and_then(Value::as_str) == Some("execution_start"))
                {
                    self.mark_started().await;
                }
                let outputs = self.final_outputs(outputs, &meta).await;
                return Ok(Some(Ok(Outcome {
                    kind: OutcomeKind::Success,
                    outputs,
                    messages,
                    meta,
                })));
            }
            Event::Error {
                kind,
                data,
                reason,
                message,
                outputs,
                status,
                meta,
                timing,
                ..
            } => {
                self.b
                    .record_usage(&self.job, &self.ep, timing.execution_ms)
                    .await;
                let data = data.unwrap_or(Value::Null);
                let end = match kind {
                    ErrorKind::Rejected => Err(BackendError::Rejected(data)),
                    ErrorKind::Worker => Err(BackendError::Rejected(error_body(
                        reason.as_deref().unwrap_or("worker"),
                        message
                            .as_deref()
                            .unwrap_or("the GPU worker could not run the job"),
                    ))),
                    ErrorKind::ExecutionError | ErrorKind::Interrupted => {
                        let meta = meta.unwrap_or_default();
                        let outputs = self.final_outputs(outputs.unwrap_or_default(), &meta).await;
                        let mut messages = status.as_ref().map(messages_of).unwrap_or_default();
                        let (name, kind) = if kind == ErrorKind::ExecutionError {
                            ("execution_error", OutcomeKind::ExecutionError(data.clone()))
                        } else {
                            (
                                "execution_interrupted",
                                OutcomeKind::Interrupted(data.clone()),
                            )
                        };
                        if !messages
                            .iter()
                            .any(|m| m.get(0).and_then(Value::as_str) == Some(name))
                        {
                            messages.push(json!([name, data]));
                        }
                        Ok(Outcome {
                            kind,
                            outputs,
                            messages,
                            meta,
                        })
                    }
                };
                return Ok(Some(end));
            }
            Event::Aborted {
                reason, message, ..
            } => {
                return Ok(Some(Err(BackendError::Lost(format!(
                    "{}: the GPU gave the job back ({}): {message}",
                    self.ep.name(),
                    serde_json::to_value(reason)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default()
                )))));
            }
        }
        Ok(None)
    }

    async fn mark_started(&mut self) {
        if !self.started {
            self.started = true;
            self.emit(BackendEvent::Started).await;
        }
    }

    /// A ComfyUI message: file references pointed at the participant's own files.
    async fn on_message(&mut self, mut msg: Value) {
        let kind = msg
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        if matches!(kind.as_str(), "status" | "feature_flags" | "logs") {
            return;
        }
        if let Some(p) = msg.pointer("/data/prompt_id").and_then(Value::as_str)
            && p != self.job.id
        {
            return;
        }
        match kind.as_str() {
            "executing" if msg.pointer("/data/node").is_some_and(Value::is_null) => return,
            "execution_start" => self.mark_started().await,
            "executed" => {
                if let Some(data) = msg.get_mut("data").and_then(Value::as_object_mut) {
                    if let Some(node) = data.get("node").and_then(Value::as_str) {
                        self.relayed.insert(node.to_owned());
                    }
                    if let Some(output) = data.get("output") {
                        let local = self.localize(output);
                        data.insert("output".into(), local);
                    }
                }
            }
            _ => {}
        }
        self.emit(BackendEvent::Message(msg)).await;
    }

    /// The final ui dicts, localized; nodes whose `executed` was not relayed (a replay,
    /// an async answer without live events) are announced now.
    async fn final_outputs(
        &mut self,
        outputs: Map<String, Value>,
        meta: &Map<String, Value>,
    ) -> Map<String, Value> {
        let mut out = Map::new();
        for (node, ui) in outputs {
            let local = self.localize(&ui);
            if !self.relayed.contains(&node) {
                self.relayed.insert(node.clone());
                let display = meta
                    .get(&node)
                    .and_then(|m| m.get("display_node"))
                    .and_then(Value::as_str)
                    .unwrap_or(&node)
                    .to_owned();
                self.emit(BackendEvent::Message(json!({
                    "type": "executed",
                    "data": {"node": node, "display_node": display, "output": local, "prompt_id": self.job.id},
                })))
                .await;
            }
            out.insert(node, local);
        }
        out
    }

    /// A ui dict with every delivered output/temp file named as stored here; a file
    /// the worker named but never delivered is left out (it does not exist here).
    fn localize(&self, ui: &Value) -> Value {
        let Value::Object(map) = ui else {
            return ui.clone();
        };
        let mut out = Map::new();
        for (key, value) in map {
            let v = match value {
                Value::Array(items) => Value::Array(
                    items
                        .iter()
                        .filter_map(|item| match item {
                            Value::Object(f) if f.contains_key("filename") => {
                                let kind = f.get("type").and_then(Value::as_str).unwrap_or("output");
                                if !matches!(kind, "output" | "temp") {
                                    return Some(item.clone());
                                }
                                let name = f.get("filename").and_then(Value::as_str).unwrap_or("");
                                match self.delivered.get(&(kind.to_owned(), name.to_owned())) {
                                    Some(local) => {
                                        let mut f = f.clone();
                                        f.insert("filename".into(), json!(local));
                                        f.insert("subfolder".into(), json!(""));
                                        Some(Value::Object(f))
                                    }
                                    None => {
                                        tracing::warn!(job = %self.job.id, file = %name, "the worker named an output it did not deliver");
                                        None
                                    }
                                }
                            }
                            other => Some(other.clone()),
                        })
                        .collect(),
                ),
                other => other.clone(),
            };
            out.insert(key.clone(), v);
        }
        Value::Object(out)
    }

    fn dir_for(&self, file: &FileRef) -> Result<std::path::PathBuf, BackendError> {
        match file.kind.as_str() {
            "output" => Ok(self.job.output_dir.clone()),
            "temp" => Ok(self.job.temp_dir.clone()),
            other => Err(self.protocol(&format!("an output of type {other:?}"))),
        }
    }

    fn protocol(&self, what: &str) -> BackendError {
        BackendError::Protocol(format!("{}: {what}", self.ep.name()))
    }

    fn file_err(&self, e: FileError) -> BackendError {
        match e {
            FileError::Disk(m) => BackendError::Storage(m),
            e => BackendError::Protocol(format!("{}: {e}", self.ep.name())),
        }
    }
}

/// Resolves once the owner asks to stop the job (never, if nobody can ask any more).
async fn interrupted(rx: &mut watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// ComfyUI's interrupt outcome for a job stopped before or while it ran here.
pub(crate) fn cancelled(id: &str) -> Outcome {
    Outcome::cancelled(id)
}

/// ComfyUI's error body shape.
pub(crate) fn error_body(kind: &str, message: &str) -> Value {
    json!({"error": {"type": kind, "message": message, "details": "", "extra_info": {}}, "node_errors": {}})
}

fn messages_of(status: &Value) -> Vec<Value> {
    status
        .get("messages")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

fn retry_after(resp: &reqwest::Response) -> Duration {
    resp.headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1))
}

/// `scheme://host[:port]` of a base URL.
pub(crate) fn origin(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let host = rest.split('/').next().unwrap_or(rest);
            format!("{scheme}://{host}")
        }
        None => url.split('/').next().unwrap_or(url).to_owned(),
    }
}

fn absolute(path: &str) -> String {
    if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/{path}")
    }
}

#[derive(Debug, PartialEq, Eq)]
enum AsyncStatus {
    Waiting,
    Inference,
    Completed,
}

/// The provider's status: strings now (`Initialized`, `Queue`, `Inference`,
/// `Completed`), integers in older documents (0-3).
fn async_status(v: Option<&Value>) -> AsyncStatus {
    match v {
        Some(Value::String(s)) => match s.to_ascii_lowercase().as_str() {
            "inference" => AsyncStatus::Inference,
            "completed" => AsyncStatus::Completed,
            _ => AsyncStatus::Waiting,
        },
        Some(Value::Number(n)) => match n.as_u64() {
            Some(2) => AsyncStatus::Inference,
            Some(3) => AsyncStatus::Completed,
            _ => AsyncStatus::Waiting,
        },
        _ => AsyncStatus::Waiting,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn async_statuses_as_strings_or_numbers() {
        assert_eq!(async_status(Some(&json!("Queue"))), AsyncStatus::Waiting);
        assert_eq!(
            async_status(Some(&json!("Inference"))),
            AsyncStatus::Inference
        );
        assert_eq!(
            async_status(Some(&json!("Completed"))),
            AsyncStatus::Completed
        );
        assert_eq!(async_status(Some(&json!(1))), AsyncStatus::Waiting);
        assert_eq!(async_status(Some(&json!(2))), AsyncStatus::Inference);
        assert_eq!(async_status(Some(&json!(3))), AsyncStatus::Completed);
        assert_eq!(async_status(None), AsyncStatus::Waiting);
        assert_eq!(
            origin("https://gw.example:8443/dep/x"),
            "https://gw.example:8443"
        );
        assert_eq!(absolute("status/dep"), "/status/dep");
    }
}
