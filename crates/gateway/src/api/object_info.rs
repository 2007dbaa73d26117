//! `/object_info`: the cached node definitions, with each participant's own
//! input files as the choices of file-loading inputs.

use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::auth::Participant;
use crate::state::AppState;

pub async fn participant_object_info(state: &AppState, user: &str) -> Value {
    let base = state.object_info();
    let files = crate::api::files::user_files(state, user).await;
    comfyume_wire::object_info::participant_view(&base, &files)
}

fn json_response(v: &Value) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
        serde_json::to_vec(v).unwrap_or_default(),
    )
        .into_response()
}

pub async fn all(State(state): State<AppState>, who: Participant) -> Response {
    json_response(&participant_object_info(&state, &who.name).await)
}

pub async fn one(State(state): State<AppState>, who: Participant, Path(class): Path<String>) -> Response {
    let view = participant_object_info(&state, &who.name).await;
    // ComfyUI answers an unknown class with 200 {}.
    match view.get(&class) {
        Some(info) => json_response(&json!({ class: info })),
        None => json_response(&json!({})),
    }
}
