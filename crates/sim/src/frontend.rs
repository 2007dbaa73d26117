//! What the stock ComfyUI frontend needs besides the prompt API, in ComfyUI's single-user
//! shape: its static files (`--front-end-root`), `/users`, `/settings`, `/userdata`, `/i18n`,
//! `/extensions`, `/global_subgraphs`, `/workflow_templates`, `/models` and
//! `/experiment/models`. User data lives in `<data dir>/user/default/`, as ComfyUI keeps it.

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Map, Value, json};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::UNIX_EPOCH;
use tower::ServiceExt;
use tower_http::services::ServeDir;

use crate::http::{json_response, safe_join};
use crate::state::Shared;

type S = State<Arc<Shared>>;
type Q = Query<HashMap<String, String>>;

/// ComfyUI's model folder keys (`GET /models`).
pub use comfyume_wire::models::MODEL_FOLDERS;

const SETTINGS: &str = "comfy.settings.json";

/// The API routes (registered bare and under `/api`, like the rest).
pub fn api_routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/users", get(users))
        .route("/settings", get(get_settings).post(post_settings))
        .route("/settings/{id}", get(get_setting).post(post_setting))
        .route("/userdata", get(list_userdata))
        .route(
            "/userdata/{file}",
            get(get_userdata)
                .post(post_userdata)
                .delete(delete_userdata),
        )
        .route("/userdata/{file}/move/{dest}", post(move_userdata))
        .route(
            "/i18n",
            get(|| async { json_response(StatusCode::OK, &json!({})) }),
        )
        .route("/extensions", get(extensions))
        .route(
            "/global_subgraphs",
            get(|| async { json_response(StatusCode::OK, &json!({})) }),
        )
        .route(
            "/workflow_templates",
            get(|| async { json_response(StatusCode::OK, &json!({})) }),
        )
        .route(
            "/models",
            get(|| async { json_response(StatusCode::OK, &json!(MODEL_FOLDERS)) }),
        )
        .route("/models/{folder}", get(model_files))
        .route("/experiment/models", get(experiment_models))
        .route("/experiment/models/{folder}", get(experiment_model_files))
}

/// `GET /` and the frontend's static files, when a frontend folder is served.
pub fn static_routes(router: Router<Arc<Shared>>, root: Option<PathBuf>) -> Router<Arc<Shared>> {
    let Some(root) = root else {
        return router;
    };
    let index = root.join("index.html");
    let files = root.clone();
    router
        .route(
            "/",
            get(move || async move {
                match tokio::fs::read(&index).await {
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
                    Err(_) => StatusCode::NOT_FOUND.into_response(),
                }
            }),
        )
        .fallback(move |req: Request| static_file(files.clone(), req))
}

/// A file of the frontend folder (ServeDir refuses `..` and anything outside it), with
/// ComfyUI's `cache_control` middleware: scripts, styles and `index*.json` are revalidated.
pub async fn static_file(root: PathBuf, req: Request) -> Response {
    let path = req.uri().path().to_string();
    let mut resp = match ServeDir::new(root).oneshot(req).await {
        Ok(r) => r.map(Body::new),
        Err(e) => match e {},
    };
    let name = path.rsplit('/').next().unwrap_or_default();
    if resp.status().is_success()
        && (path.ends_with(".js")
            || path.ends_with(".css")
            || (name.starts_with("index") && name.ends_with(".json")))
    {
        resp.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    }
    resp
}

fn user_dir(shared: &Shared) -> PathBuf {
    shared.dirs.root.join("user").join("default")
}

fn text(status: StatusCode, msg: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        msg.to_string(),
    )
        .into_response()
}

fn flag(q: &HashMap<String, String>, k: &str) -> bool {
    q.get(k)
        .is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

async fn users(State(shared): S) -> Response {
    let migrated = tokio::fs::metadata(user_dir(&shared)).await.is_ok();
    json_response(
        StatusCode::OK,
        &json!({"storage": "server", "migrated": migrated}),
    )
}

async fn read_settings(shared: &Shared) -> Map<String, Value> {
    match tokio::fs::read(user_dir(shared).join(SETTINGS)).await {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_default(),
        Err(_) => Map::new(),
    }
}

async fn write_settings(shared: &Shared, settings: &Map<String, Value>) -> Response {
    let dir = user_dir(shared);
    let text = serde_json::to_vec_pretty(settings).unwrap_or_default();
    match write_atomic(&dir, &dir.join(SETTINGS), &text).await {
        Ok(()) => StatusCode::OK.into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot write settings");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// Write through a temporary file and a rename, so a reader never sees half a file.
async fn write_atomic(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let parent = path.parent().unwrap_or(dir);
    tokio::fs::create_dir_all(parent).await?;
    let tmp = parent.join(format!(".{}.tmp", uuid::Uuid::new_v4().simple()));
    tokio::fs::write(&tmp, bytes).await?;
    tokio::fs::rename(&tmp, path).await
}

async fn get_settings(State(shared): S) -> Response {
    json_response(StatusCode::OK, &Value::Object(read_settings(&shared).await))
}

async fn get_setting(State(shared): S, UrlPath(id): UrlPath<String>) -> Response {
    let settings = read_settings(&shared).await;
    json_response(StatusCode::OK, settings.get(&id).unwrap_or(&Value::Null))
}

async fn post_settings(State(shared): S, body: Bytes) -> Response {
    let Ok(Value::Object(new)) = serde_json::from_slice::<Value>(&body) else {
        return text(StatusCode::BAD_REQUEST, "Invalid settings");
    };
    let _guard = shared.user_lock.lock().await;
    let mut settings = read_settings(&shared).await;
    settings.extend(new);
    write_settings(&shared, &settings).await
}

async fn post_setting(State(shared): S, UrlPath(id): UrlPath<String>, body: Bytes) -> Response {
    let Ok(value) = serde_json::from_slice::<Value>(&body) else {
        return text(StatusCode::BAD_REQUEST, "Invalid setting");
    };
    let _guard = shared.user_lock.lock().await;
    let mut settings = read_settings(&shared).await;
    settings.insert(id, value);
    write_settings(&shared, &settings).await
}

fn secs(t: std::io::Result<std::time::SystemTime>) -> f64 {
    t.ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0.0, |d| d.as_secs_f64())
}

fn file_info(rel: &str, md: &std::fs::Metadata) -> Value {
    let modified = secs(md.modified());
    let created = md.created().map_or(modified, |t| secs(Ok(t)));
    json!({"path": rel, "size": md.len(), "modified": modified, "created": created})
}

/// Files below `dir` (dot files skipped, links not followed), as forward-slash paths, sorted.
fn walk(base: &Path, dir: &Path, recurse: bool, out: &mut Vec<(String, std::fs::Metadata)>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = rd.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        if e.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let Ok(md) = e.path().symlink_metadata() else {
            continue;
        };
        if md.is_dir() && recurse {
            walk(base, &e.path(), true, out);
        } else if md.is_file() {
            let rel = e
                .path()
                .strip_prefix(base)
                .map(|p| p.to_string_lossy().replace('\\', "/"))
                .unwrap_or_default();
            out.push((rel, md));
        }
    }
}

async fn list_userdata(State(shared): S, Query(q): Q) -> Response {
    let Some(dir) = q.get("dir").filter(|d| !d.is_empty()) else {
        return text(StatusCode::BAD_REQUEST, "Directory not provided");
    };
    let Some(base) = safe_join(&user_dir(&shared), dir) else {
        return text(StatusCode::FORBIDDEN, "Invalid directory");
    };
    let (recurse, full, split) = (
        flag(&q, "recurse"),
        flag(&q, "full_info"),
        flag(&q, "split"),
    );
    let listed = tokio::task::spawn_blocking(move || {
        if !base.is_dir() {
            return None;
        }
        let mut files = Vec::new();
        walk(&base, &base, recurse, &mut files);
        Some(
            files
                .into_iter()
                .map(|(rel, md)| {
                    if full {
                        file_info(&rel, &md)
                    } else if split {
                        let mut parts = vec![json!(rel)];
                        parts.extend(rel.split('/').map(|s| json!(s)));
                        Value::Array(parts)
                    } else {
                        json!(rel)
                    }
                })
                .collect::<Vec<_>>(),
        )
    })
    .await;
    match listed {
        Ok(Some(files)) => json_response(StatusCode::OK, &Value::Array(files)),
        Ok(None) => text(StatusCode::NOT_FOUND, "Directory not found"),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// `file` below the user's folder, not the folder itself.
fn user_file(shared: &Shared, file: &str) -> Option<PathBuf> {
    let root = user_dir(shared);
    safe_join(&root, file).filter(|p| *p != root)
}

async fn get_userdata(State(shared): S, UrlPath(file): UrlPath<String>) -> Response {
    let Some(path) = user_file(&shared, &file) else {
        return StatusCode::FORBIDDEN.into_response();
    };
    match tokio::fs::read(&path).await {
        Ok(bytes) => {
            let ct = if file.ends_with(".json") {
                "application/json"
            } else if file.ends_with(".css") {
                "text/css"
            } else {
                "application/octet-stream"
            };
            ([(header::CONTENT_TYPE, ct)], bytes).into_response()
        }
        Err(_) => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn post_userdata(
    State(shared): S,
    UrlPath(file): UrlPath<String>,
    Query(q): Q,
    body: Bytes,
) -> Response {
    if file.is_empty() || file.ends_with('/') {
        return text(StatusCode::BAD_REQUEST, "Invalid file path");
    }
    let Some(path) = user_file(&shared, &file) else {
        return StatusCode::FORBIDDEN.into_response();
    };
    let _guard = shared.user_lock.lock().await;
    // ComfyUI: anything but "false" overwrites.
    let overwrite = q.get("overwrite").map(String::as_str) != Some("false");
    match tokio::fs::metadata(&path).await {
        Ok(md) if md.is_dir() => return text(StatusCode::CONFLICT, "A folder has that name"),
        Ok(_) if !overwrite => return text(StatusCode::CONFLICT, "File already exists"),
        _ => {}
    }
    let root = user_dir(&shared);
    if let Err(e) = write_atomic(&root, &path, &body).await {
        tracing::warn!(error = %e, file, "cannot write user data");
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    written(&root, &path, flag(&q, "full_info")).await
}

async fn written(root: &Path, path: &Path, full: bool) -> Response {
    let rel = path
        .strip_prefix(root)
        .map(|p| p.to_string_lossy().replace('\\', "/"))
        .unwrap_or_default();
    match (full, tokio::fs::metadata(path).await) {
        (true, Ok(md)) => json_response(StatusCode::OK, &file_info(&rel, &md)),
        _ => json_response(StatusCode::OK, &json!(rel)),
    }
}

async fn delete_userdata(State(shared): S, UrlPath(file): UrlPath<String>) -> Response {
    let Some(path) = user_file(&shared, &file) else {
        return StatusCode::FORBIDDEN.into_response();
    };
    let _guard = shared.user_lock.lock().await;
    match tokio::fs::symlink_metadata(&path).await {
        Ok(md) if md.is_file() => match tokio::fs::remove_file(&path).await {
            Ok(()) => StatusCode::NO_CONTENT.into_response(),
            Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        },
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn move_userdata(
    State(shared): S,
    UrlPath((file, dest)): UrlPath<(String, String)>,
    Query(q): Q,
) -> Response {
    let (Some(src), Some(dst)) = (user_file(&shared, &file), user_file(&shared, &dest)) else {
        return StatusCode::FORBIDDEN.into_response();
    };
    let _guard = shared.user_lock.lock().await;
    if !tokio::fs::metadata(&src).await.is_ok_and(|m| m.is_file()) {
        return StatusCode::NOT_FOUND.into_response();
    }
    let overwrite = q.get("overwrite").map(String::as_str) != Some("false");
    match tokio::fs::metadata(&dst).await {
        Ok(md) if md.is_dir() => return text(StatusCode::CONFLICT, "A folder has that name"),
        Ok(_) if !overwrite => return text(StatusCode::CONFLICT, "File already exists"),
        _ => {}
    }
    if let Some(parent) = dst.parent()
        && tokio::fs::create_dir_all(parent).await.is_err()
    {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    if tokio::fs::rename(&src, &dst).await.is_err() {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    written(&user_dir(&shared), &dst, flag(&q, "full_info")).await
}

/// `/extensions`: the frontend folder's `extensions/**/*.js`, as URLs.
async fn extensions(State(shared): S) -> Response {
    let Some(root) = shared.front_end_root.clone() else {
        return json_response(StatusCode::OK, &json!([]));
    };
    let found = tokio::task::spawn_blocking(move || {
        let mut files = Vec::new();
        let base = root.join("extensions");
        walk(&root, &base, true, &mut files);
        files
            .into_iter()
            .filter(|(rel, _)| rel.ends_with(".js"))
            .map(|(rel, _)| format!("/{rel}"))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    json_response(StatusCode::OK, &json!(found))
}

async fn model_files(State(shared): S, UrlPath(folder): UrlPath<String>) -> Response {
    if !MODEL_FOLDERS.contains(&folder.as_str()) {
        return StatusCode::NOT_FOUND.into_response();
    }
    json_response(StatusCode::OK, &json!(shared.catalog.model_files(&folder)))
}

async fn experiment_models() -> Response {
    let folders: Vec<Value> = MODEL_FOLDERS
        .iter()
        .filter(|f| !matches!(**f, "configs" | "custom_nodes"))
        .map(|f| json!({"name": f, "folders": [format!("models/{f}")]}))
        .collect();
    json_response(StatusCode::OK, &Value::Array(folders))
}

async fn experiment_model_files(State(shared): S, UrlPath(folder): UrlPath<String>) -> Response {
    if !MODEL_FOLDERS.contains(&folder.as_str())
        || matches!(folder.as_str(), "configs" | "custom_nodes")
    {
        return StatusCode::NOT_FOUND.into_response();
    }
    let files: Vec<Value> = shared
        .catalog
        .model_files(&folder)
        .into_iter()
        .map(|name| json!({"name": name, "pathIndex": 0}))
        .collect();
    json_response(StatusCode::OK, &Value::Array(files))
}
