//! The management API (OAuth2 client credentials, deployment status, replicas, scaling,
//! container-type prices) and the emulator's own admin routes (`/_emulator/...`: state,
//! the replica lifecycle log, spot eviction, a forced scale-down).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::gateway::json_error;
use crate::scaling::Phase;
use crate::{Cmd, Emu, Health, lock};

const TOKEN_LIFETIME: Duration = Duration::from_secs(3600);

pub(crate) fn routes() -> Router<Arc<Emu>> {
    Router::new()
        .route("/v1/oauth2/token", post(token))
        .route("/v1/container-deployments", get(list_deployments))
        .route("/v1/container-deployments/{name}", get(one_deployment))
        .route("/v1/container-deployments/{name}/status", get(dep_status))
        .route("/v1/container-deployments/{name}/replicas", get(replicas))
        .route("/v1/container-deployments/{name}/scaling", get(scaling))
        .route("/v1/container-types", get(container_types))
        .route("/_emulator/state", get(state))
        .route("/_emulator/events", get(events))
        .route("/_emulator/evict", post(evict))
        .route("/_emulator/scale-down", post(scale_down))
}

fn random_token() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

#[derive(Deserialize)]
struct TokenRequest {
    grant_type: String,
    client_id: Option<String>,
    client_secret: Option<String>,
    refresh_token: Option<String>,
}

fn api_error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        axum::Json(json!({"code": code, "message": message})),
    )
        .into_response()
}

async fn token(State(emu): State<Arc<Emu>>, body: axum::body::Bytes) -> Response {
    let Ok(req) = serde_json::from_slice::<TokenRequest>(&body) else {
        return api_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "expected JSON with grant_type",
        );
    };
    let now = Instant::now();
    let mut tokens = lock(&emu.tokens);
    tokens.access.retain(|_, exp| *exp > now);
    tokens.refresh.retain(|_, exp| *exp > now);
    let ok = match req.grant_type.as_str() {
        "client_credentials" => {
            req.client_id.as_deref() == Some(emu.args.client_id.as_str())
                && req.client_secret.as_deref() == Some(emu.args.client_secret.as_str())
        }
        "refresh_token" => req
            .refresh_token
            .as_ref()
            .is_some_and(|r| tokens.refresh.remove(r).is_some()),
        _ => {
            return api_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "grant_type must be client_credentials or refresh_token",
            );
        }
    };
    if !ok {
        return api_error(
            StatusCode::UNAUTHORIZED,
            "unauthorized_request",
            "Invalid client credentials",
        );
    }
    let access = random_token();
    let refresh = random_token();
    tokens.access.insert(access.clone(), now + TOKEN_LIFETIME);
    tokens
        .refresh
        .insert(refresh.clone(), now + TOKEN_LIFETIME * 24);
    axum::Json(json!({
        "access_token": access,
        "refresh_token": refresh,
        "scope": "cloud-api-v1",
        "token_type": "Bearer",
        "expires_in": TOKEN_LIFETIME.as_secs(),
    }))
    .into_response()
}

fn api_authorized(emu: &Emu, headers: &HeaderMap) -> bool {
    let Some(token) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().strip_prefix("Bearer "))
    else {
        return false;
    };
    lock(&emu.tokens)
        .access
        .get(token.trim())
        .is_some_and(|exp| *exp > Instant::now())
}

fn unauthorized() -> Response {
    api_error(
        StatusCode::UNAUTHORIZED,
        "unauthorized_request",
        "a valid access token is required",
    )
}

fn rfc3339(t: SystemTime) -> String {
    let ts = time::OffsetDateTime::from(t);
    ts.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn phase_name(p: Phase) -> &'static str {
    match p {
        Phase::Provisioning => "provisioning",
        Phase::Starting => "starting",
        Phase::Running => "running",
        Phase::Terminating => "terminating",
    }
}

fn deployment_json(d: &crate::Dep) -> Value {
    json!({
        "name": d.s.name,
        "is_spot": d.s.spot,
        "compute": {"name": d.s.gpu, "size": 1},
        "scaling": scaling_json(d),
    })
}

fn scaling_json(d: &crate::Dep) -> Value {
    json!({
        "min_replica_count": d.s.min_replicas,
        "max_replica_count": d.s.max_replicas,
        "concurrent_requests_per_replica": d.s.concurrency,
        "queue_message_ttl_seconds": d.s.ttl.as_secs(),
        "scale_down_policy": {"delay_seconds": d.s.scale_down_delay.as_secs()},
        "scale_up_policy": {"delay_seconds": d.s.scale_up_delay.as_secs()},
        "scaling_triggers": {"queue_load": {"threshold": d.s.threshold}},
    })
}

async fn list_deployments(State(emu): State<Arc<Emu>>, headers: HeaderMap) -> Response {
    if !api_authorized(&emu, &headers) {
        return unauthorized();
    }
    let w = emu.world();
    let list: Vec<Value> = w.deps.values().map(deployment_json).collect();
    axum::Json(Value::Array(list)).into_response()
}

async fn one_deployment(
    State(emu): State<Arc<Emu>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !api_authorized(&emu, &headers) {
        return unauthorized();
    }
    match emu.world().deps.get(&name) {
        Some(d) => axum::Json(deployment_json(d)).into_response(),
        None => api_error(StatusCode::NOT_FOUND, "not_found", "no such deployment"),
    }
}

async fn scaling(
    State(emu): State<Arc<Emu>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !api_authorized(&emu, &headers) {
        return unauthorized();
    }
    match emu.world().deps.get(&name) {
        Some(d) => axum::Json(scaling_json(d)).into_response(),
        None => api_error(StatusCode::NOT_FOUND, "not_found", "no such deployment"),
    }
}

/// `healthy` with a serving replica or none at all (scaled to zero); `initializing` while
/// replicas exist and none serves yet (the provider's status values; which one it shows
/// when is not documented).
async fn dep_status(
    State(emu): State<Arc<Emu>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !api_authorized(&emu, &headers) {
        return unauthorized();
    }
    let w = emu.world();
    let Some(d) = w.deps.get(&name) else {
        return api_error(StatusCode::NOT_FOUND, "not_found", "no such deployment");
    };
    let active: Vec<_> = d
        .replicas
        .iter()
        .filter(|r| r.phase != Phase::Terminating)
        .collect();
    let serving = active.iter().any(|r| r.phase == Phase::Running);
    let status = if serving || active.is_empty() {
        "healthy"
    } else {
        "initializing"
    };
    axum::Json(json!({"status": status})).into_response()
}

async fn replicas(
    State(emu): State<Arc<Emu>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !api_authorized(&emu, &headers) {
        return unauthorized();
    }
    let w = emu.world();
    let Some(d) = w.deps.get(&name) else {
        return api_error(StatusCode::NOT_FOUND, "not_found", "no such deployment");
    };
    let list: Vec<Value> = d
        .replicas
        .iter()
        .map(|r| {
            json!({
                "id": r.id,
                "status": phase_name(r.phase),
                "started_at": rfc3339(r.started_at),
            })
        })
        .collect();
    axum::Json(json!({"list": list})).into_response()
}

#[derive(Deserialize)]
struct TypesQuery {
    currency: Option<String>,
}

async fn container_types(
    State(emu): State<Arc<Emu>>,
    headers: HeaderMap,
    Query(q): Query<TypesQuery>,
) -> Response {
    if !api_authorized(&emu, &headers) {
        return unauthorized();
    }
    let currency = q.currency.unwrap_or_else(|| "eur".into()).to_lowercase();
    let list: Vec<Value> = emu
        .prices
        .iter()
        .map(|p| {
            json!({
                "name": p.gpu,
                "currency": currency,
                "serverless_price": p.on_demand,
                "serverless_spot_price": p.spot,
            })
        })
        .collect();
    axum::Json(Value::Array(list)).into_response()
}

async fn state(State(emu): State<Arc<Emu>>) -> Response {
    let w = emu.world();
    let deps: Vec<Value> = w
        .deps
        .values()
        .map(|d| {
            let replicas: Vec<Value> = d
                .replicas
                .iter()
                .map(|r| {
                    json!({
                        "id": r.id,
                        "phase": phase_name(r.phase),
                        "health": r.health,
                        "in_flight": r.in_flight,
                        "pid": r.pid,
                        "url": r.url,
                    })
                })
                .collect();
            json!({
                "name": d.s.name,
                "spot": d.s.spot,
                "queue": d.queue.iter().filter(|q| !q.tx.is_closed()).count(),
                "replicas": replicas,
            })
        })
        .collect();
    axum::Json(json!({"deployments": deps})).into_response()
}

async fn events(State(emu): State<Arc<Emu>>) -> Response {
    let ev = lock(&emu.events).clone();
    axum::Json(ev).into_response()
}

#[derive(Deserialize)]
struct Target {
    deployment: String,
    replica: Option<String>,
}

/// Picks the named replica, else a busy one, else any that is not going already.
fn target(
    emu: &Emu,
    t: &Target,
) -> Result<(String, tokio::sync::watch::Sender<Cmd>), &'static str> {
    let mut w = emu.world();
    let Some(d) = w.deps.get_mut(&t.deployment) else {
        return Err("no such deployment");
    };
    let candidates = d.replicas.iter_mut().filter(|r| match &t.replica {
        Some(id) => &r.id == id,
        None => r.phase != Phase::Terminating,
    });
    let mut list: Vec<&mut crate::Replica> = candidates.collect();
    list.sort_by_key(|r| (r.in_flight == 0, r.health != Health::Busy));
    let Some(r) = list.into_iter().next() else {
        return Err("no such replica");
    };
    r.phase = Phase::Terminating;
    Ok((r.id.clone(), r.cmd.clone()))
}

/// Spot eviction: the replica is killed without notice (SIGKILL, no grace).
async fn evict(State(emu): State<Arc<Emu>>, axum::Json(t): axum::Json<Target>) -> Response {
    let spot = emu.world().deps.get(&t.deployment).map(|d| d.s.spot);
    if spot == Some(false) {
        return json_error(StatusCode::CONFLICT, "not a spot deployment");
    }
    let (id, cmd) = match target(&emu, &t) {
        Ok(v) => v,
        Err(why) => return json_error(StatusCode::NOT_FOUND, why),
    };
    emu.log(&t.deployment, &id, "evicted", String::new());
    let _ = cmd.send(Cmd::Kill);
    emu.wake.notify_one();
    axum::Json(json!({"evicted": id})).into_response()
}

/// A scale-down now (SIGTERM, SIGKILL after the grace), whatever the autoscaler says.
async fn scale_down(State(emu): State<Arc<Emu>>, axum::Json(t): axum::Json<Target>) -> Response {
    let (id, cmd) = match target(&emu, &t) {
        Ok(v) => v,
        Err(why) => return json_error(StatusCode::NOT_FOUND, why),
    };
    emu.log(&t.deployment, &id, "scale_down", "forced".into());
    let _ = cmd.send(Cmd::Terminate);
    emu.wake.notify_one();
    axum::Json(json!({"stopping": id})).into_response()
}
