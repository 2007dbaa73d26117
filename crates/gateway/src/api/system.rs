//! The small, mostly constant routes the frontend reads at start.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::auth::Participant;
use crate::state::AppState;

pub const COMFYUI_VERSION: &str = "0.11.0";
pub const FRONTEND_VERSION: &str = "1.37.11";
pub const TEMPLATES_VERSION: &str = "0.8.24";

/// ComfyUI's model folder keys (`GET /models`).
pub use comfyume_wire::models::MODEL_FOLDERS;

async fn meminfo() -> (u64, u64) {
    // /proc/meminfo is Linux-only; elsewhere report zeros rather than fail.
    let text = crate::fsx::meminfo().await;
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .unwrap_or(0)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

pub async fn system_stats(State(state): State<AppState>) -> Json<Value> {
    let (total, free) = meminfo().await;
    Json(json!({
        "system": {
            "os": std::env::consts::OS,
            "ram_total": total,
            "ram_free": free,
            "comfyui_version": COMFYUI_VERSION,
            "required_frontend_version": FRONTEND_VERSION,
            "installed_templates_version": TEMPLATES_VERSION,
            "required_templates_version": TEMPLATES_VERSION,
            "python_version": format!("ComfyUMe {} (Rust; no Python)", env!("CARGO_PKG_VERSION")),
            "pytorch_version": "none (jobs run on the workshop's GPU backends)",
            "embedded_python": false,
            "argv": ["comfyume", "serve"],
        },
        "devices": [{
            "name": format!("workshop queue -> {}", state.settings.backend_label),
            "type": "cpu",
            "index": null,
            "vram_total": 0,
            "vram_free": 0,
            "torch_vram_total": 0,
            "torch_vram_free": 0,
        }]
    }))
}

pub async fn features(State(state): State<AppState>) -> Json<Value> {
    Json(crate::ws::feature_flags(&state))
}

/// Single-user shape, so the frontend shows no user picker: the login is ours.
pub async fn users() -> Json<Value> {
    Json(json!({"storage": "server", "migrated": true}))
}

/// Accounts are created by the instructor, not from the frontend.
pub async fn create_user() -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"error": "Accounts are managed by the workshop instructor."})),
    )
        .into_response()
}

pub async fn empty_list() -> Json<Value> {
    Json(json!([]))
}

pub async fn empty_object() -> Json<Value> {
    Json(json!({}))
}

pub async fn extensions(State(state): State<AppState>) -> Json<Value> {
    Json(json!(state.extensions.as_slice()))
}

pub async fn models() -> Json<Value> {
    Json(json!(MODEL_FOLDERS))
}

/// The model files of `folder` the backends have; `None` for a folder ComfyUI does not have.
fn folder_files(state: &AppState, folder: &str) -> Option<Vec<String>> {
    MODEL_FOLDERS.contains(&folder).then(|| {
        state
            .object_info()
            .models
            .get(folder)
            .cloned()
            .unwrap_or_default()
    })
}

/// `/models/{folder}`: the file names, as ComfyUI lists them; an unknown folder is a 404.
pub async fn models_folder(State(state): State<AppState>, Path(folder): Path<String>) -> Response {
    match folder_files(&state, &folder) {
        Some(files) => Json(json!(files)).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// Model files live on the GPU servers; the node definitions carry their lists.
pub async fn experiment_models() -> Json<Value> {
    Json(Value::Array(
        MODEL_FOLDERS
            .iter()
            .filter(|f| !matches!(**f, "configs" | "custom_nodes"))
            .map(|f| json!({"name": f, "folders": []}))
            .collect(),
    ))
}

/// `/experiment/models/{folder}` (the Model Library): `[{name, pathIndex}]`. The files are
/// on the GPU servers, so their sizes and times are not known here and not made up.
pub async fn experiment_models_folder(
    State(state): State<AppState>,
    Path(folder): Path<String>,
) -> Response {
    match folder_files(&state, &folder) {
        Some(files) => Json(Value::Array(
            files
                .into_iter()
                .map(|name| json!({"name": name, "pathIndex": 0}))
                .collect(),
        ))
        .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// `/experiment/models/preview/{folder}/{index}/{file}.webp`: the Model Library's picture of
/// a model. ComfyUI sends a preview image found beside the weights (404 without one); the
/// weights are on the GPU servers, so a model they have gets a title card with its name
/// and folder (a PNG, so labelled), anything else 404.
pub async fn model_preview(
    State(state): State<AppState>,
    Path((folder, index, file)): Path<(String, String, String)>,
) -> Response {
    let Some(stem) = file.strip_suffix(".webp").filter(|_| index == "0") else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let known = folder_files(&state, &folder).is_some_and(|files| {
        files
            .iter()
            .any(|f| f.rsplit_once('.').map(|(s, _)| s) == Some(stem))
    });
    if !known {
        return StatusCode::NOT_FOUND.into_response();
    }
    let png = crate::templates::generated_thumbnail(&format!("{stem} - {folder}")).await;
    (
        [
            (axum::http::header::CONTENT_TYPE, "image/png"),
            (axum::http::header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        png,
    )
        .into_response()
}

#[derive(serde::Deserialize)]
pub struct MetadataQuery {
    filename: Option<String>,
}

/// `/view_metadata/{folder}?filename=`: ComfyUI answers a known `.safetensors` file's
/// `__metadata__` and 404 for anything else. The weights are on the GPU servers, whose
/// metadata this server has not read: a file the backends have answers `{}` (no metadata
/// known, which the Model Library shows as the bare file name); everything else 404.
pub async fn view_metadata(
    State(state): State<AppState>,
    Path(folder): Path<String>,
    Query(q): Query<MetadataQuery>,
) -> Response {
    let known = q.filename.as_deref().is_some_and(|f| {
        f.ends_with(".safetensors")
            && folder_files(&state, &folder).is_some_and(|files| files.iter().any(|x| x == f))
    });
    if known {
        Json(json!({})).into_response()
    } else {
        StatusCode::NOT_FOUND.into_response()
    }
}

pub async fn not_found() -> StatusCode {
    StatusCode::NOT_FOUND
}

pub async fn ok_empty() -> StatusCode {
    StatusCode::OK
}

/// `/internal/logs`: server logs are the instructor's, not the participants'.
pub async fn internal_logs() -> Json<Value> {
    Json(json!(""))
}

pub async fn internal_logs_raw() -> Json<Value> {
    Json(json!({"entries": [], "size": {"cols": 80, "rows": 24}}))
}

pub async fn internal_folder_paths() -> Json<Value> {
    Json(json!({}))
}

/// `/internal/files/{type}`: the participant's own files, newest first.
pub async fn internal_files(
    State(state): State<AppState>,
    who: Participant,
    Path(kind): Path<String>,
) -> Response {
    let dirs = state.user_dirs(&who.name);
    let dir = match kind.as_str() {
        "input" => dirs.inputs,
        "output" => dirs.outputs,
        "temp" => dirs.temp,
        _ => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": "Invalid directory type"})),
            )
                .into_response();
        }
    };
    let mut files = crate::api::files::list_files(&dir).await;
    // ComfyUI scans only the folder itself (os.scandir), not subfolders.
    files.retain(|(name, _)| !name.contains('/'));
    files.sort_by_key(|f| std::cmp::Reverse(f.1));
    Json(json!(files.into_iter().map(|(n, _)| n).collect::<Vec<_>>())).into_response()
}
