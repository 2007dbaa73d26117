//! `/userdata` and `/v2/userdata`: the participant's saved workflows and other
//! frontend files, with ComfyUI's status codes and bodies.

use std::path::{Path as FsPath, PathBuf};
use std::time::UNIX_EPOCH;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::write_atomic;
use crate::auth::Participant;
use crate::error::{ApiError, ApiResult};
use crate::paths::resolve_within;
use crate::state::AppState;

fn flag(v: &Option<String>) -> bool {
    v.as_deref()
        .is_some_and(|s| s.eq_ignore_ascii_case("true") || s == "1")
}

fn user_root(state: &AppState, who: &Participant) -> PathBuf {
    state.user_dirs(&who.name).user_data
}

fn resolve(root: &FsPath, rel: &str) -> ApiResult<PathBuf> {
    resolve_within(root, rel).map_err(|_| ApiError::forbidden())
}

fn rel_string(root: &FsPath, p: &FsPath) -> String {
    p.strip_prefix(root)
        .unwrap_or(p)
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("/")
}

fn secs(t: std::io::Result<std::time::SystemTime>) -> f64 {
    t.ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn file_info(path_rel: &str, md: &std::fs::Metadata) -> Value {
    let modified = secs(md.modified());
    let created = md.created().ok().map(|t| secs(Ok(t))).unwrap_or(modified);
    json!({"path": path_rel, "size": md.len(), "modified": modified, "created": created})
}

/// Files (not folders) below `dir`, as (absolute path, metadata), sorted.
fn walk(dir: &FsPath, recurse: bool, out: &mut Vec<(PathBuf, std::fs::Metadata)>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = rd.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        // ComfyUI's glob('*') skips dot files; so do we (and our in-progress `.tmp` writes).
        if e.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        // symlink_metadata: never follow a link out of the participant's folder.
        let Ok(md) = e.path().symlink_metadata() else {
            continue;
        };
        if md.is_dir() {
            if recurse {
                walk(&e.path(), true, out);
            }
        } else if md.is_file() {
            out.push((e.path(), md));
        }
    }
}

#[derive(Deserialize)]
pub struct ListQuery {
    dir: Option<String>,
    recurse: Option<String>,
    full_info: Option<String>,
    split: Option<String>,
}

pub async fn list(
    State(state): State<AppState>,
    who: Participant,
    Query(q): Query<ListQuery>,
) -> ApiResult<Response> {
    let Some(dir) = q.dir.as_deref().filter(|d| !d.is_empty()) else {
        return Err(ApiError::bad_request("Directory not provided"));
    };
    let root = user_root(&state, &who);
    let base = resolve_within(&root, dir)
        .map_err(|_| ApiError::Text(StatusCode::FORBIDDEN, "Invalid directory".into()))?;
    if !base.is_dir() {
        return Err(ApiError::Text(
            StatusCode::NOT_FOUND,
            "Directory not found".into(),
        ));
    }
    let (recurse, full, split) = (flag(&q.recurse), flag(&q.full_info), flag(&q.split));
    let files = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        walk(&base, recurse, &mut out);
        out.into_iter()
            .map(|(p, md)| {
                let rel = rel_string(&base, &p);
                if full {
                    file_info(&rel, &md)
                } else if split {
                    let mut parts = vec![Value::String(rel.clone())];
                    parts.extend(rel.split('/').map(|s| Value::String(s.to_string())));
                    Value::Array(parts)
                } else {
                    Value::String(rel)
                }
            })
            .collect::<Vec<_>>()
    })
    .await
    .map_err(|e| ApiError::Io(std::io::Error::other(e)))?;
    Ok(Json(Value::Array(files)).into_response())
}

pub async fn get_file(
    State(state): State<AppState>,
    who: Participant,
    Path(file): Path<String>,
) -> ApiResult<Response> {
    let root = user_root(&state, &who);
    let path = resolve(&root, &file)?;
    let md = match tokio::fs::metadata(&path).await {
        Ok(md) if md.is_file() => md,
        _ => return Err(ApiError::not_found()),
    };
    let _ = md;
    let bytes = tokio::fs::read(&path).await?;
    // Participant files are arbitrary content and never render inline on this
    // origin (the instructor opening /user001/ would run user001's script), as
    // in later ComfyUI. `user.css` is the frontend's own stylesheet hook.
    let (ct, disposition) = if rel_string(&root, &path) == "user.css" {
        ("text/css".to_string(), "inline")
    } else {
        let mime = mime_guess::from_path(&path).first_or_octet_stream();
        let ct = match mime.essence_str() {
            "text/html"
            | "application/xhtml+xml"
            | "application/javascript"
            | "text/javascript"
            | "text/css"
            | "image/svg+xml"
            | "text/xml"
            | "application/xml" => "application/octet-stream".to_string(),
            other => other.to_string(),
        };
        (ct, "attachment")
    };
    Ok((
        [
            (header::CONTENT_TYPE, ct),
            (header::CONTENT_DISPOSITION, disposition.to_string()),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_string()),
        ],
        Body::from(bytes),
    )
        .into_response())
}

#[derive(Deserialize)]
pub struct WriteQuery {
    overwrite: Option<String>,
    full_info: Option<String>,
}

fn overwrite_allowed(q: &WriteQuery) -> bool {
    // ComfyUI: anything but "false" overwrites.
    q.overwrite.as_deref() != Some("false")
}

pub async fn post_file(
    State(state): State<AppState>,
    who: Participant,
    Path(file): Path<String>,
    Query(q): Query<WriteQuery>,
    body: Bytes,
) -> ApiResult<Response> {
    let root = user_root(&state, &who);
    if file.is_empty() || file.ends_with('/') {
        return Err(ApiError::bad_request("Invalid file path"));
    }
    let path = resolve(&root, &file)?;
    if path == root {
        return Err(ApiError::bad_request("Invalid file path"));
    }
    if path.exists() && !overwrite_allowed(&q) {
        return Err(ApiError::Text(
            StatusCode::CONFLICT,
            "File already exists".into(),
        ));
    }
    if path.is_dir() {
        return Err(ApiError::Text(
            StatusCode::CONFLICT,
            "A folder has that name".into(),
        ));
    }
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent).await?;
    }
    write_atomic(&path, &body).await?;
    let rel = rel_string(&root, &path);
    if flag(&q.full_info) {
        let md = tokio::fs::metadata(&path).await?;
        return Ok(Json(file_info(&rel, &md)).into_response());
    }
    Ok(Json(json!(rel)).into_response())
}

pub async fn delete_file(
    State(state): State<AppState>,
    who: Participant,
    Path(file): Path<String>,
) -> ApiResult<StatusCode> {
    let root = user_root(&state, &who);
    let path = resolve(&root, &file)?;
    match tokio::fs::symlink_metadata(&path).await {
        Ok(md) if md.is_file() => {
            tokio::fs::remove_file(&path).await?;
            Ok(StatusCode::NO_CONTENT)
        }
        _ => Err(ApiError::not_found()),
    }
}

pub async fn move_file(
    State(state): State<AppState>,
    who: Participant,
    Path((file, dest)): Path<(String, String)>,
    Query(q): Query<WriteQuery>,
) -> ApiResult<Response> {
    let root = user_root(&state, &who);
    let src = resolve(&root, &file)?;
    let dst = resolve(&root, &dest)?;
    if !src.is_file() {
        return Err(ApiError::not_found());
    }
    if dst.exists() && !overwrite_allowed(&q) {
        return Err(ApiError::Text(
            StatusCode::CONFLICT,
            "File already exists".into(),
        ));
    }
    if dst == root || dst.is_dir() {
        return Err(ApiError::Text(
            StatusCode::CONFLICT,
            "A folder has that name".into(),
        ));
    }
    if let Some(parent) = dst.parent() {
        tokio::fs::create_dir_all(parent).await?;
    }
    tokio::fs::rename(&src, &dst).await?;
    let rel = rel_string(&root, &dst);
    if flag(&q.full_info) {
        let md = tokio::fs::metadata(&dst).await?;
        return Ok(Json(file_info(&rel, &md)).into_response());
    }
    Ok(Json(json!(rel)).into_response())
}

#[derive(Deserialize)]
pub struct V2Query {
    path: Option<String>,
}

/// `/v2/userdata`: a recursive listing, directories first, then files.
pub async fn list_v2(
    State(state): State<AppState>,
    who: Participant,
    Query(q): Query<V2Query>,
) -> ApiResult<Response> {
    let root = user_root(&state, &who);
    let rel = q.path.unwrap_or_default();
    // ComfyUI: 400 "Invalid path requested" for a path outside the user's folder
    // (a leading `/` included: it names the filesystem root there).
    let base = resolve_within(&root, &rel)
        .map_err(|_| ApiError::Text(StatusCode::BAD_REQUEST, "Invalid path requested".into()))?;
    if !base.is_dir() {
        return Err(ApiError::Text(
            StatusCode::NOT_FOUND,
            "Requested path not found".into(),
        ));
    }
    let out = tokio::task::spawn_blocking(move || {
        let mut dirs = Vec::new();
        let mut files = Vec::new();
        fn visit(root: &FsPath, dir: &FsPath, dirs: &mut Vec<Value>, files: &mut Vec<Value>) {
            let Ok(rd) = std::fs::read_dir(dir) else { return };
            let mut entries: Vec<_> = rd.flatten().collect();
            entries.sort_by_key(|e| e.file_name());
            for e in entries {
                let Ok(md) = e.path().symlink_metadata() else { continue };
                let name = e.file_name().to_string_lossy().into_owned();
                let rel = rel_string(root, &e.path());
                if md.is_dir() {
                    dirs.push(json!({"name": name, "path": rel, "type": "directory"}));
                    visit(root, &e.path(), dirs, files);
                } else if md.is_file() {
                    files.push(json!({"name": name, "path": rel, "type": "file", "size": md.len(), "modified": secs(md.modified())}));
                }
            }
        }
        visit(&root, &base, &mut dirs, &mut files);
        dirs.extend(files);
        // ComfyUI sorts directories first, then each group by name, case-insensitively.
        dirs.sort_by_cached_key(|e| {
            (e["type"] != "directory", e["name"].as_str().unwrap_or("").to_lowercase())
        });
        dirs
    })
    .await
    .map_err(|e| ApiError::Io(std::io::Error::other(e)))?;
    Ok(Json(Value::Array(out)).into_response())
}
