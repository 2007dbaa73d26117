//! The instructor's actions on the queue, the jobs, the broadcast, the room view and the
//! GPUs. Each is audited and, where it changes a setting, saved (see [`crate::settings`]).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use comfyume_dispatch::{CancelOutcome, QueueError};
use comfyume_gateway::AppState;
use comfyume_gateway::auth::Participant;
use comfyume_scheduler::Policy;
use comfyume_store::{JobState, NewJob, StoreError};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::audit::{done, record};
use crate::dashboard::Section;
use crate::{Admin, Instructor, bad, conflict, not_found, settings, unavailable};

/// A JSON body of type `T`, or the message of a 400 naming what was expected.
fn body<T: serde::de::DeserializeOwned>(bytes: &[u8], expected: &str) -> Result<T, String> {
    serde_json::from_slice(bytes).map_err(|e| format!("{expected} ({e})"))
}

/// Saves the queue settings after a change; whether that worked.
async fn save(state: &AppState) -> bool {
    match settings::save_queue(state).await {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(error = %e, "could not save the queue settings; they hold until a restart");
            false
        }
    }
}

fn queue_error(e: QueueError) -> Response {
    match e {
        QueueError::Store(StoreError::NotFound) => not_found("no such job"),
        QueueError::Store(StoreError::Conflict(m)) => conflict(m),
        QueueError::Store(StoreError::Limit(l)) => (
            StatusCode::TOO_MANY_REQUESTS,
            Json(json!({"error": format!("queue limit: {l}")})),
        )
            .into_response(),
        QueueError::InvalidLevel(_) => bad(e.to_string()),
        other => unavailable(other),
    }
}

/// `GET /admin/api/queue`: the workshop queue in the order the scheduler will serve it, and
/// what runs.
pub async fn queue_overview(Extension(admin): Extension<Admin>, _: Instructor) -> Response {
    match admin.dashboard.queue_section().await {
        Ok(v) => Json(v).into_response(),
        Err(e) => unavailable(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyBody {
    policy: String,
}

/// `PUT /admin/api/queue/policy` `{"policy": "fifo" | "round_robin" | "priority"}`.
pub async fn set_policy(
    State(state): State<AppState>,
    Extension(admin): Extension<Admin>,
    who: Instructor,
    bytes: axum::body::Bytes,
) -> Response {
    let b: PolicyBody = match body(
        &bytes,
        "expected {\"policy\": \"fifo\" | \"round_robin\" | \"priority\"}",
    ) {
        Ok(b) => b,
        Err(m) => return bad(m),
    };
    let p = match b.policy.parse::<Policy>() {
        Ok(p) => p,
        Err(e) => return bad(e.to_string()),
    };
    let before = state.queue.policy();
    state.queue.set_policy(p);
    let saved = save(&state).await;
    record(
        &state,
        &admin,
        &who.0,
        "queue.policy",
        None,
        json!({"from": before.as_str(), "to": p.as_str()}),
    )
    .await;
    done(Json(json!({"policy": p.as_str(), "saved": saved})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsBody {
    max_running_per_user: Option<u32>,
    max_queued_per_user: Option<u32>,
    max_queue_depth: Option<u32>,
}

/// The largest value any limit takes (0 means "no limit" for the two queue caps).
const MAX_LIMIT: u32 = 100_000;

/// `PUT /admin/api/queue/limits`: any of `max_running_per_user` (1..), `max_queued_per_user`,
/// `max_queue_depth` (0: no limit).
pub async fn set_limits(
    State(state): State<AppState>,
    Extension(admin): Extension<Admin>,
    who: Instructor,
    bytes: axum::body::Bytes,
) -> Response {
    let b: LimitsBody = match body(
        &bytes,
        "expected {\"max_running_per_user\"?, \"max_queued_per_user\"?, \"max_queue_depth\"?}",
    ) {
        Ok(b) => b,
        Err(m) => return bad(m),
    };
    if b.max_running_per_user.is_none()
        && b.max_queued_per_user.is_none()
        && b.max_queue_depth.is_none()
    {
        return bad(
            "name at least one of max_running_per_user, max_queued_per_user, max_queue_depth",
        );
    }
    if b.max_running_per_user == Some(0) {
        return bad("max_running_per_user must be at least 1 (pause the queue to hold every job)");
    }
    for v in [
        b.max_running_per_user,
        b.max_queued_per_user,
        b.max_queue_depth,
    ]
    .into_iter()
    .flatten()
    {
        if v > MAX_LIMIT {
            return bad(format!("limits go up to {MAX_LIMIT}"));
        }
    }
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
    let saved = save(&state).await;
    let s = state.queue.settings();
    let now = json!({
        "max_running_per_user": s.max_running_per_user,
        "max_queued_per_user": s.max_queued_per_user,
        "max_queue_depth": s.max_queue_depth,
    });
    record(&state, &admin, &who.0, "queue.limits", None, now.clone()).await;
    let mut out = now;
    out["saved"] = json!(saved);
    done(Json(out))
}

/// `POST /admin/api/queue/pause`: no new job starts; running jobs finish.
pub async fn pause(
    State(state): State<AppState>,
    Extension(admin): Extension<Admin>,
    who: Instructor,
) -> Response {
    state.queue.pause();
    let saved = save(&state).await;
    record(&state, &admin, &who.0, "queue.pause", None, json!({})).await;
    done(Json(json!({"paused": true, "saved": saved})))
}

/// `POST /admin/api/queue/resume`.
pub async fn resume(
    State(state): State<AppState>,
    Extension(admin): Extension<Admin>,
    who: Instructor,
) -> Response {
    state.queue.resume();
    let saved = save(&state).await;
    record(&state, &admin, &who.0, "queue.resume", None, json!({})).await;
    done(Json(json!({"paused": false, "saved": saved})))
}

/// `POST /admin/api/queue/cancel`: cancels every waiting job of everyone (running jobs go on).
pub async fn cancel_waiting(
    State(state): State<AppState>,
    Extension(admin): Extension<Admin>,
    who: Instructor,
) -> Response {
    match state.queue.cancel_all_waiting().await {
        Ok(by_user) => {
            let n: usize = by_user.values().map(Vec::len).sum();
            record(
                &state,
                &admin,
                &who.0,
                "queue.cancel_waiting",
                None,
                json!({"cancelled": n, "participants": by_user.keys().collect::<Vec<_>>()}),
            )
            .await;
            done(Json(json!({"cancelled": n, "by_participant": by_user})))
        }
        Err(e) => queue_error(e),
    }
}

/// `POST /admin/api/jobs/{id}/cancel`: a waiting job is cancelled, a running one stopped.
pub async fn cancel_job(
    State(state): State<AppState>,
    Extension(admin): Extension<Admin>,
    who: Instructor,
    Path(id): Path<String>,
) -> Response {
    match state.queue.cancel_any(&id).await {
        Ok(outcome) => {
            let (how, user) = match outcome {
                CancelOutcome::Cancelled(u) => ("cancelled", u),
                CancelOutcome::Interrupted(u) => ("interrupted", u),
            };
            record(
                &state,
                &admin,
                &who.0,
                "job.cancel",
                Some(&id),
                json!({"participant": user, "outcome": how}),
            )
            .await;
            done(Json(json!({"id": id, "user": user, "outcome": how})))
        }
        Err(e) => queue_error(e),
    }
}

/// `POST /admin/api/users/{name}/cancel`: all of a participant's jobs (waiting cancelled,
/// running stopped).
pub async fn cancel_user(
    State(state): State<AppState>,
    Extension(admin): Extension<Admin>,
    who: Instructor,
    Path(name): Path<String>,
) -> Response {
    match state.store.get_user(&name).await {
        Ok(Some(_)) => {}
        Ok(None) => return not_found("no such participant"),
        Err(e) => return unavailable(e),
    }
    let cancelled = match state.queue.clear_queued(&name).await {
        Ok(ids) => ids,
        Err(e) => return queue_error(e),
    };
    let stopped = state.queue.interrupt(&name, None);
    record(
        &state,
        &admin,
        &who.0,
        "user.cancel_jobs",
        Some(&name),
        json!({"cancelled": cancelled.len(), "stopped": stopped}),
    )
    .await;
    done(Json(
        json!({"user": name, "cancelled": cancelled, "stopped": stopped}),
    ))
}

/// `POST /admin/api/jobs/{id}/front`: runs next (see the scheduler's front list).
pub async fn move_to_front(
    State(state): State<AppState>,
    Extension(admin): Extension<Admin>,
    who: Instructor,
    Path(id): Path<String>,
) -> Response {
    if !state.queue.move_to_front(&id) {
        return match state.store.get_job(&id).await {
            Ok(Some(r)) => conflict(format!("job {id} is {}, not waiting", r.state)),
            Ok(None) => not_found("no such job"),
            Err(e) => unavailable(e),
        };
    }
    let saved = save(&state).await;
    let position = state.queue.position(&id);
    record(&state, &admin, &who.0, "job.front", Some(&id), json!({})).await;
    done(Json(
        json!({"id": id, "position": position, "saved": saved}),
    ))
}

/// `POST /admin/api/jobs/{id}/retry`: a failed, interrupted or cancelled job runs again, as
/// a new job of the same participant (same workflow, same tab); its id is answered.
pub async fn retry_job(
    State(state): State<AppState>,
    Extension(admin): Extension<Admin>,
    who: Instructor,
    Path(id): Path<String>,
) -> Response {
    let rec = match state.store.get_job(&id).await {
        Ok(Some(r)) => r,
        Ok(None) => return not_found("no such job"),
        Err(e) => return unavailable(e),
    };
    if !matches!(
        rec.state,
        JobState::Failed | JobState::Interrupted | JobState::Cancelled
    ) {
        return conflict(format!(
            "job {id} is {}; only failed, interrupted or cancelled jobs are retried",
            rec.state
        ));
    }
    let new_id = uuid::Uuid::new_v4().to_string();
    let job = NewJob {
        id: new_id.clone(),
        user: rec.user.clone(),
        number: state.queue.next_number() as f64,
        priority: rec.priority,
        prompt: rec.prompt.clone(),
        extra_data: rec.extra_data.clone(),
        outputs_to_execute: rec.outputs_to_execute.clone(),
        client_id: rec.client_id.clone(),
    };
    match state.queue.submit(job).await {
        Ok(new) => {
            record(
                &state,
                &admin,
                &who.0,
                "job.retry",
                Some(&id),
                json!({"participant": rec.user, "new_job": new.id}),
            )
            .await;
            done(Json(json!({"id": id, "new_id": new.id, "user": new.user})))
        }
        Err(e) => queue_error(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PriorityBody {
    level: Option<u8>,
}

/// `PUT /admin/api/jobs/{id}/priority` `{"level": 0-3 | null}` (a waiting job).
pub async fn set_job_priority(
    State(state): State<AppState>,
    Extension(admin): Extension<Admin>,
    who: Instructor,
    Path(id): Path<String>,
    bytes: axum::body::Bytes,
) -> Response {
    let b: PriorityBody = match body(&bytes, "expected {\"level\": 0-3 | null}") {
        Ok(b) => b,
        Err(m) => return bad(m),
    };
    match state.queue.set_job_priority(&id, b.level).await {
        Ok(_) => {
            record(
                &state,
                &admin,
                &who.0,
                "job.priority",
                Some(&id),
                json!({"level": b.level}),
            )
            .await;
            done(Json(json!({"id": id, "level": b.level})))
        }
        Err(QueueError::Store(StoreError::Conflict(_))) => conflict("the job is no longer waiting"),
        Err(e) => queue_error(e),
    }
}

/// `PUT /admin/api/users/{name}/priority` `{"level": 0-3 | null}`.
pub async fn set_user_priority(
    State(state): State<AppState>,
    Extension(admin): Extension<Admin>,
    who: Instructor,
    Path(name): Path<String>,
    bytes: axum::body::Bytes,
) -> Response {
    let b: PriorityBody = match body(&bytes, "expected {\"level\": 0-3 | null}") {
        Ok(b) => b,
        Err(m) => return bad(m),
    };
    match state.store.get_user(&name).await {
        Ok(Some(_)) => {}
        Ok(None) => return not_found("no such participant"),
        Err(e) => return unavailable(e),
    }
    if let Err(e) = state.queue.set_user_priority(&name, b.level) {
        return bad(e.to_string());
    }
    let saved = save(&state).await;
    record(
        &state,
        &admin,
        &who.0,
        "user.priority",
        Some(&name),
        json!({"level": b.level}),
    )
    .await;
    admin.dashboard.kick(Section::Participants);
    done(Json(
        json!({"user": name, "level": b.level, "saved": saved}),
    ))
}

// ---- broadcast ----

/// The longest broadcast, in characters.
pub const MAX_BROADCAST: usize = 500;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BroadcastBody {
    message: String,
}

/// The `comfyume` message every participant's page gets for a broadcast (or its end).
pub fn broadcast_message(b: &Option<Value>) -> String {
    json!({"type": "comfyume", "data": {"broadcast": b}}).to_string()
}

/// `POST /admin/api/broadcast` `{"message": "..."}`: shown in every participant's ComfyUI
/// until cleared.
pub async fn set_broadcast(
    State(state): State<AppState>,
    Extension(admin): Extension<Admin>,
    who: Instructor,
    bytes: axum::body::Bytes,
) -> Response {
    let b: BroadcastBody = match body(&bytes, "expected {\"message\": \"...\"}") {
        Ok(b) => b,
        Err(m) => return bad(m),
    };
    let message = b.message.trim();
    if message.is_empty() {
        return bad("the message is empty");
    }
    if message.chars().count() > MAX_BROADCAST {
        return bad(format!("at most {MAX_BROADCAST} characters"));
    }
    if message
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return bad("the message has control characters");
    }
    let b = json!({
        "message": message,
        "from": who.0,
        "at_ms": comfyume_dispatch::queue::now_ms(),
    });
    if let Err(e) = settings::save(&state, settings::BROADCAST_KEY, &Some(b.clone())).await {
        return unavailable(e);
    }
    admin.dashboard.set_broadcast(Some(b.clone()));
    let reached = state.hub.send_all(&broadcast_message(&Some(b.clone())));
    record(
        &state,
        &admin,
        &who.0,
        "broadcast.set",
        None,
        json!({"message": message, "sockets": reached}),
    )
    .await;
    done(Json(json!({"broadcast": b, "sockets": reached})))
}

/// `DELETE /admin/api/broadcast`.
pub async fn clear_broadcast(
    State(state): State<AppState>,
    Extension(admin): Extension<Admin>,
    who: Instructor,
) -> Response {
    if let Err(e) = settings::save(&state, settings::BROADCAST_KEY, &None::<Value>).await {
        return unavailable(e);
    }
    admin.dashboard.set_broadcast(None);
    let reached = state.hub.send_all(&broadcast_message(&None));
    record(
        &state,
        &admin,
        &who.0,
        "broadcast.clear",
        None,
        json!({"sockets": reached}),
    )
    .await;
    done(Json(json!({"broadcast": null, "sockets": reached})))
}

/// `GET /admin/api/broadcast`.
pub async fn get_broadcast(Extension(admin): Extension<Admin>, _: Instructor) -> Response {
    Json(json!({"broadcast": admin.dashboard.broadcast()})).into_response()
}

/// `GET /api/comfyume/broadcast`: the participant's page asks at load (then hears changes
/// over its WebSocket).
pub async fn participant_broadcast(Extension(admin): Extension<Admin>, _: Participant) -> Response {
    Json(json!({"broadcast": admin.dashboard.broadcast()})).into_response()
}

// ---- room view ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoomBody {
    job_id: String,
    /// Which of the job's files (index in the dashboard's list), default the first.
    #[serde(default)]
    file: usize,
}

/// `PUT /admin/api/room` `{"job_id": "...", "file": 0}`: puts a result on the room view.
pub async fn set_room(
    State(state): State<AppState>,
    Extension(admin): Extension<Admin>,
    who: Instructor,
    bytes: axum::body::Bytes,
) -> Response {
    let b: RoomBody = match body(&bytes, "expected {\"job_id\": \"...\", \"file\": 0}") {
        Ok(b) => b,
        Err(m) => return bad(m),
    };
    let rec = match state.store.get_job(&b.job_id).await {
        Ok(Some(r)) => r,
        Ok(None) => return not_found("no such job"),
        Err(e) => return unavailable(e),
    };
    let files = crate::dashboard::output_files(&rec.user, &rec.outputs);
    let Some(file) = files.get(b.file).cloned() else {
        return bad(format!("job {} has {} output file(s)", rec.id, files.len()));
    };
    let pinned = json!({"job_id": rec.id, "user": rec.user, "file": file});
    if let Err(e) = settings::save(&state, settings::ROOM_KEY, &Some(pinned.clone())).await {
        return unavailable(e);
    }
    admin.dashboard.set_room(Some(pinned.clone()));
    record(
        &state,
        &admin,
        &who.0,
        "room.show",
        Some(&rec.id),
        json!({"participant": rec.user, "file": pinned["file"]["filename"]}),
    )
    .await;
    done(Json(json!({"room": pinned})))
}

/// `DELETE /admin/api/room`: the room view shows the latest results again.
pub async fn clear_room(
    State(state): State<AppState>,
    Extension(admin): Extension<Admin>,
    who: Instructor,
) -> Response {
    if let Err(e) = settings::save(&state, settings::ROOM_KEY, &None::<Value>).await {
        return unavailable(e);
    }
    admin.dashboard.set_room(None);
    record(&state, &admin, &who.0, "room.clear", None, json!({})).await;
    done(Json(json!({"room": null})))
}

// ---- GPUs ----

/// `GET /admin/api/gpus`: every backend (and the endpoints behind it), with its state.
pub async fn gpus(Extension(admin): Extension<Admin>, _: Instructor) -> Response {
    Json(admin.dashboard.gpus_section()).into_response()
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RefreshBody {
    backend: Option<String>,
}

/// How long a backend gets to answer `/object_info`.
const OBJECT_INFO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// `POST /admin/api/object-info/refresh` `{"backend"?: name}`: node definitions from a
/// backend (the first that answers when none is named).
pub async fn refresh_object_info(
    State(state): State<AppState>,
    Extension(admin): Extension<Admin>,
    who: Instructor,
    bytes: axum::body::Bytes,
) -> Response {
    let b: RefreshBody = if bytes.iter().all(u8::is_ascii_whitespace) {
        RefreshBody::default()
    } else {
        match body(&bytes, "expected {} or {\"backend\": \"name\"}") {
            Ok(b) => b,
            Err(m) => return bad(m),
        }
    };
    let backends = admin
        .dispatcher
        .as_ref()
        .map(|d| d.backend_handles())
        .unwrap_or_default();
    let chosen: Vec<_> = match &b.backend {
        Some(n) => {
            let v: Vec<_> = backends.into_iter().filter(|x| x.name() == n).collect();
            if v.is_empty() {
                return not_found(format!("no backend named {n:?}"));
            }
            v
        }
        None if backends.is_empty() => return conflict("no backend is configured"),
        None => backends,
    };
    let mut errors = Vec::new();
    for backend in chosen {
        match tokio::time::timeout(OBJECT_INFO_TIMEOUT, backend.object_info()).await {
            Ok(Ok(v)) if v.as_object().is_some_and(|m| !m.is_empty()) => {
                let n = v.as_object().map_or(0, |m| m.len());
                let source = format!("backend:{}", backend.name());
                if let Err(e) = comfyume_gateway::replace_object_info(&state, v, &source).await {
                    return unavailable(e);
                }
                record(
                    &state,
                    &admin,
                    &who.0,
                    "object_info.refresh",
                    Some(backend.name()),
                    json!({"nodes": n}),
                )
                .await;
                admin.dashboard.kick(Section::System);
                return done(Json(json!({"backend": backend.name(), "nodes": n})));
            }
            Ok(Ok(_)) => errors.push(format!("{}: no node definitions", backend.name())),
            Ok(Err(e)) => errors.push(format!("{}: {e}", backend.name())),
            Err(_) => errors.push(format!(
                "{}: no answer within {} s",
                backend.name(),
                OBJECT_INFO_TIMEOUT.as_secs()
            )),
        }
    }
    (
        StatusCode::BAD_GATEWAY,
        Json(json!({"error": format!("no node definitions: {}", errors.join("; "))})),
    )
        .into_response()
}
