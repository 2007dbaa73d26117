//! The serverless GPUs: the instructor switches the active endpoint and failover order
//! at run time, warms an endpoint, and sees every endpoint's state and what the day
//! costs; the participant's banner learns about cold starts and their GPU time.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use comfyume_gateway::AppState;
use comfyume_gateway::auth::Participant;
use comfyume_serverless::{Routing, ServerlessBackend, ServerlessError};
use serde::Deserialize;
use serde_json::json;

use crate::{Instructor, bad};

type Handle = Option<Arc<ServerlessBackend>>;

pub fn routes(serverless: Handle) -> Router<AppState> {
    Router::new()
        .route("/admin/api/serverless", get(overview).put(set_routing))
        .route("/admin/api/serverless/warmup", post(warmup))
        .route("/admin/api/costs", get(costs))
        .route("/api/comfyume/gpu", get(banner))
        .layer(Extension(serverless))
}

fn not_serverless() -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({"error": "INFERENCE_MODE is not serverless"})),
    )
        .into_response()
}

async fn overview(Extension(sl): Extension<Handle>, _: Instructor) -> Response {
    match sl {
        Some(sl) => Json(sl.status()).into_response(),
        None => not_serverless(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoutingBody {
    active: String,
    #[serde(default)]
    failover: Vec<String>,
}

async fn set_routing(
    Extension(sl): Extension<Handle>,
    who: Instructor,
    body: axum::body::Bytes,
) -> Response {
    let Some(sl) = sl else {
        return not_serverless();
    };
    let Ok(b) = serde_json::from_slice::<RoutingBody>(&body) else {
        return bad(
            "expected {\"active\": \"h200-spot\", \"failover\": [\"h200-on-demand\", ...]}",
        );
    };
    match sl
        .set_routing(Routing {
            active: b.active,
            failover: b.failover,
        })
        .await
    {
        Ok(r) => {
            tracing::info!(instructor = %who.0, active = %r.active, failover = ?r.failover, "serverless routing changed by the instructor");
            Json(sl.status()).into_response()
        }
        Err(e @ ServerlessError::UnknownEndpoint { .. }) => bad(e.to_string()),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": e.to_string()})),
        )
            .into_response(),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct WarmupBody {
    endpoint: Option<String>,
}

async fn warmup(
    Extension(sl): Extension<Handle>,
    who: Instructor,
    body: axum::body::Bytes,
) -> Response {
    let Some(sl) = sl else {
        return not_serverless();
    };
    let b = if body.iter().all(u8::is_ascii_whitespace) {
        WarmupBody::default()
    } else {
        match serde_json::from_slice::<WarmupBody>(&body) {
            Ok(b) => b,
            Err(_) => return bad("expected {} or {\"endpoint\": \"h200-spot\"}"),
        }
    };
    match sl.warmup(b.endpoint.as_deref()) {
        Ok(name) => {
            tracing::info!(instructor = %who.0, endpoint = %name, "warm-up asked for");
            (StatusCode::ACCEPTED, Json(json!({"warming": name}))).into_response()
        }
        Err(e) => bad(e.to_string()),
    }
}

async fn costs(Extension(sl): Extension<Handle>, _: Instructor) -> Response {
    match sl {
        Some(sl) => Json(sl.costs()).into_response(),
        None => not_serverless(),
    }
}

/// The banner's GPU line: a cold start under way, and the participant's GPU time today
/// (nothing to say, not an error, on other inference modes: the banner asks every time).
async fn banner(
    State(_): State<AppState>,
    Extension(sl): Extension<Handle>,
    who: Participant,
) -> Response {
    match sl {
        Some(sl) => Json(sl.banner(&who.name)).into_response(),
        None => Json(json!({"gpu": null, "gpu_time_today_ms": null, "gpu_time_text": null}))
            .into_response(),
    }
}
