//! `/settings`: the participant's `comfy.settings.json`, read and merged under a
//! per-participant lock and written atomically (no lost or half-written update
//! when the frontend posts several settings at once).

use axum::Extension;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde_json::{Map, Value};

use crate::api::write_atomic;
use crate::auth::Participant;
use crate::error::{ApiError, ApiResult};
use crate::limits::{JsonBody, Limits};
use crate::state::AppState;

const FILE: &str = "comfy.settings.json";

async fn read_settings(state: &AppState, user: &str) -> ApiResult<Map<String, Value>> {
    let path = state.user_dirs(user).user_data.join(FILE);
    match tokio::fs::read(&path).await {
        Ok(bytes) => match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(m)) => Ok(m),
            // A damaged file must not lock the participant out of their UI.
            _ => {
                tracing::warn!(user, "settings file is not a JSON object; starting afresh");
                Ok(Map::new())
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Map::new()),
        Err(e) => Err(e.into()),
    }
}

async fn write_settings(
    state: &AppState,
    user: &str,
    m: &Map<String, Value>,
    limits: &Limits,
) -> ApiResult<()> {
    let path = state.user_dirs(user).user_data.join(FILE);
    let bytes = serde_json::to_vec_pretty(m).map_err(|e| ApiError::bad_request(e.to_string()))?;
    // Each request is bounded; so is what they add up to (read whole on every page load).
    if bytes.len() > limits.max_json_body {
        return Err(ApiError::Text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "Your settings would exceed this server's limit ({} MB); nothing was changed.",
                limits.max_json_body / (1024 * 1024)
            ),
        ));
    }
    write_atomic(&path, &bytes).await?;
    Ok(())
}

fn parse_json(body: &[u8]) -> ApiResult<Value> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("Invalid JSON body: {e}")))
}

pub async fn get_all(State(state): State<AppState>, who: Participant) -> ApiResult<Json<Value>> {
    Ok(Json(Value::Object(read_settings(&state, &who.name).await?)))
}

pub async fn get_one(
    State(state): State<AppState>,
    who: Participant,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let m = read_settings(&state, &who.name).await?;
    Ok(Json(m.get(&id).cloned().unwrap_or(Value::Null)))
}

pub async fn post_all(
    State(state): State<AppState>,
    who: Participant,
    Extension(limits): Extension<Limits>,
    JsonBody(body): JsonBody,
) -> ApiResult<StatusCode> {
    let Value::Object(new) = parse_json(&body)? else {
        return Err(ApiError::bad_request("Settings must be a JSON object"));
    };
    let lock = state.settings_lock(&who.name);
    let _g = lock.lock().await;
    let mut m = read_settings(&state, &who.name).await?;
    m.extend(new);
    write_settings(&state, &who.name, &m, &limits).await?;
    Ok(StatusCode::OK)
}

pub async fn post_one(
    State(state): State<AppState>,
    who: Participant,
    Extension(limits): Extension<Limits>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody,
) -> ApiResult<StatusCode> {
    let v = parse_json(&body)?;
    let lock = state.settings_lock(&who.name);
    let _g = lock.lock().await;
    let mut m = read_settings(&state, &who.name).await?;
    m.insert(id, v);
    write_settings(&state, &who.name, &m, &limits).await?;
    Ok(StatusCode::OK)
}
