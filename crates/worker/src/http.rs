//! The worker's HTTP routes: `POST /run`, `GET /health`, `GET /object_info`. Errors are
//! mapped to HTTP here, once, in ComfyUI's error shape.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use comfyume_comfyui::InputFile;
use comfyume_wire::worker::{
    Event, InputSource, PROTOCOL_VERSION, RunRequest, SSE_KEEPALIVE, error_body,
};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::Shared;
use crate::health::Refusal;
use crate::job::{self, Admission, JobRun, Out, Slot};

/// Events buffered between a job and its answer's body (backpressure beyond this).
const EVENT_BUFFER: usize = 8;

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/run", post(run))
        .route("/object_info", get(object_info))
        .fallback(not_found)
        // `/run` reads its body itself, with the configured limit.
        .layer(DefaultBodyLimit::disable())
        .with_state(shared)
}

fn error(status: StatusCode, kind: &str, message: &str, details: &str) -> Response {
    (status, axum::Json(error_body(kind, message, details))).into_response()
}

fn with_retry_after(mut r: Response, secs: u64) -> Response {
    if let Ok(v) = HeaderValue::from_str(&secs.max(1).to_string()) {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    r
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "not_found", "No such route", "")
}

async fn health(State(shared): State<Arc<Shared>>) -> Response {
    let (code, body) = shared.lock().health.health();
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    (status, axum::Json(body)).into_response()
}

/// The configured token, from `X-Worker-Token` or `Authorization: Bearer`, compared in
/// constant time (as digests, so not even the length leaks).
fn authorized(shared: &Shared, headers: &HeaderMap) -> bool {
    let Some(token) = &shared.args.token else {
        return true;
    };
    let given = headers
        .get("x-worker-token")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .or_else(|| {
            headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| {
                    let (scheme, rest) = v.trim().split_once(' ')?;
                    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
                })
        });
    let Some(given) = given else {
        return false;
    };
    let a = Sha256::digest(given.as_bytes());
    let b = Sha256::digest(token.expose().as_bytes());
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

fn unauthorized() -> Response {
    let mut r = error(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "A valid worker token is required",
        "",
    );
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

async fn object_info(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if !authorized(&shared, &headers) {
        return unauthorized();
    }
    let info = crate::lock(&shared.object_info).clone();
    match info {
        Some(body) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response(),
        None => {
            let (_, body) = shared.lock().health.health();
            let r = (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response();
            with_retry_after(r, shared.args.retry_after_secs)
        }
    }
}

/// `Prefer: respond-async` among the preferences.
fn prefers_async(headers: &HeaderMap) -> bool {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| {
            p.split([';', '='])
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("respond-async"))
        })
}

async fn run(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Body) -> Response {
    if !authorized(&shared, &headers) {
        return unauthorized();
    }
    let limit = usize::try_from(shared.args.max_request_bytes).unwrap_or(usize::MAX);
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            "The request body is too large",
            &format!("at most {limit} bytes; send large inputs by store_key"),
        )
    };
    if declared.is_some_and(|n| n > limit as u64) {
        return too_large();
    }
    let bytes = match axum::body::to_bytes(body, limit).await {
        Ok(b) => b,
        Err(_) => return too_large(),
    };
    let req: RunRequest = match serde_json::from_slice(&bytes) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "The request is not a valid job",
                &e.to_string(),
            );
        }
    };
    drop(bytes);
    if let Some(other) = headers
        .get("x-inference-id")
        .and_then(|v| v.to_str().ok())
        .filter(|h| *h != req.job_id)
    {
        // A gateway may set its own request id; the body's job_id is what counts.
        tracing::debug!(job = %req.job_id, inference_id = other, "X-Inference-Id differs from job_id");
    }
    if let Err(e) = req.validate() {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "The request is not a valid job",
            &e.to_string(),
        );
    }
    let async_mode = prefers_async(&headers);
    let (tx, rx) = mpsc::channel(EVENT_BUFFER);
    let chunk = usize::try_from(shared.args.chunk_bytes).unwrap_or(196_608);
    let slot = match Slot::claim(&shared, &req.job_id) {
        Ok(Admission::Replay(done)) => {
            job::spawn_replay(shared.clone(), done, tx, chunk);
            return stream_response(&shared, &req.job_id, rx, async_mode);
        }
        Ok(Admission::Run(slot)) => slot,
        Err(refusal) => return refused(&shared, &req.job_id, refusal),
    };
    let accepted_at = Instant::now();
    let dir = shared.jobs_dir.join(&req.job_id);
    let _ = tokio::fs::remove_dir_all(&dir).await;
    let (inputs, stored_inputs) = match write_inputs(&shared, &req, &dir).await {
        Ok(v) => v,
        Err(r) => {
            let _ = tokio::fs::remove_dir_all(&dir).await;
            drop(slot);
            return r;
        }
    };
    let job_id = req.job_id.clone();
    job::spawn(JobRun {
        shared: shared.clone(),
        slot,
        req,
        dir,
        inputs,
        stored_inputs,
        out: Out::new(tx),
        previews: !async_mode,
        accepted_at,
    });
    stream_response(&shared, &job_id, rx, async_mode)
}

fn refused(shared: &Shared, job_id: &str, refusal: Refusal) -> Response {
    let retry = shared.args.retry_after_secs;
    match refusal {
        Refusal::Stopping => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "stopping",
            "This worker is shutting down",
            "",
        ),
        Refusal::NotReady(body) => {
            let status = body
                .get("status")
                .and_then(|s| s.as_str())
                .unwrap_or("starting")
                .to_owned();
            with_retry_after(
                error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not_ready",
                    "This worker is not ready for a job",
                    &status,
                ),
                retry,
            )
        }
        Refusal::SameJobRunning => with_retry_after(
            error(
                StatusCode::CONFLICT,
                "job_running",
                "This job is running on this worker already",
                &format!("job {job_id}"),
            ),
            retry,
        ),
        Refusal::Busy(other) => {
            tracing::info!(job = %job_id, running = %other, "busy: refused with 429");
            with_retry_after(
                error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "busy",
                    "This worker is running another job",
                    &format!("job {other}"),
                ),
                retry,
            )
        }
    }
}

/// Decodes inline inputs into the job's directory; store inputs are fetched by the job.
#[allow(clippy::result_large_err)]
async fn write_inputs(
    shared: &Shared,
    req: &RunRequest,
    dir: &std::path::Path,
) -> Result<(Vec<InputFile>, Vec<(String, String)>), Response> {
    let max = shared.args.max_input_bytes;
    let estimate: u64 = req
        .inputs
        .iter()
        .filter_map(|i| i.data_base64.as_ref())
        .map(|d| d.len() as u64 / 4 * 3)
        .sum();
    if estimate > max.saturating_add(3 * req.inputs.len() as u64) {
        return Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            "The inline inputs are too large",
            &format!("at most {max} bytes inline; send large inputs by store_key"),
        ));
    }
    let mut inline = Vec::new();
    let mut stored = Vec::new();
    let input_dir = dir.join("input");
    for (i, input) in req.inputs.iter().enumerate() {
        match input.source() {
            Ok(InputSource::Inline(data)) => {
                let bytes = B64.decode(data.trim()).map_err(|e| {
                    error(
                        StatusCode::BAD_REQUEST,
                        "invalid_request",
                        "An input is not valid base64",
                        &format!("input {}: {e}", input.name),
                    )
                })?;
                let local: PathBuf = input_dir.join(format!("i{i}"));
                let write = async {
                    tokio::fs::create_dir_all(&input_dir).await?;
                    tokio::fs::write(&local, &bytes).await
                };
                write.await.map_err(|e| {
                    tracing::error!(error = %e, "cannot write an input file");
                    error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "internal",
                        "The worker cannot store the input",
                        "",
                    )
                })?;
                inline.push(InputFile {
                    local,
                    name: input.name.clone(),
                });
            }
            Ok(InputSource::Store(key)) => {
                if shared.store.is_none() {
                    return Err(error(
                        StatusCode::BAD_REQUEST,
                        "invalid_request",
                        "Inputs by store_key need an object store on the worker",
                        &format!("input {}", input.name),
                    ));
                }
                stored.push((input.name.clone(), key.to_owned()));
            }
            // validate() already refused these.
            Err(e) => {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "The request is not a valid job",
                    &e.to_string(),
                ));
            }
        }
    }
    Ok((inline, stored))
}

/// How events are written into the answer.
#[derive(Clone, Copy)]
enum Framing {
    Sse,
    Json,
}

/// The answer: events as SSE, or as one JSON document written as they come.
fn stream_response(
    shared: &Shared,
    job_id: &str,
    rx: mpsc::Receiver<Event>,
    async_mode: bool,
) -> Response {
    let framing = if async_mode {
        Framing::Json
    } else {
        Framing::Sse
    };
    let keepalive = shared.args.keepalive();
    let head = match framing {
        Framing::Sse => None,
        Framing::Json => Some(Bytes::from(format!(
            "{{\"job_id\":{},\"protocol\":{PROTOCOL_VERSION},\"events\":[\n",
            serde_json::Value::String(job_id.to_owned())
        ))),
    };
    let state = BodyState {
        rx,
        framing,
        keepalive,
        head,
        first: true,
        saw_final: false,
        done: false,
    };
    let stream = futures_util::stream::unfold(state, next_chunk);
    let mut r = Response::new(Body::from_stream(stream));
    let h = r.headers_mut();
    let ctype = match framing {
        Framing::Sse => "text/event-stream",
        Framing::Json => "application/json",
    };
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    if let Ok(v) = HeaderValue::from_str(job_id) {
        h.insert("x-inference-id", v);
    }
    r
}

struct BodyState {
    rx: mpsc::Receiver<Event>,
    framing: Framing,
    keepalive: Duration,
    head: Option<Bytes>,
    first: bool,
    saw_final: bool,
    done: bool,
}

async fn next_chunk(mut s: BodyState) -> Option<(Result<Bytes, std::io::Error>, BodyState)> {
    if s.done {
        return None;
    }
    if let Some(head) = s.head.take() {
        return Some((Ok(head), s));
    }
    let ev = tokio::select! {
        ev = s.rx.recv() => ev,
        _ = tokio::time::sleep(s.keepalive) => {
            let k = match s.framing {
                Framing::Sse => Bytes::from_static(SSE_KEEPALIVE.as_bytes()),
                // Whitespace between array elements keeps the document valid.
                Framing::Json => Bytes::from_static(b"\n"),
            };
            return Some((Ok(k), s));
        }
    };
    let Some(ev) = ev else {
        s.done = true;
        // The job ended without a final event (a final event ends the body itself).
        return match s.framing {
            Framing::Sse => None,
            // Cut the document so it cannot pass for a complete answer.
            Framing::Json => Some((
                Err(std::io::Error::other("the job ended without a final event")),
                s,
            )),
        };
    };
    s.saw_final |= ev.is_final();
    let mut buf = Vec::with_capacity(256);
    match s.framing {
        Framing::Sse => buf.extend_from_slice(b"data: "),
        Framing::Json if s.first => {}
        Framing::Json => buf.extend_from_slice(b",\n"),
    }
    s.first = false;
    if serde_json::to_writer(&mut buf, &ev).is_err() {
        return Some((Err(std::io::Error::other("event not serialisable")), s));
    }
    match s.framing {
        Framing::Sse => buf.extend_from_slice(b"\n\n"),
        Framing::Json if s.saw_final => buf.extend_from_slice(b"\n]}\n"),
        Framing::Json => {}
    }
    // Nothing follows the final event: the answer ends with it, even while the job
    // still winds down on ComfyUI.
    s.done = s.saw_final;
    Some((Ok(Bytes::from(buf)), s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefer_header_parsing() {
        let mut h = HeaderMap::new();
        assert!(!prefers_async(&h));
        h.insert("prefer", HeaderValue::from_static("wait=5, respond-async"));
        assert!(prefers_async(&h));
        h.insert("prefer", HeaderValue::from_static("respond-async-proxy"));
        assert!(!prefers_async(&h));
        h.insert("prefer", HeaderValue::from_static("Respond-Async; x=1"));
        assert!(prefers_async(&h));
    }
}
