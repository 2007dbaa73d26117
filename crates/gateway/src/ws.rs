//! `/ws`: the participant's WebSocket, as ComfyUI speaks it: a `status` message
//! with the session id on connect, the `feature_flags` exchange when it is the
//! client's first text message, then whatever the hub sends.
//!
//! The server also pings; a client that answers nothing for the idle timeout, or that stops
//! reading so long that a write waits that long, is closed. The hub closes a socket when its
//! session signs out, its account changes, or it fell too far behind.

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::json;
use tokio::time::Instant;

use crate::auth::Participant;
use crate::hub::{CloseReason, Outbound, Registration, SocketPermit};
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
    // Counted before the upgrade is answered, so the cap holds however many arrive at once.
    let permit = match state
        .hub
        .reserve(&who.name, &client_id, state.settings.max_sockets_per_user)
    {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(user = %who.name, max = e.max, "WebSocket refused: too many open");
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [
                    (header::RETRY_AFTER, "10"),
                    (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
                ],
                format!(
                    "Too many open connections for {}: at most {} at once. Close other tabs of this workspace and reload.",
                    who.name, e.max
                ),
            )
                .into_response();
        }
    };
    let reg = Registration {
        user: who.name.clone(),
        account: who.caller.name.clone(),
        session: who.session,
        client_id,
    };
    // The socket's log lines keep the upgrade request's id and participant (the socket
    // runs in a task of its own, outside the request's span).
    let span = tracing::Span::current();
    upgrade
        .max_message_size(1024 * 1024)
        .on_upgrade(move |socket| {
            tracing::Instrument::instrument(serve_socket(state, reg, permit, socket), span)
        })
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

/// How often the server pings: a quarter of the idle timeout, so a live client answers
/// several times before it could be taken for gone.
fn ping_every(idle: Duration) -> Duration {
    (idle / 4).max(Duration::from_millis(250))
}

/// How a socket's life ended.
enum End {
    /// The server closes it, telling the client why.
    Close(CloseReason),
    /// The client left, or the connection broke.
    Gone,
}

async fn serve_socket(state: AppState, reg: Registration, permit: SocketPermit, socket: WebSocket) {
    let user = reg.user.clone();
    let (conn, mut rx) = state.hub.register(reg.clone());
    let idle = state.settings.idle_timeout;
    let (mut sink, mut stream) = socket.split();
    let remaining = state.queue_remaining(&user).await;
    let hello = status_message(remaining, Some(&reg.client_id));
    let mut end = End::Gone;
    // Every write waits at most the idle timeout, and not at all once the hub closes it: a
    // client that stops reading never holds this task.
    macro_rules! send {
        ($label:lifetime, $msg:expr) => {
            tokio::select! {
                biased;
                reason = conn.closing() => { end = End::Close(reason); break $label; }
                r = tokio::time::timeout(idle, sink.send($msg)) => match r {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => break $label,
                    Err(_) => { end = End::Close(CloseReason::Idle); break $label; }
                },
            }
        };
    }
    let mut ping = tokio::time::interval_at(Instant::now() + ping_every(idle), ping_every(idle));
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heard = Instant::now();
    let mut first_text = true;
    'socket: {
        send!('socket, Message::Text(hello.into()));
        // A tab that connects while the participant's job runs (a reload, a second tab)
        // gets that job's latest step at once, as a tab that was open all along has it.
        for msg in state.queue.catch_up(&user, &reg.client_id) {
            send!('socket, Message::Text(msg.into()));
        }
        loop {
            // The client's frames (pongs, a close) before ours: a busy job never starves them.
            tokio::select! {
                biased;
                reason = conn.closing() => { end = End::Close(reason); break 'socket; }
                incoming = stream.next() => {
                    heard = Instant::now();
                    match incoming {
                        Some(Ok(Message::Text(t))) => {
                            // Feature flags count only as the client's first text message.
                            if std::mem::take(&mut first_text)
                                && let Ok(v) = serde_json::from_str::<serde_json::Value>(&t)
                                && v.get("type").and_then(|t| t.as_str()) == Some("feature_flags")
                            {
                                let wants_meta = v["data"]["supports_preview_metadata"].as_bool() == Some(true);
                                conn.preview_metadata.store(wants_meta, Ordering::Relaxed);
                                let reply = json!({"type": "feature_flags", "data": feature_flags(&state)}).to_string();
                                send!('socket, Message::Text(reply.into()));
                            }
                        }
                        Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break 'socket,
                        Some(Ok(_)) => {}
                    }
                }
                out = rx.recv() => match out {
                    Some(Outbound::Text(t)) => send!('socket, Message::Text(t.as_ref().into())),
                    Some(Outbound::Binary(b)) => send!('socket, Message::Binary(b)),
                    None => break 'socket,
                },
                _ = ping.tick() => {
                    if heard.elapsed() >= idle {
                        end = End::Close(CloseReason::Idle);
                        break 'socket;
                    }
                    send!('socket, Message::Ping(Default::default()));
                }
            }
        }
    }
    // Unregistered first, so nothing more is queued for a socket on its way out.
    state.hub.unregister(&user, conn.conn_id);
    if let End::Close(reason) = end {
        let (code, text) = reason.frame();
        tracing::debug!(user = %user, code, reason = text, "closing a WebSocket");
        // Best effort, bounded: a client that does not read gets the TCP close instead.
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            // What was queued before the close (e.g. why the account's sessions end) still
            // goes out, unless the client is the reason: it stopped reading or answering.
            if !matches!(reason, CloseReason::Overflow | CloseReason::Idle) {
                while let Ok(out) = rx.try_recv() {
                    let msg = match out {
                        Outbound::Text(t) => Message::Text(t.as_ref().into()),
                        Outbound::Binary(b) => Message::Binary(b),
                    };
                    if sink.send(msg).await.is_err() {
                        return;
                    }
                }
            }
            let frame = Message::Close(Some(CloseFrame {
                code,
                reason: text.into(),
            }));
            let _ = sink.send(frame).await;
        })
        .await;
    }
    drop(permit);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pings_come_several_times_per_idle_timeout() {
        assert_eq!(
            ping_every(Duration::from_secs(120)),
            Duration::from_secs(30)
        );
        assert_eq!(
            ping_every(Duration::from_millis(100)),
            Duration::from_millis(250)
        );
    }
}
