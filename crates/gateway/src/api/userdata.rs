//! `/userdata` and `/v2/userdata`: the participant's saved workflows and other
//! frontend files, with ComfyUI's status codes and bodies.

use std::path::{Path as FsPath, PathBuf};

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::auth::Participant;
use crate::error::{ApiError, ApiResult};
use crate::fsx::{self, Kind};
use crate::limits::JsonBody;
use crate::paths::resolve_within;
use crate::state::AppState;
use crate::{headers, sniff};

/// The frontend's stylesheet hook (`index.html` loads `api/userdata/user.css`).
const USER_CSS: &str = "user.css";

fn flag(v: &Option<String>) -> bool {
    v.as_deref()
        .is_some_and(|s| s.eq_ignore_ascii_case("true") || s == "1")
}

fn user_root(state: &AppState, who: &Participant) -> PathBuf {
    state.user_dirs(&who.name).user_data
}

/// A file path named by the participant: traversal is 403 (ComfyUI), a name
/// beyond the size limits 400 with its reason.
async fn resolve(root: &FsPath, rel: &str) -> ApiResult<PathBuf> {
    resolve_within(root, rel)
        .await
        .map_err(|e| ApiError::path(e, ApiError::forbidden()))
}

fn rel_string(root: &FsPath, p: &FsPath) -> String {
    p.strip_prefix(root)
        .unwrap_or(p)
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("/")
}

fn file_info(path_rel: &str, md: &std::fs::Metadata) -> Value {
    let modified = fsx::secs(md.modified());
    let created = md
        .created()
        .ok()
        .map(|t| fsx::secs(Ok(t)))
        .unwrap_or(modified);
    json!({"path": path_rel, "size": md.len(), "modified": modified, "created": created})
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
    let base = resolve_within(&root, dir).await.map_err(|e| {
        ApiError::path(
            e,
            ApiError::Text(StatusCode::FORBIDDEN, "Invalid directory".into()),
        )
    })?;
    if fsx::kind(&base).await != Kind::Dir {
        return Err(ApiError::Text(
            StatusCode::NOT_FOUND,
            "Directory not found".into(),
        ));
    }
    let (recurse, full, split) = (flag(&q.recurse), flag(&q.full_info), flag(&q.split));
    let files = fsx::walk(&base, &base, recurse)
        .await
        .into_iter()
        .filter(|e| !e.is_dir)
        .map(|e| {
            if full {
                json!({"path": e.rel, "size": e.size, "modified": e.modified, "created": e.created})
            } else if split {
                let mut parts = vec![Value::String(e.rel.clone())];
                parts.extend(e.rel.split('/').map(|s| Value::String(s.to_string())));
                Value::Array(parts)
            } else {
                Value::String(e.rel)
            }
        })
        .collect::<Vec<_>>();
    Ok(Json(Value::Array(files)).into_response())
}

pub async fn get_file(
    State(state): State<AppState>,
    who: Participant,
    Path(file): Path<String>,
) -> ApiResult<Response> {
    let root = user_root(&state, &who);
    let path = resolve(&root, &file).await?;
    if fsx::kind(&path).await != Kind::File {
        return Err(ApiError::not_found());
    }
    let rel = rel_string(&root, &path);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if rel == USER_CSS {
        // A participant's stylesheet styles their own UI only: the instructor
        // opening /user001/ gets the stock look, as if there were none.
        if who.caller.name != who.name {
            return Err(ApiError::not_found());
        }
        let bytes = tokio::fs::read(&path).await?;
        return Ok((
            [
                (axum::http::header::CONTENT_TYPE, "text/css; charset=utf-8"),
                (axum::http::header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            Body::from(bytes),
        )
            .into_response());
    }
    let bytes = tokio::fs::read(&path).await?;
    // Participant files are arbitrary content and never render inline on this
    // origin (the instructor opening /user001/ would run user001's script).
    let media = sniff::media_type(&bytes[..bytes.len().min(sniff::HEAD_LEN)], &name);
    let mut resp = Body::from(bytes).into_response();
    headers::participant_file(resp.headers_mut(), media, &name);
    Ok(resp)
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

fn exists_conflict() -> ApiError {
    ApiError::Text(StatusCode::CONFLICT, "File already exists".into())
}

fn folder_conflict() -> ApiError {
    ApiError::Text(StatusCode::CONFLICT, "A folder has that name".into())
}

pub async fn post_file(
    State(state): State<AppState>,
    who: Participant,
    Path(file): Path<String>,
    Query(q): Query<WriteQuery>,
    body: JsonBody,
) -> ApiResult<Response> {
    let root = user_root(&state, &who);
    if file.is_empty() || file.ends_with('/') {
        return Err(ApiError::bad_request("Invalid file path"));
    }
    let path = resolve(&root, &file).await?;
    if path == root {
        return Err(ApiError::bad_request("Invalid file path"));
    }
    match fsx::kind(&path).await {
        Kind::Dir => return Err(folder_conflict()),
        Kind::Missing => {}
        _ if !overwrite_allowed(&q) => return Err(exists_conflict()),
        _ => {}
    }
    let parent = path.parent().unwrap_or(&root).to_path_buf();
    let created = fsx::create_dirs(&parent).await?;
    if let Err(e) = fsx::write_atomic(&path, &body.0).await {
        fsx::remove_created(created).await;
        return Err(e.into());
    }
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
    let path = resolve(&root, &file).await?;
    if fsx::kind_no_follow(&path).await != Kind::File {
        return Err(ApiError::not_found());
    }
    tokio::fs::remove_file(&path).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn move_file(
    State(state): State<AppState>,
    who: Participant,
    Path((file, dest)): Path<(String, String)>,
    Query(q): Query<WriteQuery>,
) -> ApiResult<Response> {
    let root = user_root(&state, &who);
    let src = resolve(&root, &file).await?;
    let dst = resolve(&root, &dest).await?;
    if fsx::kind(&src).await != Kind::File {
        return Err(ApiError::not_found());
    }
    if dst == root {
        return Err(folder_conflict());
    }
    match fsx::kind(&dst).await {
        Kind::Dir => return Err(folder_conflict()),
        Kind::Missing => {}
        _ if !overwrite_allowed(&q) => return Err(exists_conflict()),
        _ => {}
    }
    let parent = dst.parent().unwrap_or(&root).to_path_buf();
    let created = fsx::create_dirs(&parent).await?;
    if let Err(e) = tokio::fs::rename(&src, &dst).await {
        fsx::remove_created(created).await;
        return Err(e.into());
    }
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
    let base = resolve_within(&root, &rel).await.map_err(|e| {
        ApiError::path(
            e,
            ApiError::Text(StatusCode::BAD_REQUEST, "Invalid path requested".into()),
        )
    })?;
    if fsx::kind(&base).await != Kind::Dir {
        return Err(ApiError::Text(
            StatusCode::NOT_FOUND,
            "Requested path not found".into(),
        ));
    }
    let mut out: Vec<Value> = fsx::walk(&root, &base, true)
        .await
        .into_iter()
        .map(|e| {
            if e.is_dir {
                json!({"name": e.name, "path": e.rel, "type": "directory"})
            } else {
                json!({"name": e.name, "path": e.rel, "type": "file", "size": e.size, "modified": e.modified})
            }
        })
        .collect();
    // ComfyUI sorts directories first, then each group by name, case-insensitively.
    out.sort_by_cached_key(|e| {
        (
            e["type"] != "directory",
            e["name"].as_str().unwrap_or("").to_lowercase(),
        )
    });
    Ok(Json(Value::Array(out)).into_response())
}
