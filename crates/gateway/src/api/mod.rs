//! The participant-facing ComfyUI API. ComfyUI registers each route twice, at
//! `/X` and at `/api/X`; so do we.

pub mod assets;
pub mod files;
pub mod object_info;
pub mod queue;
pub mod settings;
pub mod system;
pub mod userdata;

use axum::Router;
use axum::routing::{get, post};

use crate::state::AppState;

pub use crate::fsx::write_atomic;

/// Routes that exist both at the root and under `/api`.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/ws", get(crate::ws::ws_handler))
        .route("/system_stats", get(system::system_stats))
        .route("/features", get(system::features))
        .route("/users", get(system::users).post(system::create_user))
        .route("/settings", get(settings::get_all).post(settings::post_all))
        .route(
            "/settings/{id}",
            get(settings::get_one).post(settings::post_one),
        )
        .route("/userdata", get(userdata::list))
        .route(
            "/userdata/{file}",
            get(userdata::get_file)
                .post(userdata::post_file)
                .delete(userdata::delete_file),
        )
        .route("/userdata/{file}/move/{dest}", post(userdata::move_file))
        .route("/v2/userdata", get(userdata::list_v2))
        .route("/extensions", get(system::extensions))
        .route("/i18n", get(system::empty_object))
        .route("/embeddings", get(system::empty_list))
        .route("/models", get(system::models))
        .route("/models/{folder}", get(system::models_folder))
        .route("/experiment/models", get(system::experiment_models))
        .route(
            "/experiment/models/{folder}",
            get(system::experiment_models_folder),
        )
        .route(
            "/experiment/models/preview/{folder}/{index}/{file}",
            get(system::model_preview),
        )
        .route("/global_subgraphs", get(system::empty_object))
        .route("/global_subgraphs/{id}", get(system::not_found))
        .route("/workflow_templates", get(system::empty_object))
        .route("/object_info", get(object_info::all))
        .route("/object_info/{class}", get(object_info::one))
        .route("/upload/image", post(files::upload_image))
        .route("/upload/mask", post(files::upload_mask))
        .route("/view", get(files::view))
        .route("/view_metadata/{folder}", get(system::view_metadata))
        .route("/prompt", get(queue::get_prompt).post(queue::post_prompt))
        .route("/queue", get(queue::get_queue).post(queue::post_queue))
        .route(
            "/history",
            get(queue::get_history).post(queue::post_history),
        )
        .route("/history/{id}", get(queue::get_history_one))
        .route("/interrupt", post(queue::post_interrupt))
        .route("/free", post(queue::post_free))
        // Declared as /api/jobs in ComfyUI, so they also answer at /api/api/jobs.
        .route("/api/jobs", get(queue::get_jobs))
        .route("/api/jobs/{id}", get(queue::get_job))
}

/// ComfyUI's asset API (`app/assets`): added to the app directly, so at `/api/...` only.
pub fn assets_routes() -> Router<AppState> {
    Router::new()
        .route("/api/assets", get(assets::list))
        .route("/api/assets/{id}", get(assets::get_one))
        .route("/api/assets/{id}/content", get(assets::content))
        .route("/api/tags", get(assets::tags_list))
}

/// ComfyUI's `/internal` sub-app: at the root only, never under `/api`.
pub fn internal_routes() -> Router<AppState> {
    Router::new()
        .route("/internal/logs", get(system::internal_logs))
        .route("/internal/logs/raw", get(system::internal_logs_raw))
        .route(
            "/internal/logs/subscribe",
            axum::routing::patch(system::ok_empty),
        )
        .route("/internal/folder_paths", get(system::internal_folder_paths))
        .route("/internal/files/{kind}", get(system::internal_files))
}
