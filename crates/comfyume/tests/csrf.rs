//! Another website open in the participant's browser cannot act as them:
//! browsers resend cached Basic credentials cross-site, so state-changing
//! requests and WebSocket upgrades from a foreign Origin are refused.

use crate::helpers;

use base64::Engine;
use helpers::*;
use reqwest::Method;

fn basic(user: &str) -> String {
    let cred = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{PASSWORD}"));
    format!("Basic {cred}")
}

#[tokio::test]
async fn a_foreign_origin_cannot_change_settings_or_queue_jobs() {
    let app = spawn_app().await;
    let evil = app
        .request(Method::POST, "/api/settings/Comfy.Evil")
        .basic_auth("user001", Some(PASSWORD))
        .header("Origin", "http://evil.example")
        .body("true");
    let r = TestApp::send(evil).await;
    assert_eq!(r.status, 403);
    assert!(r.body.is_empty());
    assert_eq!(
        app.get("user001", "/api/settings/Comfy.Evil").await.text(),
        "null"
    );

    let evil = app
        .request(Method::POST, "/api/prompt")
        .basic_auth("user001", Some(PASSWORD))
        .header("Origin", "null")
        .body("{}");
    assert_eq!(TestApp::send(evil).await.status, 403);

    // The frontend itself sends its own origin: allowed.
    let own = app
        .request(Method::POST, "/api/settings/Comfy.Mine")
        .basic_auth("user001", Some(PASSWORD))
        .header("Origin", app.base.as_str())
        .body("1");
    assert_eq!(TestApp::send(own).await.status, 200);
    // Scripts send no Origin: allowed.
    assert_eq!(
        app.post("user001", "/api/settings/Comfy.Script", "2")
            .await
            .status,
        200
    );
    // Reads are not refused (they reveal nothing cross-site under CORS).
    let r = app
        .get_with(
            "user001",
            "/api/settings",
            &[("Origin", "http://evil.example")],
        )
        .await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn a_foreign_origin_cannot_open_the_participants_websocket() {
    let app = spawn_app().await;
    let auth = basic("user001");
    let refused = app
        .ws_with(
            "/ws?clientId=x",
            &[("authorization", &auth), ("origin", "http://evil.example")],
        )
        .await;
    assert!(refused.is_err(), "cross-site WebSocket upgrade refused");
    let own = format!("http://{}", app.addr);
    let ok = app
        .ws_with(
            "/ws?clientId=x",
            &[("authorization", &auth), ("origin", &own)],
        )
        .await;
    assert!(ok.is_ok());
}

#[tokio::test]
async fn one_participant_mistyping_does_not_lock_out_the_room() {
    let app = spawn_app_with(|s| {
        s.login_max_failures = 3;
        // Long enough that the next attempt surely falls inside the first delay.
        s.login_delay = std::time::Duration::from_secs(60);
    })
    .await;
    for _ in 0..3 {
        let r = app.login_form("user001", "wrong", "").await;
        assert_eq!(r.status, 401);
    }
    // user001's account is now throttled…
    assert_eq!(app.login_form("user001", PASSWORD, "").await.status, 429);
    // …but the rest of the room, behind the same address, still signs in.
    let r = app.login_form("user002", PASSWORD, "").await;
    assert_eq!(r.status, 303, "{}", r.text());
}
