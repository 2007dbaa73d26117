//! Downloads: one participant's outputs and workflows, or everyone's (one folder per
//! participant), as one zip streamed while it is written (the gateway's zip writer: no
//! temporary copy of the whole, memory bounded by a few chunks).

use std::path::Path;

use axum::Extension;
use axum::extract::{Path as UrlPath, State};
use axum::response::Response;
use comfyume_gateway::AppState;
use comfyume_gateway::export::{Entry, response};
use serde_json::json;

use crate::audit::{done, record};
use crate::{Admin, Instructor, not_found, unavailable};

/// Regular files under `dir` (links are not followed), as `prefix/relative/path`, sorted.
fn files_under(dir: &Path, prefix: &str, out: &mut Vec<Entry>) {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            let path = e.path();
            if ft.is_dir() {
                stack.push(path);
            } else if ft.is_file()
                && let Ok(rel) = path.strip_prefix(dir)
            {
                let rel: Vec<String> = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                found.push((format!("{prefix}/{}", rel.join("/")), path));
            }
        }
    }
    found.sort();
    out.extend(found.into_iter().map(|(name, path)| Entry::new(name, path)));
}

/// A participant's work: `outputs/...` and `workflows/...`, under `root` (empty: none).
fn entries_of(state: &AppState, user: &str, root: &str) -> Vec<Entry> {
    let dirs = state.user_dirs(user);
    let at = |what: &str| {
        if root.is_empty() {
            what.to_string()
        } else {
            format!("{root}/{what}")
        }
    };
    let mut out = Vec::new();
    files_under(&dirs.outputs, &at("outputs"), &mut out);
    files_under(
        &dirs.user_data.join("workflows"),
        &at("workflows"),
        &mut out,
    );
    out
}

/// `GET /admin/api/users/{name}/export.zip`.
pub async fn user_zip(
    State(state): State<AppState>,
    Extension(admin): Extension<Admin>,
    who: Instructor,
    UrlPath(name): UrlPath<String>,
) -> Response {
    match state.store.get_user(&name).await {
        Ok(Some(_)) => {}
        Ok(None) => return not_found("no such participant"),
        Err(e) => return unavailable(e),
    }
    let st = state.clone();
    let user = name.clone();
    let entries = tokio::task::spawn_blocking(move || entries_of(&st, &user, ""))
        .await
        .unwrap_or_default();
    record(
        &state,
        &admin,
        &who.0,
        "export.participant",
        Some(&name),
        json!({"files": entries.len()}),
    )
    .await;
    done(response(entries, &format!("{name}-work.zip")))
}

/// `GET /admin/api/export.zip`: everyone, one folder per participant.
pub async fn everyone_zip(
    State(state): State<AppState>,
    Extension(admin): Extension<Admin>,
    who: Instructor,
) -> Response {
    let users = match state.store.list_users().await {
        Ok(u) => u,
        Err(e) => return unavailable(e),
    };
    let st = state.clone();
    let names: Vec<String> = users.into_iter().map(|u| u.name).collect();
    let count = names.len();
    let entries = tokio::task::spawn_blocking(move || {
        names
            .iter()
            .flat_map(|n| entries_of(&st, n, n))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    record(
        &state,
        &admin,
        &who.0,
        "export.everyone",
        None,
        json!({"participants": count, "files": entries.len()}),
    )
    .await;
    done(response(entries, "workshop-work.zip"))
}
