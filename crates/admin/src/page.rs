//! `/admin` and `/admin/room`: the page's shell, rendered here (the instructor's name and
//! the session's CSRF token, escaped), and its script and style sheet, embedded in the
//! binary (no Node toolchain at build or run time). The script draws everything else from
//! the live stream, with text nodes only: participant text is never parsed as HTML.

use axum::Extension;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use comfyume_gateway::auth::Caller;
use comfyume_store::Role;

use crate::Instructor;

const APP_JS: &str = include_str!("../web/app.js");
const APP_CSS: &str = include_str!("../web/app.css");

/// The page may load only this server's script, styles, images and media, and connect only
/// back to it: even a participant's text that got past the escaping could not run.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   media-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; \
                   form-action 'self'; frame-ancestors 'none'";

pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn shell(me: &str, csrf: &str, view: &str) -> String {
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<meta name="csrf-token" content="{csrf}">
<title>ComfyUMe — instructor</title>
<link rel="stylesheet" href="/admin/assets/app.css">
<script src="/admin/assets/app.js" defer></script>
</head>
<body class="view-{view}" data-me="{me}" data-view="{view}">
<header class="top">
  <h1>ComfyUMe <span class="sub">instructor</span></h1>
  <nav id="tabs" aria-label="Views"></nav>
  <span id="live" class="live off" role="status">connecting…</span>
  <span class="me">{me} · <a href="/logout">Sign out</a></span>
</header>
<div id="banner" class="banner" hidden></div>
<main id="app"><noscript>The dashboard needs JavaScript.</noscript></main>
</body></html>"#,
        me = escape(me),
        csrf = escape(csrf),
        view = view,
    )
}

fn page(caller: Option<Extension<Caller>>, headers: &HeaderMap, view: &str) -> Response {
    let Some(Extension(Caller(user))) = caller else {
        return StatusCode::UNAUTHORIZED.into_response();
    };
    if user.role != Role::Admin {
        return (
            StatusCode::FORBIDDEN,
            Html(format!(
                "<!doctype html><meta charset=utf-8><title>Instructors only</title>\
                 <p>This page is for the workshop's instructors. <a href=\"/{}/\">Back to your ComfyUI</a></p>",
                escape(&user.name)
            )),
        )
            .into_response();
    }
    // Loaded with Basic credentials (no cookie yet): the stream's first message brings it.
    let csrf = crate::csrf::token_of(headers).unwrap_or_default();
    let mut resp = Html(shell(&user.name, &csrf, view)).into_response();
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    resp
}

/// `GET /admin`.
pub async fn dashboard_page(caller: Option<Extension<Caller>>, headers: HeaderMap) -> Response {
    page(caller, &headers, "dashboard")
}

/// `GET /admin/room`: the projector's view (queue, now running, latest results; large type).
pub async fn room_page(caller: Option<Extension<Caller>>, headers: HeaderMap) -> Response {
    page(caller, &headers, "room")
}

/// `GET /admin/assets/{file}`.
pub async fn asset(_: Instructor, Path(file): Path<String>) -> Response {
    let (ct, body) = match file.as_str() {
        "app.js" => ("text/javascript; charset=utf-8", APP_JS),
        "app.css" => ("text/css; charset=utf-8", APP_CSS),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, ct),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shell_escapes_what_it_is_given() {
        let html = shell("<img src=x onerror=alert(1)>", "\"><script>", "room");
        assert!(!html.contains("<img src=x"));
        assert!(html.contains("&lt;img src=x onerror=alert(1)&gt;"));
        assert!(html.contains("content=\"&quot;&gt;&lt;script&gt;\""));
        assert!(html.contains("class=\"view-room\""));
    }
}
