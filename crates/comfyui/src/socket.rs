//! One WebSocket per ComfyUI server, shared by every job we run there.
//!
//! All our prompts are submitted with the socket's client id, so ComfyUI sends
//! their execution messages here; each is routed to the job whose `prompt_id`
//! it names (frames without one, legacy previews, to the prompt ComfyUI is
//! executing). A job subscribes before it submits, and the socket counts as open only once
//! ComfyUI greeted it (so registered it), so a job misses nothing. When
//! the connection drops, every subscriber hears so (and looks the job up in
//! `/history`); the next job or re-connect opens a new one with the same client
//! id, which ComfyUI maps to the new socket.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite;

use crate::client::{ComfyUiBackend, lock, ws_error};
use crate::job::BackendError;
use crate::telemetry::BACKEND_WS_RECONNECTS;
use comfyume_wire::shapes::ws::{BinaryFrame, ws_message};

/// What a job's subscription receives.
pub(crate) enum WsEvent {
    /// A JSON message naming the job's prompt.
    Json(Value),
    /// A preview frame of the job's prompt.
    Binary(Bytes),
    /// The connection dropped (every subscriber hears it).
    Closed(String),
}

#[derive(Default)]
struct State {
    subs: HashMap<String, mpsc::UnboundedSender<WsEvent>>,
    /// The prompt ComfyUI is executing (ComfyUI runs one at a time).
    current: Option<String>,
    /// The open connection's reader, if any.
    reader: Option<tokio::task::JoinHandle<()>>,
    /// Counts connections, so a stale reader's end does not close a newer one.
    generation: u64,
}

pub(crate) struct SharedSocket {
    client_id: String,
    state: Arc<Mutex<State>>,
    /// One connection attempt at a time.
    connecting: tokio::sync::Mutex<()>,
}

impl Drop for SharedSocket {
    fn drop(&mut self) {
        if let Some(reader) = lock(&self.state).reader.take() {
            reader.abort();
        }
    }
}

/// A job's share of the socket; dropping it stops the routing to it.
pub(crate) struct Subscription {
    pub(crate) rx: mpsc::UnboundedReceiver<WsEvent>,
    id: String,
    state: Arc<Mutex<State>>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        lock(&self.state).subs.remove(&self.id);
    }
}

impl SharedSocket {
    pub(crate) fn new() -> Self {
        SharedSocket {
            client_id: format!("comfyume-{}", uuid::Uuid::new_v4().simple()),
            state: Arc::default(),
            connecting: tokio::sync::Mutex::new(()),
        }
    }

    /// The client id every prompt of ours is submitted with.
    pub(crate) fn client_id(&self) -> &str {
        &self.client_id
    }

    /// Routes the prompt's messages to the returned subscription from now on.
    pub(crate) fn subscribe(&self, prompt_id: &str) -> Subscription {
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.state).subs.insert(prompt_id.to_string(), tx);
        Subscription {
            rx,
            id: prompt_id.to_string(),
            state: self.state.clone(),
        }
    }

    fn is_connected(&self) -> bool {
        lock(&self.state)
            .reader
            .as_ref()
            .is_some_and(|r| !r.is_finished())
    }

    /// Opens the connection unless it is open (bounded by the request timeout).
    pub(crate) async fn ensure_connected(&self, b: &ComfyUiBackend) -> Result<(), BackendError> {
        if self.is_connected() {
            return Ok(());
        }
        let _one = self.connecting.lock().await;
        if self.is_connected() {
            return Ok(());
        }
        let what = "WebSocket /ws";
        let limit = b.timeouts.request;
        let url = b.ws_url(&self.client_id);
        let (mut ws, _) = within(limit, what, "no answer", async {
            tokio_tungstenite::connect_async(url)
                .await
                .map_err(|e| ws_error(what, e))
        })
        .await
        .map_err(|e| b.failed(what, e))?;
        // Only a client's first message counts.
        let flags = ws_message("feature_flags", json!({"supports_preview_metadata": true}));
        within(limit, what, "could not send feature flags", async {
            ws.send(tungstenite::Message::text(flags.to_string()))
                .await
                .map_err(|e| ws_error(what, e))
        })
        .await?;
        // ComfyUI registers a socket only after it answered the upgrade, and what it sends
        // meanwhile to our client id is lost: a prompt submitted in that gap (it widens under
        // load) would lose its `execution_start`. The `status` greeting comes once the socket
        // is registered, so the connection counts as open from then on.
        within(limit, what, "no `status` greeting", async {
            loop {
                match ws.next().await {
                    Some(Ok(tungstenite::Message::Text(t))) => {
                        let greeting = is_greeting(&t);
                        route_text(&self.state, &t);
                        if greeting {
                            return Ok(());
                        }
                    }
                    Some(Ok(tungstenite::Message::Binary(b))) => route_binary(&self.state, b),
                    Some(Ok(tungstenite::Message::Close(_))) | None => {
                        return Err(BackendError::Unreachable(format!(
                            "{what}: closed before its greeting"
                        )));
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(ws_error(what, e)),
                }
            }
        })
        .await
        .map_err(|e| b.failed(what, e))?;
        let mut st = lock(&self.state);
        st.generation += 1;
        let generation = st.generation;
        if generation > 1 {
            metrics::counter!(BACKEND_WS_RECONNECTS, "backend" => b.name.clone()).increment(1);
        }
        let state = self.state.clone();
        // Read without pause: ComfyUI's publish loop waits on slow sockets,
        // which would stall every client of that server.
        st.reader = Some(tokio::spawn(async move {
            let why = loop {
                match ws.next().await {
                    Some(Ok(tungstenite::Message::Text(t))) => route_text(&state, &t),
                    Some(Ok(tungstenite::Message::Binary(b))) => route_binary(&state, b),
                    Some(Ok(tungstenite::Message::Close(_))) => {
                        break "closed by the server".into();
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => break e.to_string(),
                    None => break "connection ended".to_string(),
                }
            };
            let mut st = lock(&state);
            if st.generation == generation {
                st.reader = None;
                st.current = None;
            }
            for tx in st.subs.values() {
                let _ = tx.send(WsEvent::Closed(why.clone()));
            }
        }));
        Ok(())
    }
}

/// `step` within `limit`; running out of time is a [`BackendError::Timeout`] that reads
/// "`what`: `late` within N ms".
async fn within<T>(
    limit: std::time::Duration,
    what: &str,
    late: &str,
    step: impl std::future::Future<Output = Result<T, BackendError>>,
) -> Result<T, BackendError> {
    tokio::time::timeout(limit, step).await.unwrap_or_else(|_| {
        Err(BackendError::Timeout(format!(
            "{what}: {late} within {} ms",
            limit.as_millis()
        )))
    })
}

/// ComfyUI's first message on a new socket: `status`, with the socket's id.
fn is_greeting(text: &str) -> bool {
    serde_json::from_str::<Value>(text).is_ok_and(|m| {
        m.get("type").and_then(Value::as_str) == Some("status")
            && m.pointer("/data/sid").is_some_and(Value::is_string)
    })
}

fn route_text(state: &Mutex<State>, text: &str) {
    let Ok(msg) = serde_json::from_str::<Value>(text) else {
        return;
    };
    let Some(id) = msg.pointer("/data/prompt_id").and_then(Value::as_str) else {
        // The server's own queue state and greetings: not any job's.
        return;
    };
    let mut st = lock(state);
    match msg.get("type").and_then(Value::as_str) {
        Some("execution_start") => st.current = Some(id.to_string()),
        Some("executing")
            if msg.pointer("/data/node").is_some_and(Value::is_null)
                && st.current.as_deref() == Some(id) =>
        {
            st.current = None;
        }
        _ => {}
    }
    if let Some(tx) = st.subs.get(id) {
        let _ = tx.send(WsEvent::Json(msg));
    }
}

fn route_binary(state: &Mutex<State>, frame: Bytes) {
    let named = match BinaryFrame::decode(&frame) {
        Ok(BinaryFrame::PreviewImageWithMetadata { metadata, .. }) => metadata
            .get("prompt_id")
            .and_then(Value::as_str)
            .map(str::to_owned),
        _ => None,
    };
    let st = lock(state);
    if let Some(tx) = named
        .as_deref()
        .or(st.current.as_deref())
        .and_then(|id| st.subs.get(id))
    {
        let _ = tx.send(WsEvent::Binary(frame));
    }
}
