//! `/ws`: the participant's WebSocket, as ComfyUI speaks it: a `status` message
//! with the session id on connect, the `feature_flags` exchange when it is the
//! client's first text message, then whatever the hub sends.

use std::sync::atomic::Ordering;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::json;

use crate::auth::Participant;
use crate::hub::Outbound;
use crate::state::AppState;

#[derive(Deserialize)]
pub struct WsQuery {
    #[serde(rename = "clientId")]
    client_id: Option<String>,
}

pub async fn ws_handler(
    State(state): State<AppState>,
    who: Participant,
    Query(q): Query<WsQuery>,
    upgrade: WebSocketUpgrade,
) -> Response {
    let client_id = q
        .client_id
        .filter(|c| !c.is_empty() && c.len() <= 128)
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    upgrade
        .max_message_size(1024 * 1024)
        .on_upgrade(move |socket| serve_socket(state, who.name, client_id, socket))
}

pub fn status_message(queue_remaining: u64, sid: Option<&str>) -> String {
    let mut data = json!({"status": {"exec_info": {"queue_remaining": queue_remaining}}});
    if let Some(sid) = sid {
        data["sid"] = json!(sid);
    }
    json!({"type": "status", "data": data}).to_string()
}

pub fn feature_flags(state: &AppState) -> serde_json::Value {
    json!({
        "supports_preview_metadata": true,
        "max_upload_size": state.settings.max_upload_bytes,
        "extension": {"manager": {"supports_v4": true}}
    })
}

async fn serve_socket(state: AppState, user: String, client_id: String, socket: WebSocket) {
    let (conn, mut rx) = state.hub.register(&user, &client_id);
    let (mut sink, mut stream) = socket.split();
    let remaining = state.queue_remaining(&user).await;
    let hello = status_message(remaining, Some(&client_id));
    if sink.send(Message::Text(hello.into())).await.is_err() {
        state.hub.unregister(&user, conn.conn_id);
        return;
    }
    let mut first_text = true;
    loop {
        tokio::select! {
            out = rx.recv() => match out {
                Some(Outbound::Text(t)) => {
                    if sink.send(Message::Text(t.as_ref().into())).await.is_err() { break; }
                }
                Some(Outbound::Binary(b)) => {
                    if sink.send(Message::Binary(b)).await.is_err() { break; }
                }
                Some(Outbound::Close) | None => {
                    let _ = sink.send(Message::Close(None)).await;
                    break;
                }
            },
            incoming = stream.next() => match incoming {
                Some(Ok(Message::Text(t))) => {
                    // Feature flags count only as the client's first text message.
                    if std::mem::take(&mut first_text)
                        && let Ok(v) = serde_json::from_str::<serde_json::Value>(&t)
                        && v.get("type").and_then(|t| t.as_str()) == Some("feature_flags")
                    {
                        let wants_meta = v["data"]["supports_preview_metadata"].as_bool() == Some(true);
                        conn.preview_metadata.store(wants_meta, Ordering::Relaxed);
                        let reply = json!({"type": "feature_flags", "data": feature_flags(&state)}).to_string();
                        if sink.send(Message::Text(reply.into())).await.is_err() { break; }
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
        }
    }
    state.hub.unregister(&user, conn.conn_id);
}
