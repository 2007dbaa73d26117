//! What every request leaves behind: an id (answered in `X-Request-Id`, and a field of every
//! log line written while it is handled), its metrics by matched route, and one log line.

use std::time::Instant;

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

use crate::state::AppState;
use crate::telemetry::{self, HTTP_DURATION, HTTP_REQUESTS, REQUEST_ID_HEADER};

/// A fresh request id: 16 hex digits, random (cheap: the thread's generator).
pub fn new_request_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// An id a trusted reverse proxy already gave the request (nginx's `$request_id`), so its
/// access log and ours name the same request. Only a short token of safe characters.
fn forwarded_id(req: &Request, state: &AppState) -> Option<String> {
    let proxies = &state.settings.trusted_proxies;
    if proxies.is_empty() {
        return None;
    }
    let peer = req
        .extensions()
        .get::<ConnectInfo<std::net::SocketAddr>>()?
        .0
        .ip();
    if !proxies.iter().any(|c| c.contains(peer)) {
        return None;
    }
    let v = req.headers().get(REQUEST_ID_HEADER)?.to_str().ok()?;
    valid_request_id(v).then(|| v.to_owned())
}

/// 1 to 64 of `[A-Za-z0-9._:-]`: nothing a log line or a header could be confused by.
pub fn valid_request_id(v: &str) -> bool {
    (1..=64).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// The middleware (around every route and the fallback).
pub async fn observe(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "static".into());
    let method = telemetry::method_label(req.method());
    let id = forwarded_id(&req, &state).unwrap_or_else(new_request_id);
    // `user` is filled in once the request is authenticated.
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        method,
        route = %route,
        user = tracing::field::Empty,
    );
    let mut resp = next.run(req).instrument(span.clone()).await;
    let status = resp.status();
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    let took = start.elapsed();
    metrics::counter!(HTTP_REQUESTS, "route" => route.clone(), "method" => method, "status" => status.as_str().to_owned())
        .increment(1);
    metrics::histogram!(HTTP_DURATION, "route" => route.clone()).record(took.as_secs_f64());
    let ms = took.as_secs_f64() * 1000.0;
    let _in = span.enter();
    // A page load fetches a hundred static files: those lines only at debug.
    if status.is_server_error() {
        tracing::error!(status = status.as_u16(), ms, "request failed");
    } else if route == "static" && !status.is_client_error() {
        tracing::debug!(status = status.as_u16(), ms, "request");
    } else {
        tracing::info!(status = status.as_u16(), ms, "request");
    }
    drop(_in);
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_short_safe_tokens() {
        let id = new_request_id();
        assert_eq!(id.len(), 16);
        assert!(valid_request_id(&id));
        assert_ne!(id, new_request_id());
        assert!(valid_request_id("0123456789abcdef0123456789abcdef"));
        for bad in ["", "a b", "x\ny", "\"}", &"a".repeat(65), "é"] {
            assert!(!valid_request_id(bad), "{bad:?}");
        }
    }
}
