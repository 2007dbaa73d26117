//! `/ws?clientId=`: status on connect, feature-flag negotiation, then whatever the worker sends.

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use comfyume_wire::shapes::{
    client_feature_flags, feature_flags, status_message, to_python_json, wants_preview_metadata,
    ws_message,
};

use crate::state::{Outbound, Shared, WsClient, lock};

/// ComfyUI's `feature_flags.get_server_features()` (the `data` of wire's `feature_flags`).
pub fn server_features(max_upload_size: u64) -> Value {
    feature_flags(max_upload_size)["data"].take()
}

fn frame_of(msg: Outbound) -> Message {
    match msg {
        Outbound::Text(t) => Message::Text(t.into()),
        Outbound::Binary(b) => Message::Binary(b.into()),
    }
}

pub async fn handler(
    ws: WebSocketUpgrade,
    Query(q): Query<HashMap<String, String>>,
    State(shared): State<Arc<Shared>>,
) -> Response {
    let sid = q
        .get("clientId")
        .filter(|s| !s.is_empty())
        .cloned()
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    ws.on_upgrade(move |socket| run(shared, socket, sid))
}

async fn run(shared: Arc<Shared>, socket: WebSocket, sid: String) {
    let delay = shared.faults.borrow().slow_ws_register_ms;
    if delay > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
    }
    let conn = shared.next_conn.fetch_add(1, Ordering::SeqCst);
    let (tx, mut rx) = mpsc::unbounded_channel::<Outbound>();
    let kill = CancellationToken::new();
    {
        // Register and queue the greeting under the queue lock, so no status update can slip
        // in between with an older number.
        let inner = lock(&shared.inner);
        let mut hub = lock(&shared.hub);
        // An existing socket with the same id is replaced.
        if let Some(old) = hub.insert(
            sid.clone(),
            WsClient {
                conn,
                tx: tx.clone(),
                preview_metadata: false,
                kill: kill.clone(),
            },
        ) {
            old.kill.cancel();
        }
        let status = status_message(inner.queue_remaining() as u64, Some(&sid));
        let _ = tx.send(Outbound::Text(to_python_json(&status)));
        // On reconnect, the executing client learns which node runs.
        if inner.exec_client.as_deref() == Some(sid.as_str())
            && let Some(node) = &inner.last_node
        {
            let executing = ws_message("executing", json!({"node": node}));
            let _ = tx.send(Outbound::Text(to_python_json(&executing)));
        }
    }
    tracing::debug!(%sid, conn, "websocket connected");

    let (mut sink, mut stream) = socket.split();
    let writer_kill = kill.clone();
    let shutdown = shared.shutdown.clone();
    let mut writer = tokio::spawn(async move {
        loop {
            tokio::select! {
                biased;
                _ = writer_kill.cancelled() => {
                    // What was already queued was on its way before the cut; deliver it, then
                    // drop the connection without a close frame.
                    while let Ok(msg) = rx.try_recv() {
                        if sink.send(frame_of(msg)).await.is_err() {
                            break;
                        }
                    }
                    return;
                }
                _ = shutdown.cancelled() => {
                    let _ = sink.send(Message::Close(None)).await;
                    return;
                }
                msg = rx.recv() => {
                    let Some(msg) = msg else { return };
                    if sink.send(frame_of(msg)).await.is_err() {
                        return;
                    }
                }
            }
        }
    });

    let mut first_message = true;
    let mut writer_done = false;
    loop {
        tokio::select! {
            _ = kill.cancelled() => break,
            _ = &mut writer => {
                writer_done = true;
                break;
            }
            msg = stream.next() => {
                let Some(Ok(msg)) = msg else { break };
                match msg {
                    Message::Text(text) => {
                        // Only a client's first text message can carry feature flags; a message
                        // that is not JSON does not count as the first one.
                        let Ok(data) = serde_json::from_str::<Value>(text.as_str()) else {
                            continue;
                        };
                        if first_message && data.get("type").and_then(Value::as_str) == Some("feature_flags") {
                            let supports = client_feature_flags(text.as_str())
                                .is_some_and(|flags| wants_preview_metadata(&flags));
                            if let Some(c) = lock(&shared.hub).get_mut(&sid).filter(|c| c.conn == conn) {
                                c.preview_metadata = supports;
                            }
                            let reply = feature_flags(shared.max_upload_size);
                            let _ = tx.send(Outbound::Text(to_python_json(&reply)));
                        }
                        first_message = false;
                    }
                    Message::Close(_) => break,
                    _ => {}
                }
            }
        }
    }
    if kill.is_cancelled() && !writer_done {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), &mut writer).await;
    }
    // Dropping both halves without a close frame is what "drop" means for the faults.
    writer.abort();
    let mut hub = lock(&shared.hub);
    if hub.get(&sid).is_some_and(|c| c.conn == conn) {
        hub.remove(&sid);
    }
    tracing::debug!(%sid, conn, "websocket closed");
}
