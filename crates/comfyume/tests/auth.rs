//! Signing in: Basic Auth for scripts and the predecessor's habits, a login
//! form and session cookie for browsers, rate limits on guessing, and the
//! participant scope of `/userNNN/`.

use crate::helpers;

use helpers::{ADMIN, PASSWORD, TestApp, next_json, spawn_app, spawn_app_with};
use reqwest::Method;
use serde_json::json;
use tokio_tungstenite::tungstenite;

const U: &str = "user001";

fn set_cookie(r: &helpers::Resp) -> Option<String> {
    r.headers
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|c| c.starts_with("comfyume_session="))
        .map(str::to_string)
}

/// `name=value` of a Set-Cookie header.
fn pair(set_cookie: &str) -> String {
    set_cookie.split(';').next().unwrap().to_string()
}

fn ws_refused_with(r: Result<helpers::Ws, tungstenite::Error>, status: u16) {
    match r {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status().as_u16(), status),
        Err(e) => panic!("expected an HTTP {status} refusal, got {e}"),
        Ok(_) => panic!("the WebSocket upgrade was accepted; expected {status}"),
    }
}

fn basic(user: &str, password: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

#[tokio::test]
async fn the_api_without_credentials_is_a_401_basic_challenge() {
    let app = spawn_app().await;
    for (method, path) in [
        (Method::GET, "/api/settings"),
        (Method::GET, "/settings"),
        (Method::GET, "/user001/api/settings"),
        (Method::POST, "/api/settings/Comfy.X"),
        (Method::GET, "/api/object_info"),
        (Method::GET, "/api/view?filename=x.png"),
        (Method::POST, "/api/upload/image"),
        (Method::GET, "/internal/files/input"),
        (Method::GET, "/api/userdata?dir=workflows"),
        (Method::GET, "/"),
    ] {
        let r = TestApp::send(app.request(method.clone(), path)).await;
        assert_eq!(r.status, 401, "{method} {path}");
        let challenge = r.header("www-authenticate").unwrap_or_default();
        assert!(challenge.starts_with("Basic realm="), "{path}: {challenge}");
        assert_eq!(r.text(), "401: Unauthorized", "{path}");
        assert!(set_cookie(&r).is_none());
    }
    let r = TestApp::send(
        app.request(Method::GET, "/api/settings")
            .basic_auth(U, Some("wrong")),
    )
    .await;
    assert_eq!(r.status, 401, "a wrong password");
    ws_refused_with(app.ws_with("/ws?clientId=x", &[]).await, 401);
    ws_refused_with(
        app.ws_with("/ws", &[("authorization", &basic(U, "wrong"))])
            .await,
        401,
    );
    // The login page and the frontend's static files need no credentials.
    assert_eq!(app.anon_get("/login", &[]).await.status, 200);
    assert_eq!(app.anon_get("/assets/index-abc.js", &[]).await.status, 200);
}

#[tokio::test]
async fn a_browser_without_a_session_is_sent_to_the_login_page() {
    let app = spawn_app().await;
    let html = [("accept", "text/html,application/xhtml+xml,*/*;q=0.8")];
    for (path, next) in [
        ("/user001/", "%2Fuser001%2F"),
        ("/", "%2F"),
        ("/user001/api/settings", "%2Fuser001%2Fapi%2Fsettings"),
    ] {
        let r = app.anon_get(path, &html).await;
        assert!(
            matches!(r.status.as_u16(), 302 | 303),
            "{path}: {}",
            r.status
        );
        assert_eq!(
            r.header("location"),
            Some(format!("/login?next={next}")),
            "{path}"
        );
    }
    let page = app.anon_get("/login?next=%2Fuser001%2F", &html).await;
    assert_eq!(page.status, 200);
    let body = page.text();
    assert!(body.contains("name=\"username\"") && body.contains("type=\"password\""));
    assert!(body.contains("name=\"next\" value=\"/user001/\""), "{body}");
    assert_eq!(page.header("cache-control").as_deref(), Some("no-store"));
}

#[tokio::test]
async fn the_login_form_sets_a_strict_httponly_cookie_for_the_api_and_websocket() {
    let app = spawn_app().await;
    let r = app.login_form(U, PASSWORD, "/user001/").await;
    assert!(matches!(r.status.as_u16(), 302 | 303), "{}", r.status);
    assert_eq!(r.header("location").as_deref(), Some("/user001/"));
    let c = set_cookie(&r).expect("a session cookie");
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=604800"] {
        assert!(c.split("; ").any(|a| a == attr), "{attr} missing from {c}");
    }
    assert!(
        !c.contains("Secure"),
        "plain-HTTP test server: no Secure flag"
    );
    let cookie = pair(&c);
    assert!(
        cookie.len() > "comfyume_session=".len() + 20,
        "a long random token: {cookie}"
    );

    // No Basic credentials from here on: the cookie is enough.
    let r = app
        .with_cookie(
            &cookie,
            Method::POST,
            "/user001/api/settings/Comfy.C",
            Some(b"7".to_vec()),
        )
        .await;
    assert_eq!(r.status, 200);
    let r = app
        .with_cookie(&cookie, Method::GET, "/api/settings", None)
        .await;
    assert_eq!((r.status.as_u16(), r.json()), (200, json!({"Comfy.C": 7})));
    let r = app
        .with_cookie(&cookie, Method::GET, "/user001/", None)
        .await;
    assert_eq!(r.status, 200);
    let mut ws = app
        .ws_with("/user001/ws?clientId=c1", &[("cookie", &cookie)])
        .await
        .expect("cookie opens the socket");
    assert_eq!(next_json(&mut ws).await["data"]["sid"], "c1");

    // Without `next`, a participant lands in their own workspace.
    let r = app.login_form(ADMIN, PASSWORD, "").await;
    assert_eq!(r.header("location").as_deref(), Some("/teacher/"));
    // Two sign-ins, two sessions.
    let again = pair(&set_cookie(&app.login_form(U, PASSWORD, "").await).unwrap());
    assert_ne!(again, cookie);
    assert_eq!(
        app.with_cookie(&cookie, Method::GET, "/api/settings", None)
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn a_page_load_with_basic_auth_also_sets_the_cookie() {
    // Browsers do not send Basic credentials on WebSocket upgrades; the cookie does.
    let app = spawn_app().await;
    let r = app
        .get_with(U, "/user001/", &[("accept", "text/html")])
        .await;
    assert_eq!(r.status, 200);
    let c = set_cookie(&r).expect("the page load sets a session cookie");
    assert!(c.contains("HttpOnly") && c.contains("SameSite=Strict"));
    let cookie = pair(&c);
    let mut ws = app
        .ws_with("/ws?clientId=p", &[("cookie", &cookie)])
        .await
        .expect("cookie opens the socket");
    assert_eq!(next_json(&mut ws).await["type"], "status");
    // API calls with Basic do not mint a session each time.
    let r = app.get(U, "/api/settings").await;
    assert_eq!(r.status, 200);
    assert!(set_cookie(&r).is_none());
}

#[tokio::test]
async fn logout_clears_the_cookie_and_the_old_cookie_stops_working() {
    let app = spawn_app().await;
    let cookie = app.login(U, PASSWORD).await.expect("signed in");
    assert_eq!(
        app.with_cookie(&cookie, Method::GET, "/api/settings", None)
            .await
            .status,
        200
    );
    let r = app
        .with_cookie(&cookie, Method::POST, "/logout", None)
        .await;
    assert!(r.status.is_redirection());
    assert_eq!(r.header("location").as_deref(), Some("/login"));
    let cleared = set_cookie(&r).expect("logout sends a clearing cookie");
    assert!(
        cleared.starts_with("comfyume_session=;") && cleared.contains("Max-Age=0"),
        "{cleared}"
    );

    let r = app
        .with_cookie(&cookie, Method::GET, "/api/settings", None)
        .await;
    assert_eq!(r.status, 401, "the old session is gone on the server too");
    ws_refused_with(app.ws_with("/ws", &[("cookie", &cookie)]).await, 401);
    // GET /logout works the same (a link in the banner).
    let cookie = app.login(U, PASSWORD).await.unwrap();
    assert!(
        app.with_cookie(&cookie, Method::GET, "/logout", None)
            .await
            .status
            .is_redirection()
    );
    assert_eq!(
        app.with_cookie(&cookie, Method::GET, "/api/settings", None)
            .await
            .status,
        401
    );
}

#[tokio::test]
async fn a_wrong_password_and_an_unknown_user_get_the_identical_answer() {
    let app = spawn_app().await;
    let wrong = app.login_form(U, "not the password", "").await;
    let unknown = app.login_form("nobody", "not the password", "").await;
    assert_eq!(wrong.status, 401);
    assert_eq!(
        (wrong.status, wrong.text()),
        (unknown.status, unknown.text())
    );
    assert!(wrong.text().contains("Wrong username or password."));
    assert!(set_cookie(&wrong).is_none() && set_cookie(&unknown).is_none());

    let b_wrong = TestApp::send(
        app.request(Method::GET, "/api/settings")
            .basic_auth(U, Some("nope")),
    )
    .await;
    let b_unknown = TestApp::send(
        app.request(Method::GET, "/api/settings")
            .basic_auth("nobody", Some("nope")),
    )
    .await;
    assert_eq!(
        (b_wrong.status, b_wrong.text()),
        (b_unknown.status, b_unknown.text())
    );
    assert_eq!(
        b_wrong.header("www-authenticate"),
        b_unknown.header("www-authenticate")
    );
}

fn retry_after(r: &helpers::Resp) -> u64 {
    r.header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("a numeric Retry-After")
}

#[tokio::test]
async fn repeated_failed_sign_ins_are_slowed_down_with_429() {
    let app = spawn_app_with(|s| {
        s.login_max_failures = 3;
        // Long enough that the next attempt surely falls inside the first delay.
        s.login_delay = std::time::Duration::from_secs(60);
    })
    .await;
    let signed_in = app.login(U, PASSWORD).await.unwrap();
    for _ in 0..3 {
        assert_eq!(app.login_form(U, "guess", "").await.status, 401);
    }
    let r = app.login_form(U, PASSWORD, "").await;
    assert_eq!(
        r.status, 429,
        "even the right password waits once the budget is spent"
    );
    assert!((1..=300).contains(&retry_after(&r)));
    assert!(set_cookie(&r).is_none());
    let r = TestApp::send(
        app.request(Method::GET, "/api/settings")
            .basic_auth(U, Some(PASSWORD)),
    )
    .await;
    assert_eq!(r.status, 429, "Basic Auth shares the budget");
    assert!(retry_after(&r) >= 1);
    // Someone already signed in keeps working.
    assert_eq!(
        app.with_cookie(&signed_in, Method::GET, "/api/settings", None)
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn repeated_failed_basic_auth_is_slowed_down_with_429() {
    let app = spawn_app_with(|s| {
        s.login_max_failures = 2;
        // Long enough that the next attempt surely falls inside the first delay.
        s.login_delay = std::time::Duration::from_secs(60);
    })
    .await;
    for _ in 0..2 {
        let r = TestApp::send(
            app.request(Method::GET, "/api/settings")
                .basic_auth("user002", Some("guess")),
        )
        .await;
        assert_eq!(r.status, 401);
    }
    let r = TestApp::send(
        app.request(Method::GET, "/api/settings")
            .basic_auth("user002", Some(PASSWORD)),
    )
    .await;
    assert_eq!(r.status, 429);
    assert!(retry_after(&r) >= 1);
    let r = app.login_form("user002", PASSWORD, "").await;
    assert_eq!(r.status, 429);
    assert!(retry_after(&r) >= 1);
}

#[tokio::test]
async fn a_disabled_participant_is_refused_at_once() {
    let app = spawn_app().await;
    let cookie = app.login(U, PASSWORD).await.unwrap();
    assert_eq!(
        app.get(U, "/api/settings").await.status,
        200,
        "Basic works before"
    );
    app.store.set_disabled(U, true).await.unwrap();

    assert_eq!(
        app.get(U, "/api/settings").await.status,
        401,
        "Basic, even just after a successful use"
    );
    assert_eq!(
        app.with_cookie(&cookie, Method::GET, "/api/settings", None)
            .await
            .status,
        401,
        "the session ends"
    );
    let r = app.login_form(U, PASSWORD, "").await;
    assert_eq!(r.status, 401);
    assert!(set_cookie(&r).is_none());
    ws_refused_with(
        app.ws_with("/ws", &[("authorization", &basic(U, PASSWORD))])
            .await,
        401,
    );

    app.store.set_disabled(U, false).await.unwrap();
    assert_eq!(
        app.get(U, "/api/settings").await.status,
        200,
        "enabled again"
    );
}

#[tokio::test]
async fn a_participant_cannot_open_another_participants_workspace() {
    let app = spawn_app().await;
    app.post_json("user002", "/api/settings", &json!({"Theirs": 1}))
        .await;
    for path in [
        "/user002/",
        "/user002/api/settings",
        "/user002/settings/Theirs",
        "/user002/api/userdata?dir=workflows",
        "/user002/api/object_info",
        "/user002/api/view?filename=x.png",
        "/user002/internal/files/input",
    ] {
        let r = app.get(U, path).await;
        assert_eq!(r.status, 403, "{path}");
        assert!(!r.text().contains("Theirs"), "{path}");
    }
    let r = app
        .post_json(U, "/user002/api/settings", &json!({"Theirs": 2}))
        .await;
    assert_eq!(r.status, 403);
    assert_eq!(
        app.get("user002", "/api/settings").await.json(),
        json!({"Theirs": 1})
    );
    ws_refused_with(
        app.ws_with("/user002/ws", &[("authorization", &basic(U, PASSWORD))])
            .await,
        403,
    );
    // A name that is nobody's is refused the same way (no probing for accounts).
    assert_eq!(app.get(U, "/nosuch/api/settings").await.status, 403);
}

#[tokio::test]
async fn the_instructor_opens_any_participants_workspace() {
    let app = spawn_app().await;
    app.post_json(U, "/api/settings", &json!({"Mine": "user001's"}))
        .await;
    app.post(U, "/api/userdata/workflows%2Fdraft.json", r#"{"d":1}"#)
        .await;
    let r = app.get(ADMIN, "/user001/api/settings").await;
    assert_eq!(
        (r.status.as_u16(), r.json()),
        (200, json!({"Mine": "user001's"}))
    );
    let r = app
        .get(ADMIN, "/user001/api/userdata/workflows%2Fdraft.json")
        .await;
    assert_eq!(r.text(), r#"{"d":1}"#);
    assert_eq!(app.get(ADMIN, "/user001/").await.status, 200);
    let mut ws = app.ws(ADMIN, "/user001/ws?clientId=t").await;
    assert_eq!(next_json(&mut ws).await["data"]["sid"], "t");
    // Their own workspace stays their own.
    assert_eq!(app.get(ADMIN, "/api/settings").await.json(), json!({}));
    let r = app.get(ADMIN, "/nosuch/api/settings").await;
    assert_eq!(r.status, 404, "no such participant");
    assert!(
        !app.data_dir.join("user_data/nosuch").exists(),
        "no folders made for a non-account"
    );
}

#[tokio::test]
async fn next_after_login_is_only_ever_a_local_path() {
    let app = spawn_app().await;
    for next in [
        "//evil.example",
        "//evil.example/user001/",
        "https://evil.example/",
        "/\\evil.example",
        "\\\\evil.example",
        "/\t/evil.example",
        "/\n/evil.example",
        " //evil.example",
        "javascript:alert(1)",
    ] {
        let r = app.login_form(U, PASSWORD, next).await;
        assert!(r.status.is_redirection(), "{next:?}: {}", r.status);
        assert_eq!(
            r.header("location").as_deref(),
            Some("/user001/"),
            "next={next:?}"
        );
        assert!(set_cookie(&r).is_some(), "{next:?}: still signed in");
    }
    let r = app.login_form(U, PASSWORD, "/user001/?tab=queue").await;
    assert_eq!(
        r.header("location").as_deref(),
        Some("/user001/?tab=queue"),
        "a local path is kept"
    );
    let page = app.anon_get("/login?next=%2F%2Fevil.example", &[]).await;
    assert!(
        !page.text().contains("evil.example"),
        "the form does not carry it either"
    );
    let page = app.anon_get("/login?next=%22%3E%3Cscript%3E", &[]).await;
    assert!(!page.text().contains("\"><script>"), "escaped or dropped");
}
