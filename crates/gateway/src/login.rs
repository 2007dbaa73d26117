//! The login page, login form handler and logout.

use axum::Form;
use axum::extract::{Query, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use serde::Deserialize;

use crate::auth::{
    SESSION_COOKIE, clear_cookie, client_of, cookie_value, session_cookie, session_key,
};
use crate::hub::CloseReason;
use crate::signin::{SignInError, sign_in};
use crate::state::AppState;

#[derive(Deserialize)]
pub struct NextQuery {
    next: Option<String>,
}

#[derive(Deserialize)]
pub struct LoginForm {
    username: String,
    password: String,
    next: Option<String>,
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// Only a local path may be a redirect target (no `//evil.example`). Browsers
/// drop tabs and newlines from URLs (`/\t/evil.example` is `//evil.example`),
/// and a control character would not fit in a Location header: visible ASCII only.
fn safe_next(next: Option<&str>) -> Option<String> {
    next.filter(|n| {
        n.starts_with('/')
            && !n.starts_with("//")
            && n.bytes().all(|b| b.is_ascii_graphic() && b != b'\\')
    })
    .map(str::to_string)
}

fn page(next: &str, error: Option<&str>) -> String {
    let err = error
        .map(|e| format!("<p class=\"err\" role=\"alert\">{}</p>", escape(e)))
        .unwrap_or_default();
    format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>ComfyUMe — sign in</title>
<meta name="viewport" content="width=device-width,initial-scale=1">
<style>body{{font:16px system-ui,sans-serif;background:#1b1b22;color:#eee;display:grid;place-items:center;min-height:100vh;margin:0}}
form{{background:#26262f;padding:2rem;border-radius:12px;min-width:300px}}h1{{font-size:1.3rem;margin-top:0}}
label{{display:block;margin:.8rem 0 .3rem}}input{{width:100%;box-sizing:border-box;padding:.5rem;border-radius:6px;border:1px solid #555;background:#111;color:#eee}}
button{{margin-top:1.2rem;width:100%;padding:.6rem;border:0;border-radius:6px;background:#4a7dff;color:#fff;font-weight:600;cursor:pointer}}
.err{{color:#ff8080}}</style></head><body>
<form method="post" action="/login"><h1>ComfyUMe workshop</h1>{err}
<label for="u">Username</label><input id="u" name="username" autocomplete="username" autofocus required>
<label for="p">Password</label><input id="p" name="password" type="password" autocomplete="current-password" required>
<input type="hidden" name="next" value="{next}"><button type="submit">Sign in</button></form></body></html>"#,
        next = escape(next)
    )
}

pub async fn login_page(Query(q): Query<NextQuery>) -> Response {
    let next = safe_next(q.next.as_deref()).unwrap_or_default();
    (
        [(header::CACHE_CONTROL, "no-store")],
        Html(page(&next, None)),
    )
        .into_response()
}

pub async fn login_submit(
    State(state): State<AppState>,
    parts: Parts,
    Form(form): Form<LoginForm>,
) -> Response {
    let next = safe_next(form.next.as_deref());
    let client = client_of(&parts, &state);
    let user = match sign_in(&state, client.addr, &form.username, &form.password).await {
        Ok(u) => u,
        Err(SignInError::Throttled(wait)) => {
            let secs = SignInError::retry_after_secs(wait);
            let msg = format!("Too many failed sign-ins. Try again in {secs} seconds.");
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::RETRY_AFTER, secs.to_string())],
                Html(page(next.as_deref().unwrap_or(""), Some(&msg))),
            )
                .into_response();
        }
        // One message for unknown users, wrong passwords and disabled accounts alike.
        Err(SignInError::Rejected) => {
            return (
                StatusCode::UNAUTHORIZED,
                Html(page(
                    next.as_deref().unwrap_or(""),
                    Some("Wrong username or password."),
                )),
            )
                .into_response();
        }
        Err(e) => return crate::auth::sign_in_error(e),
    };
    let token = match state
        .store
        .create_session(&user.name, state.settings.session_ttl.as_millis() as i64)
        .await
    {
        Ok(t) => t,
        Err(e) => return crate::error::ApiError::Store(e).into_response(),
    };
    tracing::info!(user = %user.name, client = %client.addr, "signed in");
    let target = next.unwrap_or_else(|| format!("/{}/", user.name));
    let mut resp = Redirect::to(&target).into_response();
    resp.headers_mut()
        .append(header::SET_COOKIE, session_cookie(&state, &token));
    resp
}

/// Ends the session: on the server, its cookie, and its open WebSockets, at once.
pub async fn logout(State(state): State<AppState>, parts: Parts) -> Response {
    if let Some(token) = cookie_value(&parts.headers, SESSION_COOKIE) {
        if let Err(e) = state.store.delete_session(token).await {
            tracing::warn!(error = %e, "could not delete a session");
        }
        // Whatever the store said: the person asked to leave.
        let closed = state
            .hub
            .close_session(&session_key(token), CloseReason::SignedOut);
        if closed > 0 {
            tracing::info!(sockets = closed, "signed out; closed the session's sockets");
        }
    }
    let mut resp = Redirect::to("/login").into_response();
    resp.headers_mut()
        .append(header::SET_COOKIE, clear_cookie());
    resp
}
