//! The stock ComfyUI frontend (static files) and our own small frontend extension
//! (the template library is in [`crate::templates`]).

use std::path::Path;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use tower::ServiceExt;
use tower_http::services::ServeDir;

use crate::scope::Scope;
use crate::state::AppState;

/// The frontend's core extension scripts, as ComfyUI lists them, plus ours.
pub fn extension_list(frontend_dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    fn visit(root: &Path, d: &Path, out: &mut Vec<String>) {
        let Ok(rd) = std::fs::read_dir(d) else { return };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                visit(root, &p, out);
            } else if p.extension().is_some_and(|x| x == "js")
                && let Ok(rel) = p.strip_prefix(root)
            {
                out.push(format!("/{}", rel.to_string_lossy()));
            }
        }
    }
    visit(frontend_dir, &frontend_dir.join("extensions"), &mut out);
    out.sort();
    out.extend(crate::extension::SCRIPTS.iter().map(|(p, _)| p.to_string()));
    out
}

fn cache_header(path: &str) -> Option<&'static str> {
    if path.starts_with("/assets/") && !path.ends_with(".json") {
        // Vite's content-hashed file names: safe to keep for a year.
        Some("public, max-age=31536000, immutable")
    } else if path.ends_with(".js") || path.ends_with(".css") || path.ends_with(".json") {
        Some("no-cache")
    } else if [
        ".png", ".jpg", ".jpeg", ".webp", ".gif", ".svg", ".ico", ".woff", ".woff2", ".ttf",
    ]
    .iter()
    .any(|e| path.ends_with(e))
    {
        Some("public, max-age=86400")
    } else {
        None
    }
}

/// GET `/` (after the participant prefix is stripped): `index.html`, never cached.
pub async fn index(State(state): State<AppState>) -> Response {
    match tokio::fs::read(state.settings.frontend_dir.join("index.html")).await {
        Ok(bytes) => (
            [
                (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                (header::CACHE_CONTROL, "no-cache"),
                (header::PRAGMA, "no-cache"),
                (header::EXPIRES, "0"),
            ],
            bytes,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "frontend index.html is missing");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "The ComfyUI frontend is not installed on this server.",
            )
                .into_response()
        }
    }
}

/// `/user001` → `/user001/`: the frontend's relative asset URLs need the slash.
pub async fn add_slash(req: Request) -> Response {
    let original = req
        .extensions()
        .get::<Scope>()
        .map(|s| s.original_path.clone())
        .unwrap_or_else(|| "/".into());
    let q = req
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    Redirect::permanent(&format!("{original}/{q}")).into_response()
}

/// Everything else: a static file of the frontend, or 404.
pub async fn static_file(State(state): State<AppState>, req: Request) -> Response {
    let path = req.uri().path().to_string();
    if let Some((_, body)) = crate::extension::SCRIPTS.iter().find(|(p, _)| *p == path) {
        return (
            [
                (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            *body,
        )
            .into_response();
    }
    // `x.js.br` / `x.js.gz` beside a file are sent as is to clients that accept them.
    let svc = ServeDir::new(&state.settings.frontend_dir)
        .append_index_html_on_directories(false)
        .precompressed_br()
        .precompressed_gzip();
    let mut resp = match svc.oneshot(req).await {
        Ok(r) => r.map(Body::new),
        Err(e) => match e {},
    };
    if resp.status().is_success()
        && let Some(cc) = cache_header(&path)
    {
        resp.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static(cc));
    }
    // The same URL answers br, gzip or plain bytes: shared caches must key on it.
    let varies = resp.headers().get_all(header::VARY).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.to_ascii_lowercase().contains("accept-encoding"))
    });
    if !varies {
        resp.headers_mut()
            .append(header::VARY, HeaderValue::from_static("accept-encoding"));
    }
    resp
}
