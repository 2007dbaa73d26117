//! The audit log: every instructor action (who, what, when, on what), kept in the store.

use axum::Json;
use axum::extract::{Query, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use comfyume_gateway::AppState;
use comfyume_gateway::auth::Caller;
use comfyume_store::NewAudit;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{Admin, Instructor, unavailable};

/// Marks a response whose action its handler already recorded.
#[derive(Debug, Clone, Copy)]
pub struct Audited;

/// Records an action and tells the dashboard. A failure to record is logged (the action
/// itself already happened; the log line keeps the record).
pub async fn record(
    state: &AppState,
    admin: &Admin,
    actor: &str,
    action: &str,
    target: Option<&str>,
    detail: Value,
) {
    tracing::info!(instructor = %actor, action, target = ?target, detail = %detail, "admin action");
    let entry = NewAudit {
        actor: actor.to_string(),
        action: action.to_string(),
        target: target.map(str::to_string),
        detail,
    };
    if let Err(e) = state.store.append_audit(entry).await {
        tracing::error!(error = %e, instructor = %actor, action, "could not write the audit log");
    }
    admin.dashboard.kick(crate::dashboard::Section::Audit);
}

/// `resp` marked as audited.
pub fn done(resp: impl IntoResponse) -> Response {
    let mut r = resp.into_response();
    r.extensions_mut().insert(Audited);
    r
}

#[derive(Deserialize)]
pub struct AuditQuery {
    before: Option<i64>,
    limit: Option<u32>,
}

/// `GET /admin/api/audit?before=SEQ&limit=N`: newest first (at most 500 per page).
pub async fn list(
    State(state): State<AppState>,
    _: Instructor,
    Query(q): Query<AuditQuery>,
) -> Response {
    let limit = q.limit.unwrap_or(100).clamp(1, 500);
    match state.store.list_audit(q.before, limit).await {
        Ok(entries) => {
            let next = (entries.len() == limit as usize)
                .then(|| entries.last().map(|e| e.seq))
                .flatten();
            Json(json!({"entries": entries, "next_before": next})).into_response()
        }
        Err(e) => unavailable(e),
    }
}

/// See [`crate::audited`].
pub async fn fallback_layer(
    State((state, admin)): State<(AppState, Admin)>,
    req: Request,
    next: Next,
) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let actor = req.extensions().get::<Caller>().map(|c| c.0.name.clone());
    let resp = next.run(req).await;
    let changes = !matches!(method, Method::GET | Method::HEAD | Method::OPTIONS);
    if changes
        && path.starts_with("/admin/api/")
        && resp.status().is_success()
        && resp.extensions().get::<Audited>().is_none()
        && let Some(actor) = actor
    {
        let entry = NewAudit {
            actor,
            action: format!("{method} {path}"),
            target: None,
            detail: json!({"status": resp.status().as_u16()}),
        };
        if let Err(e) = state.store.append_audit(entry).await {
            tracing::error!(error = %e, "could not write the audit log");
        }
        admin.dashboard.kick(crate::dashboard::Section::Audit);
    }
    resp
}
