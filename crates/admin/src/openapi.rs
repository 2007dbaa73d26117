//! The OpenAPI 3.1 document of the admin API (`GET /admin/api/openapi.json`), generated from
//! [`ROUTES`], a typed description of every route. A test
//! (`crates/comfyume/tests/dashboard.rs`, `every_admin_route_is_for_instructors_only`) sends
//! each described route to the real server as a participant and expects 403, never the 404
//! or 405 of a route or method that does not exist, so the document cannot drift from the
//! code.
//!
//! Why not `utoipa`: checked on this project's shared 2-core machine, a scratch crate with
//! utoipa 5 compiled three crates this workspace does not have (utoipa-gen 15.5 s, utoipa
//! 9.8 s, regex 1.9 s of compile time, plus macro expansion on every rebuild of this
//! crate), and every handler and body type would need annotations and schema derives. This
//! table is one file and no dependency.

use axum::Json;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::Instructor;

/// A request body.
#[derive(Clone, Copy)]
pub enum Body {
    None,
    /// JSON with this schema (built on demand).
    Json(fn() -> Value),
}

/// One route of the admin API.
pub struct Route {
    pub method: &'static str,
    /// OpenAPI path template (`{id}`), the same as the router's.
    pub path: &'static str,
    pub tag: &'static str,
    pub summary: &'static str,
    pub body: Body,
    /// The success status and what it answers.
    pub ok: (u16, &'static str),
    /// Other statuses it may answer beyond 401/403.
    pub errors: &'static [(u16, &'static str)],
    /// The answer's media type when not JSON.
    pub produces: Option<&'static str>,
}

const R: Route = Route {
    method: "get",
    path: "",
    tag: "",
    summary: "",
    body: Body::None,
    ok: (200, "OK"),
    errors: &[],
    produces: None,
};

fn level() -> Value {
    json!({"type": "object", "required": ["level"], "additionalProperties": false,
           "properties": {"level": {"type": ["integer", "null"], "minimum": 0, "maximum": 3,
                                    "description": "0-3 (3 highest); null clears it"}}})
}

const NOT_FOUND: (u16, &str) = (404, "no such job or participant");
const CONFLICT: (u16, &str) = (409, "not in a state that allows it");
const BAD: (u16, &str) = (
    400,
    "invalid body (the answer's `error` says what is expected)",
);

/// Every route of the admin API.
pub const ROUTES: &[Route] = &[
    Route {
        path: "/admin/api/openapi.json",
        tag: "meta",
        summary: "This document",
        ..R
    },
    Route {
        path: "/admin/api/dashboard",
        tag: "dashboard",
        summary: "Every section of the dashboard at once (queue, progress, results, participants, gpus, system, audit, broadcast, room), as the live stream's first message has them",
        ..R
    },
    Route {
        path: "/admin/api/queue",
        tag: "queue",
        summary: "The workshop queue in the order the scheduler will serve it (policy, paused, limits, waiting jobs with position, priority, attempts; running jobs with backend and start)",
        ..R
    },
    Route {
        method: "put",
        path: "/admin/api/queue/policy",
        tag: "queue",
        summary: "Change the queue policy (takes effect at the next pick; kept across restarts)",
        body: Body::Json(|| {
            json!({"type": "object", "required": ["policy"], "additionalProperties": false,
                   "properties": {"policy": {"enum": ["fifo", "round_robin", "priority"]}}})
        }),
        errors: &[BAD],
        ..R
    },
    Route {
        method: "put",
        path: "/admin/api/queue/limits",
        tag: "queue",
        summary: "Change the limits (kept across restarts)",
        body: Body::Json(|| {
            json!({"type": "object", "additionalProperties": false, "minProperties": 1,
                   "properties": {
                       "max_running_per_user": {"type": "integer", "minimum": 1, "maximum": 100000},
                       "max_queued_per_user": {"type": "integer", "minimum": 0, "maximum": 100000, "description": "0: no limit"},
                       "max_queue_depth": {"type": "integer", "minimum": 0, "maximum": 100000, "description": "0: no limit"}}})
        }),
        errors: &[BAD],
        ..R
    },
    Route {
        method: "post",
        path: "/admin/api/queue/pause",
        tag: "queue",
        summary: "Pause dispatch: no new job starts, running jobs finish (kept across restarts)",
        ..R
    },
    Route {
        method: "post",
        path: "/admin/api/queue/resume",
        tag: "queue",
        summary: "Resume dispatch",
        ..R
    },
    Route {
        method: "post",
        path: "/admin/api/queue/cancel",
        tag: "queue",
        summary: "Cancel every waiting job of everyone (running jobs go on)",
        ..R
    },
    Route {
        method: "post",
        path: "/admin/api/jobs/{id}/cancel",
        tag: "jobs",
        summary: "Cancel a job: a waiting one is cancelled, a running one stopped (its owner's page hears it)",
        errors: &[NOT_FOUND, CONFLICT],
        ..R
    },
    Route {
        method: "post",
        path: "/admin/api/jobs/{id}/front",
        tag: "jobs",
        summary: "Move a waiting job to the front: it runs next under every policy (its owner's running cap still holds)",
        errors: &[NOT_FOUND, CONFLICT],
        ..R
    },
    Route {
        method: "post",
        path: "/admin/api/jobs/{id}/retry",
        tag: "jobs",
        summary: "Run a failed, interrupted or cancelled job again, as a new job of the same participant (answers `new_id`)",
        errors: &[
            NOT_FOUND,
            CONFLICT,
            (429, "the participant's or the workshop's queue is full"),
        ],
        ..R
    },
    Route {
        method: "put",
        path: "/admin/api/jobs/{id}/priority",
        tag: "jobs",
        summary: "A waiting job's own priority level",
        body: Body::Json(level),
        errors: &[BAD, NOT_FOUND, CONFLICT],
        ..R
    },
    Route {
        path: "/admin/api/users",
        tag: "participants",
        summary: "Every account: online sockets, jobs by state, GPU time, last activity, storage used, level, a link to their UI",
        ..R
    },
    Route {
        method: "post",
        path: "/admin/api/users",
        tag: "participants",
        summary: "Create an account; the password (generated unless given) is answered once",
        body: Body::Json(|| {
            json!({"type": "object", "required": ["name"], "additionalProperties": false,
                   "properties": {"name": {"type": "string", "pattern": "^[A-Za-z0-9_][A-Za-z0-9_-]{0,63}$"},
                                  "password": {"type": "string"},
                                  "admin": {"type": "boolean", "default": false}}})
        }),
        ok: (201, "created; `password` is shown this once"),
        errors: &[BAD, (409, "the name is taken")],
        ..R
    },
    Route {
        path: "/admin/api/usage",
        tag: "participants",
        summary: "What each participant's files take (inputs, outputs) against USER_QUOTA_BYTES",
        ..R
    },
    Route {
        method: "post",
        path: "/admin/api/users/{name}/disable",
        tag: "participants",
        summary: "Disable an account: sign-in refused, sessions and sockets end, waiting jobs cancelled, the running one stopped",
        errors: &[NOT_FOUND, CONFLICT],
        ..R
    },
    Route {
        method: "post",
        path: "/admin/api/users/{name}/enable",
        tag: "participants",
        summary: "Enable an account again",
        errors: &[NOT_FOUND],
        ..R
    },
    Route {
        method: "post",
        path: "/admin/api/users/{name}/password",
        tag: "participants",
        summary: "Reset a password: a new generated one is answered once; every session of the account ends",
        errors: &[NOT_FOUND],
        ..R
    },
    Route {
        method: "post",
        path: "/admin/api/users/{name}/cancel",
        tag: "participants",
        summary: "Cancel all of a participant's jobs (waiting cancelled, running stopped)",
        errors: &[NOT_FOUND],
        ..R
    },
    Route {
        method: "put",
        path: "/admin/api/users/{name}/priority",
        tag: "participants",
        summary: "A participant's priority level (used by the `priority` policy; kept across restarts)",
        body: Body::Json(level),
        errors: &[BAD, NOT_FOUND],
        ..R
    },
    Route {
        path: "/admin/api/users/{name}/export.zip",
        tag: "downloads",
        summary: "One participant's outputs and workflows as one zip, streamed",
        errors: &[NOT_FOUND],
        produces: Some("application/zip"),
        ..R
    },
    Route {
        path: "/admin/api/export.zip",
        tag: "downloads",
        summary: "Everyone's outputs and workflows as one zip (one folder per participant), streamed",
        produces: Some("application/zip"),
        ..R
    },
    Route {
        path: "/admin/api/broadcast",
        tag: "broadcast",
        summary: "The message shown in every participant's UI, if any",
        ..R
    },
    Route {
        method: "post",
        path: "/admin/api/broadcast",
        tag: "broadcast",
        summary: "Show a message in every participant's ComfyUI until cleared (kept across restarts)",
        body: Body::Json(|| {
            json!({"type": "object", "required": ["message"], "additionalProperties": false,
                   "properties": {"message": {"type": "string", "minLength": 1, "maxLength": 500}}})
        }),
        errors: &[BAD],
        ..R
    },
    Route {
        method: "delete",
        path: "/admin/api/broadcast",
        tag: "broadcast",
        summary: "Clear the message",
        ..R
    },
    Route {
        method: "put",
        path: "/admin/api/room",
        tag: "room",
        summary: "Put a result on the room view (the projector)",
        body: Body::Json(|| {
            json!({"type": "object", "required": ["job_id"], "additionalProperties": false,
                   "properties": {"job_id": {"type": "string"},
                                  "file": {"type": "integer", "minimum": 0, "default": 0}}})
        }),
        errors: &[BAD, NOT_FOUND],
        ..R
    },
    Route {
        method: "delete",
        path: "/admin/api/room",
        tag: "room",
        summary: "The room view shows the latest results again",
        ..R
    },
    Route {
        path: "/admin/api/audit",
        tag: "audit",
        summary: "The audit log, newest first; `?before=SEQ&limit=N` pages (limit 1-500, default 100)",
        ..R
    },
    Route {
        path: "/admin/api/gpus",
        tag: "gpus",
        summary: "Every backend and the endpoints behind it: state (cold, starting, ready, busy, failing), jobs in flight, recent errors, cold starts, spend",
        ..R
    },
    Route {
        method: "post",
        path: "/admin/api/object-info/refresh",
        tag: "gpus",
        summary: "Refresh the node definitions from a backend (the first that answers when none is named)",
        body: Body::Json(|| {
            json!({"type": "object", "additionalProperties": false,
                   "properties": {"backend": {"type": "string"}}})
        }),
        errors: &[
            NOT_FOUND,
            (502, "no backend answered with node definitions"),
        ],
        ..R
    },
    Route {
        path: "/admin/api/system",
        tag: "system",
        summary: "Version, uptime, disk use per area and free space, database size, node definitions' age",
        ..R
    },
    Route {
        path: "/admin/api/thumb",
        tag: "dashboard",
        summary: "A thumbnail (JPEG, at most 320 px) of a participant's output image: `?user=&filename=&subfolder=&type=output`",
        errors: &[BAD, NOT_FOUND],
        produces: Some("image/jpeg"),
        ..R
    },
];

/// The path's `{parameters}`.
fn params(path: &str) -> Vec<&str> {
    path.split('/')
        .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
        .collect()
}

/// The document.
pub fn build() -> Value {
    let mut paths = serde_json::Map::new();
    for r in ROUTES {
        let mut responses = serde_json::Map::new();
        let content = match r.produces {
            Some(mt) => json!({mt: {"schema": {"type": "string", "format": "binary"}}}),
            None => json!({"application/json": {"schema": {"type": "object"}}}),
        };
        responses.insert(
            r.ok.0.to_string(),
            json!({"description": r.ok.1, "content": content}),
        );
        let mut errors: Vec<(u16, &str)> = vec![
            (401, "no credentials (Basic or a session cookie)"),
            (
                403,
                "not an instructor, or a session's state change without its CSRF token",
            ),
        ];
        errors.extend(r.errors.iter().copied());
        for (code, why) in errors {
            responses.insert(
                code.to_string(),
                json!({"description": why, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}),
            );
        }
        let mut op = json!({
            "tags": [r.tag],
            "summary": r.summary,
            "operationId": format!("{}_{}", r.method, r.path.trim_start_matches("/admin/api/").replace(['/', '.', '{', '}', '-'], "_")),
            "responses": responses,
        });
        let ps: Vec<Value> = params(r.path)
            .into_iter()
            .map(|p| json!({"name": p, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        if !ps.is_empty() {
            op["parameters"] = Value::Array(ps);
        }
        if let Body::Json(schema) = r.body {
            op["requestBody"] =
                json!({"required": true, "content": {"application/json": {"schema": schema()}}});
        }
        if r.method != "get" {
            op["security"] = json!([{"basic": []}, {"session": [], "csrf": []}]);
        }
        let entry = paths.entry(r.path.to_string()).or_insert_with(|| json!({}));
        entry[r.method] = op;
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "ComfyUMe admin API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The instructor's API: everything the dashboard at /admin does. Every route needs an account with the admin role. Scripts use HTTP Basic credentials; a browser session (cookie) must send the page's CSRF token in X-CSRF-Token with every state change. Every action is recorded in the audit log. The live stream of the dashboard is the WebSocket GET /admin/ws. When INFERENCE_MODE=serverless, /admin/api/serverless (GET, PUT), /admin/api/serverless/warmup (POST) and /admin/api/costs (GET) are served as well."
        },
        "security": [{"basic": []}, {"session": []}],
        "components": {
            "securitySchemes": {
                "basic": {"type": "http", "scheme": "basic"},
                "session": {"type": "apiKey", "in": "cookie", "name": "comfyume_session"},
                "csrf": {"type": "apiKey", "in": "header", "name": "X-CSRF-Token"}
            },
            "schemas": {
                "Error": {"type": "object", "properties": {"error": {"type": "string"}}}
            }
        },
        "paths": paths,
    })
}

/// `GET /admin/api/openapi.json`.
pub async fn document(_: Instructor) -> Response {
    Json(build()).into_response()
}
