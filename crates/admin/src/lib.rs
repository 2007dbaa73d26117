//! The instructor's dashboard and API.
//!
//! - `/admin` (and `/admin/room`, the projector's large-type view): a page rendered here
//!   plus a small script served by the binary, live over one WebSocket (`/admin/ws`) that
//!   pushes every change to the page ([`dashboard`]).
//! - `/admin/api/*`: everything the page does, for scripts too, described by the OpenAPI
//!   document at `/admin/api/openapi.json` ([`openapi`], generated from the route table
//!   the router is checked against).
//!
//! Every route needs the admin role (participants 403, anonymous 401 or the login page).
//! A state change made with a session cookie needs the session's CSRF token in
//! `X-CSRF-Token` ([`csrf`]); scripts use Basic credentials instead. Every action is written
//! to the audit log in the store ([`audit`]). Queue policy, limits, pause, priorities and the
//! front list are kept in the store and restored at start ([`settings`]).
//!
//! The serverless GPUs (routing, warm-up, state, costs) are in [`serverless`].

pub mod serverless;

mod actions;
pub mod audit;
pub mod csrf;
pub mod dashboard;
pub mod export;
pub mod openapi;
pub mod page;
mod people;
pub mod settings;
pub mod system;
mod thumbs;

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Json, Router};
use comfyume_dispatch::Dispatcher;
use comfyume_gateway::AppState;
use comfyume_gateway::auth::{Caller, Participant};
use comfyume_store::Role;
use serde_json::json;

/// An authenticated instructor (role admin). For a state change made with a session cookie,
/// the session's CSRF token must come along (see [`csrf`]).
pub struct Instructor(pub String);

impl<S: Send + Sync> FromRequestParts<S> for Instructor {
    type Rejection = Response;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let name = match parts.extensions.get::<Caller>() {
            Some(Caller(u)) if u.role == Role::Admin => u.name.clone(),
            Some(_) => {
                return Err((
                    StatusCode::FORBIDDEN,
                    Json(json!({"error": "instructors only"})),
                )
                    .into_response());
            }
            None => return Err(StatusCode::UNAUTHORIZED.into_response()),
        };
        let safe = matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS);
        let by_cookie = parts
            .extensions
            .get::<Participant>()
            .is_some_and(|p| p.session.is_some());
        if !safe && by_cookie && !csrf::check(&parts.headers) {
            return Err((
                StatusCode::FORBIDDEN,
                Json(json!({"error": "missing or wrong CSRF token: send the page's token in X-CSRF-Token, or use Basic credentials"})),
            )
                .into_response());
        }
        Ok(Instructor(name))
    }
}

pub(crate) fn bad(msg: impl Into<String>) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({"error": msg.into()}))).into_response()
}

pub(crate) fn not_found(msg: impl Into<String>) -> Response {
    (StatusCode::NOT_FOUND, Json(json!({"error": msg.into()}))).into_response()
}

pub(crate) fn conflict(msg: impl Into<String>) -> Response {
    (StatusCode::CONFLICT, Json(json!({"error": msg.into()}))).into_response()
}

pub(crate) fn unavailable(e: impl std::fmt::Display) -> Response {
    tracing::warn!(error = %e, "admin API: storage unavailable");
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({"error": format!("storage unavailable: {e}")})),
    )
        .into_response()
}

/// What the instructor's routes share beyond the gateway's state.
#[derive(Clone)]
pub struct Admin {
    /// The dispatcher (backends, node definitions); `None` in tools without one.
    pub dispatcher: Option<Arc<Dispatcher>>,
    pub dashboard: Arc<dashboard::Dashboard>,
    pub(crate) thumbs: Arc<thumbs::Thumbs>,
}

impl Admin {
    /// Starts the dashboard's model (a supervised background task) over `state`.
    pub fn new(state: &AppState, dispatcher: Option<Arc<Dispatcher>>) -> Self {
        let dashboard = dashboard::Dashboard::start(state.clone(), dispatcher.clone());
        Admin {
            dispatcher,
            dashboard,
            thumbs: Arc::new(thumbs::Thumbs::default()),
        }
    }
}

/// [`routes`] and the serverless GPUs' routes (answering 404 when `serverless` is `None`).
pub fn routes_with(
    admin: Admin,
    serverless: Option<Arc<comfyume_serverless::ServerlessBackend>>,
) -> Router<AppState> {
    routes(admin).merge(serverless::routes(serverless))
}

/// Every route of the dashboard and the admin API (behind the gateway's authentication).
pub fn routes(admin: Admin) -> Router<AppState> {
    Router::new()
        .route("/admin", get(page::dashboard_page))
        .route("/admin/", get(page::dashboard_page))
        .route("/admin/room", get(page::room_page))
        .route("/admin/assets/{file}", get(page::asset))
        .route("/admin/ws", get(dashboard::ws_handler))
        .route("/admin/api/openapi.json", get(openapi::document))
        .route("/admin/api/dashboard", get(dashboard::snapshot))
        .route("/admin/api/queue", get(actions::queue_overview))
        .route("/admin/api/queue/policy", put(actions::set_policy))
        .route("/admin/api/queue/limits", put(actions::set_limits))
        .route("/admin/api/queue/pause", post(actions::pause))
        .route("/admin/api/queue/resume", post(actions::resume))
        .route("/admin/api/queue/cancel", post(actions::cancel_waiting))
        .route("/admin/api/jobs/{id}/cancel", post(actions::cancel_job))
        .route("/admin/api/jobs/{id}/front", post(actions::move_to_front))
        .route("/admin/api/jobs/{id}/retry", post(actions::retry_job))
        .route(
            "/admin/api/jobs/{id}/priority",
            put(actions::set_job_priority),
        )
        .route("/admin/api/users", get(people::list).post(people::create))
        .route("/admin/api/usage", get(people::storage_usage))
        .route("/admin/api/users/{name}/disable", post(people::disable))
        .route("/admin/api/users/{name}/enable", post(people::enable))
        .route(
            "/admin/api/users/{name}/password",
            post(people::reset_password),
        )
        .route("/admin/api/users/{name}/cancel", post(actions::cancel_user))
        .route(
            "/admin/api/users/{name}/priority",
            put(actions::set_user_priority),
        )
        .route("/admin/api/users/{name}/export.zip", get(export::user_zip))
        .route("/admin/api/export.zip", get(export::everyone_zip))
        .route(
            "/admin/api/broadcast",
            get(actions::get_broadcast)
                .post(actions::set_broadcast)
                .delete(actions::clear_broadcast),
        )
        .route(
            "/admin/api/room",
            put(actions::set_room).delete(actions::clear_room),
        )
        .route("/admin/api/audit", get(audit::list))
        .route("/admin/api/gpus", get(actions::gpus))
        .route(
            "/admin/api/object-info/refresh",
            post(actions::refresh_object_info),
        )
        .route("/admin/api/system", get(system::get))
        .route("/admin/api/thumb", get(thumbs::thumb))
        // The participant's side of the broadcast: their banner asks at page load.
        .route(
            "/api/comfyume/broadcast",
            get(actions::participant_broadcast),
        )
        .route("/comfyume/broadcast", get(actions::participant_broadcast))
        .layer(Extension(admin))
}

/// Records, after the fact, a successful state change under `/admin/api/` that its handler
/// did not audit itself (routes added by other parts, e.g. the serverless GPUs). Wrap the
/// whole admin router with it.
pub fn audited(router: Router<AppState>, state: &AppState, admin: &Admin) -> Router<AppState> {
    router.layer(axum::middleware::from_fn_with_state(
        (state.clone(), admin.clone()),
        audit::fallback_layer,
    ))
}
