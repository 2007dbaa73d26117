//! The HTTP and WebSocket client of one ComfyUI server (PROTOCOL.md §2–§4):
//! every call with its time limit and a metric, errors mapped to
//! [`BackendError`], never a URL (it may carry credentials) in a message.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::{Method, RequestBuilder, StatusCode, Url};
use serde_json::Value;
use tokio_tungstenite::tungstenite;

use crate::job::{BackendError, Timeouts};
use crate::socket::SharedSocket;
use crate::telemetry::{BACKEND_CALL_DURATION, BACKEND_CALL_ERRORS};

/// A ComfyUI server used as a backend.
pub struct ComfyUiBackend {
    pub(crate) name: String,
    pub(crate) base: Url,
    pub(crate) slots: usize,
    pub(crate) timeouts: Timeouts,
    pub(crate) http: reqwest::Client,
    /// Output node classes from the last `/object_info`, to decide whether a
    /// job runs only part of its outputs.
    pub(crate) output_classes: Mutex<Option<Arc<HashSet<String>>>>,
    /// The one WebSocket all our jobs on this server share.
    pub(crate) socket: SharedSocket,
    /// `executed` is passed on before its files are copied (see [`Self::announcing_results_early`]).
    pub(crate) early_results: bool,
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
            socket: SharedSocket::new(),
            early_results: false,
        })
    }

    /// Passes each `executed` on as soon as the server names its files, under names
    /// reserved for them ([`crate::outputs::reserve`]), and copies the files after; the job
    /// reads the server's next message once they are complete. For a reader that serves
    /// those files itself and waits for a pending one ([`crate::outputs::wait_pending`]), as
    /// serve's `/view` does. Without it (the worker agent, which reads the files when it
    /// sees `executed`), every file is in place before its `executed` is passed on.
    pub fn announcing_results_early(mut self) -> Self {
        self.early_results = true;
        self
    }

    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    /// `base` + path segments (each percent-encoded).
    pub(crate) fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    pub(crate) fn ws_url(&self, client_id: &str) -> String {
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
    pub(crate) async fn send(
        &self,
        what: &str,
        req: RequestBuilder,
        limit: Duration,
    ) -> Result<reqwest::Response, BackendError> {
        let started = std::time::Instant::now();
        let res = req.timeout(limit).send().await;
        metrics::histogram!(BACKEND_CALL_DURATION, "backend" => self.name.clone(), "call" => what.to_owned())
            .record(started.elapsed().as_secs_f64());
        // A server error answered is a failed call too (the caller maps the status).
        if let Ok(r) = &res
            && r.status().is_server_error()
        {
            metrics::counter!(BACKEND_CALL_ERRORS, "backend" => self.name.clone(), "call" => what.to_owned(), "kind" => "http_5xx")
                .increment(1);
        }
        res.map_err(|e| self.failed(what, http_error(what, limit, e)))
    }

    /// Counts a failed call.
    pub(crate) fn failed(&self, what: &str, e: BackendError) -> BackendError {
        let kind = match &e {
            BackendError::Unreachable(_) => "unreachable",
            BackendError::Lost(_) => "lost",
            BackendError::Timeout(_) => "timeout",
            BackendError::Protocol(_) => "protocol",
            BackendError::Rejected(_) => "rejected",
            BackendError::Storage(_) => "storage",
        };
        metrics::counter!(BACKEND_CALL_ERRORS, "backend" => self.name.clone(), "call" => what.to_owned(), "kind" => kind)
            .increment(1);
        e
    }

    /// A call that must answer 200 with a JSON body.
    pub(crate) async fn json_call(
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
    pub(crate) async fn post_empty(
        &self,
        what: &str,
        path: &str,
        body: Value,
    ) -> Result<(), BackendError> {
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
    pub(crate) async fn history(&self, id: &str) -> Result<Option<Value>, BackendError> {
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
    pub(crate) async fn queue_place(&self, id: &str) -> Result<Option<Place>, BackendError> {
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
    pub(crate) async fn locate(&self, id: &str) -> Result<Remote, BackendError> {
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
    pub(crate) async fn output_classes(&self) -> Option<Arc<HashSet<String>>> {
        if let Some(c) = lock(&self.output_classes).clone() {
            return Some(c);
        }
        self.object_info().await.ok()?;
        lock(&self.output_classes).clone()
    }
}

impl ComfyUiBackend {
    /// Shown to participants and on the dashboard (never the URL: it may carry credentials).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Jobs it may hold at once (one running, the rest handed over in advance).
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// `GET /object_info`; remembers the output node classes.
    pub async fn object_info(&self) -> Result<Value, BackendError> {
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Place {
    Running,
    Pending,
}

/// A prompt's state on the backend.
pub(crate) enum Remote {
    Finished(Value),
    Running,
    Pending,
    /// Neither in history nor in the queue: the backend forgot it.
    Gone,
}

pub(crate) fn http_error(what: &str, limit: Duration, e: reqwest::Error) -> BackendError {
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

pub(crate) fn ws_error(what: &str, e: tungstenite::Error) -> BackendError {
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

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

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
