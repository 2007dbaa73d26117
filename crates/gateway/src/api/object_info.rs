//! `/object_info`: the cached node definitions, with each participant's own
//! input files as the choices of file-loading inputs.

use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::auth::Participant;
use crate::state::AppState;

fn json_response(v: &Value) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
        serde_json::to_vec(v).unwrap_or_default(),
    )
        .into_response()
}

pub async fn all(State(state): State<AppState>, who: Participant) -> Response {
    // Pre-serialised template: a copy of the document plus the few patched nodes.
    let defs = state.object_info();
    let files = crate::api::files::user_files(&state, &who.name).await;
    let body = defs.view.render(&files);
    (
        [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
        body,
    )
        .into_response()
}

pub async fn one(
    State(state): State<AppState>,
    who: Participant,
    Path(class): Path<String>,
) -> Response {
    let defs = state.object_info();
    // ComfyUI answers an unknown class with 200 {}.
    let Some(node) = defs.info.get(&class) else {
        return json_response(&json!({}));
    };
    let files = crate::api::files::user_files(&state, &who.name).await;
    let node =
        comfyume_wire::participant_node(&class, node, &files).unwrap_or_else(|| node.clone());
    json_response(&json!({ class: node }))
}
