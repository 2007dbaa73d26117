//! Participants: the list the dashboard shows, and creating, disabling, enabling them and
//! resetting a password (the new one is answered once and never stored in the clear).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use comfyume_gateway::AppState;
use comfyume_store::{Role, StoreError};
use rand::Rng;
use serde::Deserialize;
use serde_json::json;

use crate::audit::{done, record};
use crate::dashboard::Section;
use crate::{Admin, Instructor, bad, conflict, not_found, unavailable};

/// Readable generated passwords: no 0/O, 1/l/I look-alikes (as `comfyume users add`).
const ALPHABET: &[u8] = b"abcdefghjkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";

pub fn generate_password() -> String {
    let mut rng = rand::rng();
    let raw: String = (0..12)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    format!("{}-{}-{}", &raw[0..4], &raw[4..8], &raw[8..12])
}

/// `GET /admin/api/users`: every account with its jobs, sockets, GPU time and storage.
pub async fn list(Extension(admin): Extension<Admin>, _: Instructor) -> Response {
    match admin.dashboard.participants_section().await {
        Ok(v) => Json(v).into_response(),
        Err(e) => unavailable(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewUser {
    name: String,
    /// Generated when absent.
    password: Option<String>,
    #[serde(default)]
    admin: bool,
}

/// `POST /admin/api/users` `{"name": "user021", "password"?: "...", "admin"?: false}`:
/// answers the password once (generated unless given).
pub async fn create(
    State(state): State<AppState>,
    Extension(admin): Extension<Admin>,
    who: Instructor,
    bytes: axum::body::Bytes,
) -> Response {
    let Ok(b) = serde_json::from_slice::<NewUser>(&bytes) else {
        return bad("expected {\"name\": \"user021\", \"password\"?: \"...\", \"admin\"?: false}");
    };
    let name = b.name.trim().to_string();
    if comfyume_gateway::scope::is_reserved_name(&name.to_ascii_lowercase()) {
        return bad(format!(
            "{name:?} cannot be an account name: it is a route of the server (or contains a dot)"
        ));
    }
    if !comfyume_store::valid_user_name(&name) {
        return bad("names are 1-64 letters, digits, '_' or '-' (not starting with '-')");
    }
    let generated = b.password.is_none();
    let password = b.password.unwrap_or_else(generate_password);
    let role = if b.admin {
        Role::Admin
    } else {
        Role::Participant
    };
    match state.store.create_user(&name, &password, role).await {
        Ok(u) => {
            record(
                &state,
                &admin,
                &who.0,
                "user.create",
                Some(&name),
                json!({"role": role.as_str(), "password_generated": generated}),
            )
            .await;
            admin.dashboard.kick(Section::Participants);
            done((
                StatusCode::CREATED,
                Json(json!({
                    "name": u.name,
                    "role": u.role,
                    "password": password,
                    "note": "shown once: it is stored only as a hash",
                })),
            ))
        }
        Err(StoreError::AlreadyExists) => conflict(format!("an account {name:?} exists")),
        Err(StoreError::Other(m)) => bad(m),
        Err(e) => unavailable(e),
    }
}

async fn set_disabled(
    state: AppState,
    admin: Admin,
    who: Instructor,
    name: String,
    disabled: bool,
) -> Response {
    if disabled && name == who.0 {
        return conflict("you cannot disable your own account");
    }
    match state.store.set_disabled(&name, disabled).await {
        Ok(()) => {
            let action = if disabled {
                "user.disable"
            } else {
                "user.enable"
            };
            record(&state, &admin, &who.0, action, Some(&name), json!({})).await;
            admin.dashboard.kick(Section::Participants);
            done(Json(json!({"name": name, "disabled": disabled})))
        }
        Err(StoreError::NotFound) => not_found("no such participant"),
        Err(e) => unavailable(e),
    }
}

/// `POST /admin/api/users/{name}/disable`: sign-in refused, sessions and sockets end (within
/// the account watcher's half second), waiting jobs cancelled, the running one stopped.
pub async fn disable(
    State(state): State<AppState>,
    Extension(admin): Extension<Admin>,
    who: Instructor,
    Path(name): Path<String>,
) -> Response {
    set_disabled(state, admin, who, name, true).await
}

/// `POST /admin/api/users/{name}/enable`.
pub async fn enable(
    State(state): State<AppState>,
    Extension(admin): Extension<Admin>,
    who: Instructor,
    Path(name): Path<String>,
) -> Response {
    set_disabled(state, admin, who, name, false).await
}

/// `POST /admin/api/users/{name}/password`: a new generated password, answered once; every
/// session of the account ends.
pub async fn reset_password(
    State(state): State<AppState>,
    Extension(admin): Extension<Admin>,
    who: Instructor,
    Path(name): Path<String>,
) -> Response {
    let password = generate_password();
    match state.store.set_password(&name, &password).await {
        Ok(()) => {
            record(
                &state,
                &admin,
                &who.0,
                "user.password_reset",
                Some(&name),
                json!({}),
            )
            .await;
            done(Json(json!({
                "name": name,
                "password": password,
                "note": "shown once: it is stored only as a hash",
            })))
        }
        Err(StoreError::NotFound) => not_found("no such participant"),
        Err(e) => unavailable(e),
    }
}

/// `GET /admin/api/usage`: what each participant's files take (inputs, outputs) against
/// `USER_QUOTA_BYTES`.
pub async fn storage_usage(State(state): State<AppState>, _: Instructor) -> Response {
    let users = match state.store.list_users().await {
        Ok(u) => u,
        Err(e) => return unavailable(e),
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
