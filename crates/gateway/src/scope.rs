//! The `/userNNN/` prefix. The stock frontend derives its API base from the page
//! path, so `/user001/api/settings` must reach the same handler as
//! `/api/settings`. Before routing, a participant prefix is stripped from the URI
//! and remembered as a [`Scope`]; the auth middleware then checks it.

use std::collections::HashSet;
use std::path::Path;

use axum::extract::Request;
use axum::http::Uri;

#[derive(Debug, Clone, Default)]
pub struct Scope {
    /// The participant named by the prefix, if any.
    pub user: Option<String>,
    /// The path as the client sent it (for login redirects).
    pub original_path: String,
}

/// First segments that are routes or frontend files, never participant names.
pub const RESERVED: &[&str] = &[
    "api",
    "ws",
    "login",
    "logout",
    "admin",
    "metrics",
    "healthz",
    "templates",
    "docs",
    "internal",
    "view",
    "view_metadata",
    "prompt",
    "queue",
    "history",
    "interrupt",
    "free",
    "upload",
    "object_info",
    "system_stats",
    "features",
    "users",
    "settings",
    "userdata",
    "v2",
    "i18n",
    "embeddings",
    "models",
    "experiment",
    "extensions",
    "global_subgraphs",
    "workflow_templates",
    "jobs",
    "assets",
    "scripts",
    "fonts",
    "cursor",
    "comfyume",
    "static",
    "favicon.ico",
    "index.html",
    "user.css",
    "materialdesignicons.min.css",
];

/// The reserved set plus whatever the installed frontend has at its top level.
pub fn reserved_names(frontend_dir: &Path) -> HashSet<String> {
    let mut set: HashSet<String> = RESERVED.iter().map(|s| s.to_string()).collect();
    if let Ok(rd) = std::fs::read_dir(frontend_dir) {
        for e in rd.flatten() {
            set.insert(e.file_name().to_string_lossy().into_owned());
        }
    }
    set
}

/// Whether `name` may be used as an account name (it must not shadow a route).
pub fn is_reserved_name(name: &str) -> bool {
    RESERVED.contains(&name) || name.contains('.')
}

/// Strips a participant prefix from the request URI and records the scope.
pub fn rewrite(mut req: Request, reserved: &HashSet<String>) -> Request {
    let path = req.uri().path().to_string();
    let mut scope = Scope {
        user: None,
        original_path: path.clone(),
    };
    let trimmed = path.trim_start_matches('/');
    let (first, rest) = match trimmed.split_once('/') {
        Some((f, r)) => (f, Some(r)),
        None => (trimmed, None),
    };
    if !first.is_empty() && !reserved.contains(first) && looks_like_user(first) {
        scope.user = Some(first.to_string());
        let new_path = match rest {
            Some(r) => format!("/{r}"),
            // `/user001` without the slash: the frontend's relative URLs need it.
            None => "/__comfyume_add_slash".to_string(),
        };
        let pq = match req.uri().query() {
            Some(q) => format!("{new_path}?{q}"),
            None => new_path,
        };
        let mut parts = req.uri().clone().into_parts();
        if let Ok(pq) = pq.parse() {
            parts.path_and_query = Some(pq);
            if let Ok(uri) = Uri::from_parts(parts) {
                *req.uri_mut() = uri;
            }
        }
    }
    req.extensions_mut().insert(scope);
    req
}

fn looks_like_user(s: &str) -> bool {
    s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(path: &str) -> (String, Option<String>) {
        let reserved: HashSet<String> = RESERVED.iter().map(|s| s.to_string()).collect();
        let req = Request::builder()
            .uri(path)
            .body(axum::body::Body::empty())
            .unwrap();
        let req = rewrite(req, &reserved);
        let scope = req.extensions().get::<Scope>().unwrap().clone();
        (req.uri().to_string(), scope.user)
    }

    #[test]
    fn strips_participant_prefix() {
        assert_eq!(
            run("/user001/api/settings?x=1"),
            ("/api/settings?x=1".into(), Some("user001".into()))
        );
        assert_eq!(run("/user001/"), ("/".into(), Some("user001".into())));
        assert_eq!(
            run("/user001"),
            ("/__comfyume_add_slash".into(), Some("user001".into()))
        );
        assert_eq!(run("/api/settings"), ("/api/settings".into(), None));
        assert_eq!(run("/assets/index.js"), ("/assets/index.js".into(), None));
        assert_eq!(run("/"), ("/".into(), None));
        assert_eq!(run("/user.css"), ("/user.css".into(), None));
    }
}
