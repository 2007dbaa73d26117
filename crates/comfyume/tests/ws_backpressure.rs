//! A tab that stops reading (a laptop asleep, a frozen browser) while its job streams
//! previews: the server drops previews and progress for it, never the job's end; and when
//! even the end cannot be queued, it closes the socket so the frontend reconnects and
//! re-syncs, instead of the tab spinning for ever.
//!
//! Events are put in through the hub, the sink the dispatcher relays every job event to.

use crate::helpers;

use std::time::Duration;

use axum::body::Bytes;
use futures_util::StreamExt;
use helpers::*;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

const U: &str = "user001";
const END: &str =
    r#"{"type":"executing","data":{"node":null,"display_node":null,"prompt_id":"job-1"}}"#;
const SUCCESS: &str = r#"{"type":"execution_success","data":{"prompt_id":"job-1","timestamp":1}}"#;

/// A tab whose greeting was read, and which then stops reading.
async fn stalled_tab(app: &TestApp, client_id: &str) -> Ws {
    let mut ws = app.ws(U, &format!("/ws?clientId={client_id}")).await;
    let hello = next_json(&mut ws).await;
    assert_eq!(hello["type"], "status");
    ws
}

/// Streams previews, with progress in between, until the connection to the stalled tab is
/// full and the server's writer for it waits; then sends far more than its buffer holds, at
/// once (as a fast sampler does).
async fn flood_previews(app: &TestApp, client_id: &str) -> usize {
    let frame = Bytes::from(vec![7u8; 16 * 1024]);
    let progress = |i: usize| {
        format!(
            r#"{{"type":"progress","data":{{"value":{i},"max":9999,"prompt_id":"job-1","node":"2"}}}}"#
        )
    };
    let mut sent = 0;
    // 32 MB: more than the kernel buffers of a loopback connection whose reader sleeps.
    for i in 0..2_000 {
        app.state
            .hub
            .send_preview(U, client_id, frame.clone(), frame.clone());
        sent += 1;
        if i % 16 == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..3_000 {
        app.state
            .hub
            .send_preview(U, client_id, frame.clone(), frame.clone());
        app.state.hub.send_client(U, client_id, &progress(i));
        sent += 1;
    }
    sent
}

/// Everything the tab receives once it reads again, until the socket ends or `stop` holds.
async fn read_back(ws: &mut Ws, stop: impl Fn(&Message) -> bool) -> (Vec<Message>, bool) {
    let mut got = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Err(_) => panic!(
                "nothing for 10 s and the socket still open (after {} messages)",
                got.len()
            ),
            Ok(None) | Ok(Some(Err(_))) => return (got, true),
            Ok(Some(Ok(m))) => {
                let done = stop(&m);
                let closed = matches!(m, Message::Close(_));
                got.push(m);
                if done || closed {
                    return (got, closed);
                }
            }
        }
    }
}

#[tokio::test]
async fn a_tab_that_stops_reading_loses_previews_but_still_gets_the_end_of_its_job() {
    let app = spawn_app().await;
    let mut ws = stalled_tab(&app, "sleepy").await;
    let sent = flood_previews(&app, "sleepy").await;
    app.state.hub.send_client(U, "sleepy", SUCCESS);
    app.state.hub.send_client(U, "sleepy", END);

    let (got, closed) = read_back(
        &mut ws,
        |m| matches!(m, Message::Text(t) if t.as_str() == END),
    )
    .await;
    assert!(
        !closed,
        "the socket stays open: nothing that matters was lost"
    );
    let texts: Vec<&str> = got
        .iter()
        .filter_map(|m| match m {
            Message::Text(t) => Some(t.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(texts.last(), Some(&END), "the end marker comes last");
    assert_eq!(
        texts[texts.len() - 2],
        SUCCESS,
        "right after the job's success"
    );
    let previews = got
        .iter()
        .filter(|m| matches!(m, Message::Binary(_)))
        .count();
    assert!(
        previews < sent,
        "previews were dropped for the stalled tab ({previews} of {sent} arrived)"
    );
}

#[tokio::test]
async fn a_tab_too_far_behind_for_even_the_end_is_closed_so_it_reconnects() {
    let app = spawn_app().await;
    let mut ws = stalled_tab(&app, "frozen").await;
    flood_previews(&app, "frozen").await;
    // Messages that are never dropped, until not even they fit.
    for n in 0..2_000 {
        app.state.hub.send_user(
            U,
            &format!(r#"{{"type":"status","data":{{"status":{{"exec_info":{{"queue_remaining":{n}}}}}}}}}"#),
        );
    }
    app.state.hub.send_client(U, "frozen", END);

    let (got, closed) = read_back(&mut ws, |_| false).await;
    assert!(closed, "the server closed the socket");
    assert!(
        !got.iter()
            .any(|m| matches!(m, Message::Text(t) if t.as_str() == END)),
        "the end could not be delivered in order, so the socket had to go"
    );
    if let Some(Message::Close(Some(frame))) = got.last() {
        assert_eq!(frame.code, CloseCode::Again, "{frame:?}");
    }
    // The frontend reconnects with the same client id and re-syncs from `status`.
    let mut again = app.ws(U, "/ws?clientId=frozen").await;
    let hello = next_json(&mut again).await;
    assert_eq!(hello["type"], "status");
    assert_eq!(hello["data"]["sid"], "frozen");
}
