//! The inference gateway: `/<deployment>/<path>` through the queue to a replica (sync,
//! SSE re-framed), the async mode and its `/status` and `/result` routes.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use comfyume_wire::worker::SseParser;
use futures_util::StreamExt;
use serde_json::json;
use tokio::time::Instant;

use crate::config::TtlExpiry;
use crate::{AsyncJob, Emu, Lease, lock};

/// Longest SSE line re-framed (an output chunk is about 256 KiB).
const MAX_SSE_LINE: usize = 64 * 1024 * 1024;

pub(crate) fn router(emu: Arc<Emu>) -> Router {
    Router::new()
        .route("/status/{dep}", get(status))
        .route("/result/{dep}", get(result))
        .merge(crate::manage::routes())
        .route("/{dep}", any(inference_root))
        .route("/{dep}/{*path}", any(inference))
        .layer(DefaultBodyLimit::disable())
        .with_state(emu)
}

pub(crate) fn json_error(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(json!({"error": message}))).into_response()
}

/// The inference key, when one is configured.
fn authorized(emu: &Emu, headers: &HeaderMap) -> bool {
    let Some(key) = &emu.args.inference_key else {
        return true;
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().strip_prefix("Bearer "))
        .map(str::trim);
    given.is_some_and(|g| {
        g.len() == key.len()
            && g.bytes()
                .zip(key.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Sync,
    Async,
    AsyncProxy,
    AsyncContainer,
}

fn mode(headers: &HeaderMap) -> Mode {
    let prefer = headers
        .get("prefer")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match prefer.as_str() {
        "respond-async" => Mode::Async,
        "respond-async-proxy" => Mode::AsyncProxy,
        "respond-async-container" => Mode::AsyncContainer,
        // Any other value is passed to the container with a sync request.
        _ => Mode::Sync,
    }
}

/// A request as it will be sent on to a replica.
#[derive(Clone)]
struct Forward {
    method: Method,
    path_and_query: String,
    headers: HeaderMap,
    body: Bytes,
}

async fn inference_root(
    state: State<Arc<Emu>>,
    Path(dep): Path<String>,
    query: RawQuery,
    method: Method,
    headers: HeaderMap,
    body: Body,
) -> Response {
    handle(state, dep, String::new(), query, method, headers, body).await
}

async fn inference(
    state: State<Arc<Emu>>,
    Path((dep, path)): Path<(String, String)>,
    query: RawQuery,
    method: Method,
    headers: HeaderMap,
    body: Body,
) -> Response {
    handle(state, dep, path, query, method, headers, body).await
}

async fn handle(
    State(emu): State<Arc<Emu>>,
    dep: String,
    path: String,
    RawQuery(query): RawQuery,
    method: Method,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if !authorized(&emu, &headers) {
        return json_error(
            StatusCode::UNAUTHORIZED,
            "a valid inference API key is required",
        );
    }
    let Some(settings) = emu.world().deps.get(&dep).map(|d| d.s.clone()) else {
        return json_error(StatusCode::NOT_FOUND, "no such deployment");
    };
    let body = match axum::body::to_bytes(body, emu.args.max_body_bytes).await {
        Ok(b) => b,
        Err(_) => return json_error(StatusCode::PAYLOAD_TOO_LARGE, "request body too large"),
    };
    let mode = mode(&headers);
    // The caller's id, or one made here.
    let inference_id = headers
        .get("x-inference-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let mut fwd_headers = forward_headers(&headers);
    if let Ok(v) = HeaderValue::from_str(&inference_id) {
        fwd_headers.insert("x-inference-id", v);
    }
    if matches!(mode, Mode::AsyncProxy | Mode::AsyncContainer | Mode::Async) {
        fwd_headers.insert("prefer", HeaderValue::from_static("respond-async"));
    }
    let fwd = Forward {
        method,
        path_and_query: match query {
            Some(q) => format!("/{path}?{q}"),
            None => format!("/{path}"),
        },
        headers: fwd_headers,
        body,
    };
    let deadline = Instant::now() + settings.ttl;
    match mode {
        Mode::Sync | Mode::AsyncContainer => {
            sync(emu, dep, fwd, deadline, settings.ttl_expiry).await
        }
        Mode::Async | Mode::AsyncProxy => {
            let key = (dep.clone(), inference_id.clone());
            let store = mode == Mode::Async;
            if store {
                let mut jobs = lock(&emu.async_jobs);
                expire_async(&emu, &mut jobs);
                // Not documented: an unfinished id is not queued twice; a finished one
                // runs again.
                let running = jobs
                    .get(&key)
                    .is_some_and(|j| j.status != "Completed" && j.error.is_none());
                if !running {
                    jobs.insert(
                        key.clone(),
                        AsyncJob {
                            status: "Initialized",
                            error: None,
                            result: None,
                            created: Instant::now(),
                        },
                    );
                    tokio::spawn(run_async(emu.clone(), key, fwd, deadline, true));
                }
            } else {
                tokio::spawn(run_async(emu.clone(), key, fwd, deadline, false));
                return StatusCode::ACCEPTED.into_response();
            }
            let status_path = format!("/status/{dep}");
            let result_path = format!("/result/{dep}");
            let mut r = (
                StatusCode::ACCEPTED,
                axum::Json(json!({
                    "Id": inference_id,
                    "StatusPath": status_path,
                    "ResultPath": result_path,
                })),
            )
                .into_response();
            if let Ok(v) = HeaderValue::from_str(&inference_id) {
                r.headers_mut().insert("x-inference-id", v);
            }
            if let Ok(v) = HeaderValue::from_str(&result_path) {
                r.headers_mut().insert(header::LOCATION, v);
            }
            r
        }
    }
}

/// Headers passed to the replica: not the inference key (it is the provider's), not
/// hop-by-hop ones.
fn forward_headers(h: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (k, v) in h {
        if is_hop(k) || matches!(k.as_str(), "authorization" | "host" | "content-length") {
            continue;
        }
        out.append(k.clone(), v.clone());
    }
    out
}

fn is_hop(k: &HeaderName) -> bool {
    matches!(
        k.as_str(),
        "connection"
            | "keep-alive"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "proxy-authorization"
            | "proxy-authenticate"
    )
}

/// What a caller gets when the TTL ran out before any answer started.
fn expired(how: TtlExpiry) -> Response {
    match how {
        TtlExpiry::Status(code) => json_error(
            StatusCode::from_u16(code).unwrap_or(StatusCode::GATEWAY_TIMEOUT),
            "request TTL expired",
        ),
        // The connection is cut: a body that fails before its first byte.
        TtlExpiry::Cut => Response::new(Body::from_stream(futures_util::stream::once(async {
            Err::<Bytes, _>(std::io::Error::other("request TTL expired"))
        }))),
    }
}

async fn sync(
    emu: Arc<Emu>,
    dep: String,
    fwd: Forward,
    deadline: Instant,
    expiry: TtlExpiry,
) -> Response {
    let lease = tokio::select! {
        l = emu.lease(&dep) => l,
        _ = tokio::time::sleep_until(deadline) => {
            tracing::info!(deployment = %dep, "request TTL expired in the queue");
            return expired(expiry);
        }
    };
    let Some(lease) = lease else {
        return json_error(StatusCode::SERVICE_UNAVAILABLE, "the gateway is stopping");
    };
    tracing::info!(deployment = %dep, replica = %lease.replica, path = %fwd.path_and_query, "request sent to a replica");
    let upstream = match send(&emu, &lease, &fwd, deadline).await {
        Ok(r) => r,
        Err(Failure::Expired) => return expired(expiry),
        Err(Failure::Replica(e)) => {
            // Not throttled: the error goes to the caller.
            return json_error(StatusCode::BAD_GATEWAY, &format!("replica failed: {e}"));
        }
    };
    relay(upstream, lease, deadline, dep)
}

enum Failure {
    Expired,
    Replica(String),
}

async fn send(
    emu: &Emu,
    lease: &Lease,
    fwd: &Forward,
    deadline: Instant,
) -> Result<reqwest::Response, Failure> {
    let url = format!("{}{}", lease.url, fwd.path_and_query);
    let req = emu
        .http
        .request(fwd.method.clone(), url)
        .headers(fwd.headers.clone())
        .body(fwd.body.clone());
    tokio::select! {
        r = req.send() => r.map_err(|e| Failure::Replica(e.without_url().to_string())),
        _ = tokio::time::sleep_until(deadline) => Err(Failure::Expired),
    }
}

/// The replica's answer, passed on as it comes: SSE re-framed as `event:response` +
/// `data:` per event; cut when the replica goes away or the TTL runs out.
fn relay(upstream: reqwest::Response, lease: Lease, deadline: Instant, dep: String) -> Response {
    let status = upstream.status();
    let sse = upstream
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("text/event-stream"));
    let mut headers = HeaderMap::new();
    for (k, v) in upstream.headers() {
        if is_hop(k) || k == header::CONTENT_LENGTH {
            continue;
        }
        headers.append(k.clone(), v.clone());
    }
    let state = RelayState {
        upstream: Box::pin(upstream.bytes_stream()),
        parser: sse.then(|| SseParser::new(MAX_SSE_LINE)),
        deadline,
        _lease: lease,
        dep,
        done: false,
    };
    let stream = futures_util::stream::unfold(state, |mut s| async move {
        if s.done {
            return None;
        }
        loop {
            let next = tokio::select! {
                n = s.upstream.next() => n,
                _ = tokio::time::sleep_until(s.deadline) => {
                    tracing::info!(deployment = %s.dep, "request TTL expired mid-stream; cutting it");
                    s.done = true;
                    return Some((Err(std::io::Error::other("request TTL expired")), s));
                }
            };
            match next {
                None => return None,
                Some(Err(e)) => {
                    // The replica went away: the caller's stream breaks too.
                    s.done = true;
                    return Some((Err(std::io::Error::other(e.without_url())), s));
                }
                Some(Ok(chunk)) => {
                    let Some(parser) = &mut s.parser else {
                        return Some((Ok(chunk), s));
                    };
                    let events = match parser.feed(&chunk) {
                        Ok(ev) => ev,
                        Err(e) => {
                            s.done = true;
                            return Some((Err(std::io::Error::other(e)), s));
                        }
                    };
                    if events.is_empty() {
                        continue;
                    }
                    let mut out = String::new();
                    for ev in events {
                        out.push_str("event:response\n");
                        for line in ev.data.split('\n') {
                            out.push_str("data:");
                            out.push_str(line);
                            out.push('\n');
                        }
                        out.push('\n');
                    }
                    return Some((Ok(Bytes::from(out)), s));
                }
            }
        }
    });
    let mut r = Response::new(Body::from_stream(stream));
    *r.status_mut() = status;
    *r.headers_mut() = headers;
    r
}

struct RelayState {
    upstream:
        std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<Bytes, reqwest::Error>> + Send>>,
    parser: Option<SseParser>,
    deadline: Instant,
    /// Held until the answer is over: the replica's slot.
    _lease: Lease,
    dep: String,
    done: bool,
}

fn set_async(emu: &Emu, key: &(String, String), f: impl FnOnce(&mut AsyncJob)) {
    if let Some(j) = lock(&emu.async_jobs).get_mut(key) {
        f(j);
    }
}

fn expire_async(emu: &Emu, jobs: &mut std::collections::HashMap<(String, String), AsyncJob>) {
    let keep = Duration::from_secs(emu.args.async_keep_secs);
    jobs.retain(|_, j| j.created.elapsed() < keep);
}

/// An async request: through the queue to a replica, its whole answer stored.
async fn run_async(
    emu: Arc<Emu>,
    key: (String, String),
    fwd: Forward,
    deadline: Instant,
    store: bool,
) {
    let (dep, id) = key.clone();
    set_async(&emu, &key, |j| j.status = "Queue");
    let lease = tokio::select! {
        l = emu.lease(&dep) => l,
        _ = tokio::time::sleep_until(deadline) => None,
    };
    let Some(lease) = lease else {
        set_async(&emu, &key, |j| j.error = Some("request TTL expired".into()));
        return;
    };
    set_async(&emu, &key, |j| j.status = "Inference");
    let resp = match send(&emu, &lease, &fwd, deadline).await {
        Ok(r) => r,
        Err(Failure::Expired) => {
            set_async(&emu, &key, |j| j.error = Some("request TTL expired".into()));
            return;
        }
        Err(Failure::Replica(e)) => {
            set_async(&emu, &key, |j| {
                j.error = Some(format!("replica failed: {e}"))
            });
            return;
        }
    };
    let code = resp.status().as_u16();
    let ctype = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/octet-stream")
        .to_owned();
    let limit = emu.args.max_result_bytes;
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    let outcome: Result<(), String> = loop {
        let next = tokio::select! {
            n = stream.next() => n,
            _ = tokio::time::sleep_until(deadline) => break Err("request TTL expired".into()),
        };
        match next {
            None => break Ok(()),
            Some(Err(e)) => break Err(format!("replica failed: {}", e.without_url())),
            Some(Ok(chunk)) => {
                if !store {
                    continue;
                }
                if body.len() + chunk.len() > limit {
                    break Err("result too large".into());
                }
                body.extend_from_slice(&chunk);
            }
        }
    };
    drop(lease);
    tracing::info!(deployment = %dep, id = %id, ok = outcome.is_ok(), "async request done");
    set_async(&emu, &key, |j| match outcome {
        Ok(()) => {
            j.status = "Completed";
            j.result = Some((code, ctype, Bytes::from(body)));
        }
        Err(e) => j.error = Some(e),
    });
}

fn inference_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get("x-inference-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .filter(|s| !s.is_empty())
}

async fn status(
    State(emu): State<Arc<Emu>>,
    Path(dep): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !authorized(&emu, &headers) {
        return json_error(
            StatusCode::UNAUTHORIZED,
            "a valid inference API key is required",
        );
    }
    let Some(id) = inference_id(&headers) else {
        return json_error(StatusCode::BAD_REQUEST, "X-Inference-Id is required");
    };
    let jobs = lock(&emu.async_jobs);
    match jobs.get(&(dep, id.clone())) {
        Some(j) => {
            axum::Json(json!({"Id": id, "Status": j.status, "Error": j.error})).into_response()
        }
        None => json_error(StatusCode::NOT_FOUND, "no such inference"),
    }
}

async fn result(
    State(emu): State<Arc<Emu>>,
    Path(dep): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !authorized(&emu, &headers) {
        return json_error(
            StatusCode::UNAUTHORIZED,
            "a valid inference API key is required",
        );
    }
    let Some(id) = inference_id(&headers) else {
        return json_error(StatusCode::BAD_REQUEST, "X-Inference-Id is required");
    };
    let jobs = lock(&emu.async_jobs);
    let Some(j) = jobs.get(&(dep, id.clone())) else {
        return json_error(StatusCode::NOT_FOUND, "no such inference");
    };
    match &j.result {
        Some((code, ctype, body)) => {
            let mut r = Response::new(Body::from(body.clone()));
            *r.status_mut() = StatusCode::from_u16(*code).unwrap_or(StatusCode::OK);
            if let Ok(v) = HeaderValue::from_str(ctype) {
                r.headers_mut().insert(header::CONTENT_TYPE, v);
            }
            r
        }
        // Not documented: not ready (or failed) is 202 with the status body.
        None => (
            StatusCode::ACCEPTED,
            axum::Json(json!({"Id": id, "Status": j.status, "Error": j.error})),
        )
            .into_response(),
    }
}
