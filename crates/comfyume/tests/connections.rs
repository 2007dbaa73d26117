//! Slow, silent and piled-up connections are bounded: half-sent requests and silent sockets
//! are closed after the header timeout, a WebSocket whose client answers no ping after the
//! idle timeout, and one participant cannot open more than `MAX_SOCKETS_PER_USER`
//! WebSockets (a clear 429 before the upgrade). The production values are tested in virtual
//! time in `comfyume_gateway::server`; here the whole server runs with short ones.

use crate::helpers;

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use helpers::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite;

fn basic(user: &str) -> String {
    use base64::Engine;
    let cred = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{PASSWORD}"));
    format!("Basic {cred}")
}

/// Waits until the server closes `s` (EOF or reset), failing after `secs`.
async fn closed_within(s: &mut TcpStream, secs: u64) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(secs), s.read(&mut buf)).await {
            Err(_) => panic!("the connection is still open after {secs} s"),
            Ok(Ok(0)) | Ok(Err(_)) => return start.elapsed(),
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn half_sent_requests_and_silent_sockets_are_closed() {
    let app = spawn_app_with(|s| {
        s.header_read_timeout = Duration::from_secs(1);
        s.idle_timeout = Duration::from_secs(2);
    })
    .await;
    // 40 half-sent requests (a slowloris) and 10 sockets that say nothing.
    let mut held = Vec::new();
    for i in 0..50 {
        let mut s = TcpStream::connect(app.addr).await.unwrap();
        if i < 40 {
            s.write_all(b"GET /api/settings HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                .await
                .unwrap();
        }
        held.push(s);
    }
    for s in &mut held {
        closed_within(s, 10).await;
    }
    // A body that stops coming is cut off at the idle timeout.
    let mut s = TcpStream::connect(app.addr).await.unwrap();
    s.write_all(b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\nusername=")
        .await
        .unwrap();
    closed_within(&mut s, 10).await;
    // The server is still there for everyone else.
    assert_eq!(app.get("user001", "/api/settings").await.status, 200);
}

#[tokio::test]
async fn a_participant_can_open_only_so_many_websockets() {
    let app = spawn_app_with(|s| s.max_sockets_per_user = 3).await;
    let auth = basic("user001");
    let mut open = Vec::new();
    for i in 0..3 {
        let mut ws = app
            .ws_with(&format!("/ws?clientId=tab{i}"), &[("authorization", &auth)])
            .await
            .unwrap();
        next_json(&mut ws).await;
        open.push(ws);
    }
    match app
        .ws_with("/ws?clientId=tab3", &[("authorization", &auth)])
        .await
    {
        Err(tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 429);
            let body =
                String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default()).into_owned();
            assert!(body.contains("at most 3"), "{body}");
        }
        other => panic!(
            "expected 429 before the upgrade, got {:?}",
            other.map(|_| "a socket")
        ),
    }
    // The same tab reconnecting (same client id) replaces its socket: never refused.
    let mut again = app
        .ws_with("/ws?clientId=tab0", &[("authorization", &auth)])
        .await
        .expect("a reconnect of an open tab");
    next_json(&mut again).await;
    // Another participant has their own allowance.
    let mut theirs = app
        .ws_with("/ws?clientId=t", &[("authorization", &basic("user002"))])
        .await
        .unwrap();
    next_json(&mut theirs).await;
    // A tab closes: its place is free again.
    let mut closing = open.pop().unwrap();
    closing.close(None).await.unwrap();
    while let Some(Ok(_)) = closing.next().await {}
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match app
            .ws_with("/ws?clientId=tab9", &[("authorization", &auth)])
            .await
        {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < deadline, "still refused: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_websocket_that_answers_no_ping_is_closed_and_a_live_one_is_not() {
    let app = spawn_app_with(|s| s.idle_timeout = Duration::from_secs(2)).await;
    // A client that upgrades and then never reads or answers (a dead laptop).
    let mut dead = TcpStream::connect(app.addr).await.unwrap();
    let upgrade = format!(
        "GET /ws?clientId=dead HTTP/1.1\r\nHost: {}\r\nAuthorization: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        app.addr,
        basic("user001")
    );
    dead.write_all(upgrade.as_bytes()).await.unwrap();
    let mut head = [0u8; 12];
    dead.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 101");
    // A live tab: tungstenite answers the server's pings while it reads, which it does
    // all along, for two idle timeouts.
    let mut live = app.ws("user001", "/ws?clientId=live").await;
    next_json(&mut live).await;
    let reader = tokio::spawn(async move {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(4) {
            match tokio::time::timeout(Duration::from_millis(100), live.next()).await {
                Err(_) => {}
                Ok(Some(Ok(tungstenite::Message::Close(f)))) => {
                    panic!("live socket closed: {f:?}")
                }
                Ok(Some(Ok(_))) => {}
                Ok(other) => panic!("live socket ended: {other:?}"),
            }
        }
        live
    });
    closed_within(&mut dead, 10).await;
    let _live = reader.await.expect("the live tab stayed open");
    assert_eq!(app.state.hub.open_sockets(), 1, "only the live tab is left");
}
