//! The instructor's API under `/admin/api/`: steer the workshop queue at run
//! time (policy, per-participant priority levels, running caps) and see it.
//! Every route answers 403 to participants.

use axum::extract::{FromRequestParts, Path, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use comfyume_gateway::AppState;
use comfyume_gateway::auth::Caller;
use comfyume_scheduler::Policy;
use comfyume_store::{JobQuery, JobState, Role};
use serde::Deserialize;
use serde_json::json;

/// An authenticated instructor (role admin).
pub struct Instructor(pub String);

impl<S: Send + Sync> FromRequestParts<S> for Instructor {
    type Rejection = Response;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        match parts.extensions.get::<Caller>() {
            Some(Caller(u)) if u.role == Role::Admin => Ok(Instructor(u.name.clone())),
            Some(_) => Err((
                StatusCode::FORBIDDEN,
                Json(json!({"error": "instructors only"})),
            )
                .into_response()),
            None => Err(StatusCode::UNAUTHORIZED.into_response()),
        }
    }
}

fn bad(msg: impl Into<String>) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({"error": msg.into()}))).into_response()
}

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/admin/api/queue", get(queue_overview))
        .route("/admin/api/queue/policy", put(set_policy))
        .route("/admin/api/queue/limits", put(set_limits))
        .route("/admin/api/users/{name}/priority", put(set_user_priority))
        .route("/admin/api/jobs/{id}/priority", put(set_job_priority))
        .route("/admin/api/usage", get(storage_usage))
}

/// What each participant's files take (inputs, outputs) against `USER_QUOTA_BYTES`.
async fn storage_usage(State(state): State<AppState>, _: Instructor) -> Response {
    let users = match state.store.list_users().await {
        Ok(u) => u,
        Err(e) => return comfyume_gateway::error::ApiError::from(e).into_response(),
    };
    let quota = state.settings.user_quota_bytes;
    let mut out = Vec::new();
    for u in users.iter().filter(|u| u.role == Role::Participant) {
        let usage = comfyume_gateway::quota::usage(&state, &u.name).await;
        out.push(json!({
            "user": u.name,
            "inputs_bytes": usage.inputs,
            "outputs_bytes": usage.outputs,
            "used_bytes": usage.total(),
            "over_quota": quota.is_some_and(|q| usage.total() >= q),
        }));
    }
    Json(json!({"quota_bytes": quota, "users": out})).into_response()
}

/// The workshop queue as the scheduler would serve it, and what is running.
async fn queue_overview(State(state): State<AppState>, _: Instructor) -> Response {
    let order = state.queue.projected_order();
    let running = match state
        .store
        .list_jobs(&JobQuery {
            states: vec![JobState::Dispatched, JobState::Running],
            ..Default::default()
        })
        .await
    {
        Ok((jobs, _)) => jobs,
        Err(e) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"error": e.to_string()})),
            )
                .into_response();
        }
    };
    Json(json!({
        "policy": state.queue.policy().as_str(),
        "waiting": order.iter().map(|(id, user)| json!({"id": id, "user": user})).collect::<Vec<_>>(),
        "running": running.iter().map(|r| json!({
            "id": r.id, "user": r.user, "state": r.state.as_str(), "backend": r.backend, "attempts": r.attempts,
        })).collect::<Vec<_>>(),
    }))
    .into_response()
}

#[derive(Deserialize)]
struct PolicyBody {
    policy: String,
}

async fn set_policy(
    State(state): State<AppState>,
    who: Instructor,
    body: axum::body::Bytes,
) -> Response {
    let Ok(b) = serde_json::from_slice::<PolicyBody>(&body) else {
        return bad("expected {\"policy\": \"fifo\" | \"round_robin\" | \"priority\"}");
    };
    match b.policy.parse::<Policy>() {
        Ok(p) => {
            state.queue.set_policy(p);
            tracing::info!(instructor = %who.0, policy = %p, "queue policy changed");
            Json(json!({"policy": p.as_str()})).into_response()
        }
        Err(e) => bad(e.to_string()),
    }
}

#[derive(Deserialize)]
struct LimitsBody {
    max_running_per_user: Option<u32>,
    max_queued_per_user: Option<u32>,
    max_queue_depth: Option<u32>,
}

async fn set_limits(
    State(state): State<AppState>,
    who: Instructor,
    body: axum::body::Bytes,
) -> Response {
    let Ok(b) = serde_json::from_slice::<LimitsBody>(&body) else {
        return bad(
            "expected {\"max_running_per_user\"?, \"max_queued_per_user\"?, \"max_queue_depth\"?}",
        );
    };
    if let Some(n) = b.max_running_per_user {
        state.queue.set_max_running_per_user(n);
    }
    let mut l = state.queue.enqueue_limits();
    if let Some(n) = b.max_queued_per_user {
        l.max_queued_per_user = n;
    }
    if let Some(n) = b.max_queue_depth {
        l.max_queue_depth = n;
    }
    state.queue.set_enqueue_limits(l);
    tracing::info!(instructor = %who.0, "queue limits changed");
    Json(
        json!({"max_queued_per_user": l.max_queued_per_user, "max_queue_depth": l.max_queue_depth}),
    )
    .into_response()
}

#[derive(Deserialize)]
struct PriorityBody {
    level: Option<u8>,
}

async fn set_user_priority(
    State(state): State<AppState>,
    who: Instructor,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let Ok(b) = serde_json::from_slice::<PriorityBody>(&body) else {
        return bad("expected {\"level\": 0-3 | null}");
    };
    match state.store.get_user(&name).await {
        Ok(Some(_)) => {}
        Ok(None) => {
            return (
                StatusCode::NOT_FOUND,
                Json(json!({"error": "no such participant"})),
            )
                .into_response();
        }
        Err(e) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"error": e.to_string()})),
            )
                .into_response();
        }
    }
    match state.queue.set_user_priority(&name, b.level) {
        Ok(()) => {
            tracing::info!(instructor = %who.0, user = %name, level = ?b.level, "participant priority changed");
            Json(json!({"user": name, "level": b.level})).into_response()
        }
        Err(e) => bad(e.to_string()),
    }
}

async fn set_job_priority(
    State(state): State<AppState>,
    who: Instructor,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let Ok(b) = serde_json::from_slice::<PriorityBody>(&body) else {
        return bad("expected {\"level\": 0-3 | null}");
    };
    match state.queue.set_job_priority(&id, b.level).await {
        Ok(_) => {
            tracing::info!(instructor = %who.0, job = %id, level = ?b.level, "job priority changed");
            Json(json!({"id": id, "level": b.level})).into_response()
        }
        Err(comfyume_dispatch::QueueError::Store(comfyume_store::StoreError::NotFound)) => {
            (StatusCode::NOT_FOUND, Json(json!({"error": "no such job"}))).into_response()
        }
        Err(comfyume_dispatch::QueueError::Store(comfyume_store::StoreError::Conflict(_))) => (
            StatusCode::CONFLICT,
            Json(json!({"error": "the job is no longer waiting"})),
        )
            .into_response(),
        Err(e) => bad(e.to_string()),
    }
}
