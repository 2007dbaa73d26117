//! Authentication as an extractor: [`Participant`] says who is asking (a session cookie, or
//! HTTP Basic on any request, the predecessor's scheme) and whose workspace the request
//! addresses. A page loaded with Basic Auth also gets a session cookie, so that assets, the
//! WebSocket and the API never re-prompt.

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use base64::Engine;
use comfyume_store::{Role, User};
use sha2::{Digest, Sha256};

use crate::basic_cache::credential_key;
use crate::error::ApiError;
use crate::hub::SessionKey;
use crate::proxy::Client;
use crate::scope::Scope;
use crate::signin::{SignInError, sign_in};
use crate::state::AppState;

pub const SESSION_COOKIE: &str = "comfyume_session";

/// The authenticated account making the request.
#[derive(Debug, Clone)]
pub struct Caller(pub User);

/// Whose data a request addresses: the caller's own, or (for an admin on
/// `/userNNN/`) the participant's.
#[derive(Debug, Clone)]
pub struct Participant {
    pub name: String,
    pub caller: User,
    /// The session the request came with (a cookie), so `/logout` can close its sockets.
    pub session: Option<SessionKey>,
}

/// A session made for a page loaded with Basic Auth: its cookie goes on the response.
#[derive(Debug, Clone)]
pub struct NewSession(pub HeaderValue);

impl FromRequestParts<AppState> for Participant {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        // Already authenticated for this request (by the router's layer).
        if let Some(p) = parts.extensions.get::<Participant>() {
            return Ok(p.clone());
        }
        let (user, session) = authenticate(parts, state).await?;
        let scope = parts.extensions.get::<Scope>().cloned().unwrap_or_default();
        let name = match scope.user {
            None => user.name.clone(),
            Some(target) if target == user.name => target,
            Some(target) if user.role == Role::Admin => match state.store.get_user(&target).await {
                Ok(Some(_)) => target,
                Ok(None) => return Err(StatusCode::NOT_FOUND.into_response()),
                Err(e) => return Err(ApiError::Store(e).into_response()),
            },
            Some(_) => {
                return Err((
                    StatusCode::FORBIDDEN,
                    "This workspace belongs to another participant.",
                )
                    .into_response());
            }
        };
        let who = Participant {
            name,
            caller: user.clone(),
            session,
        };
        parts.extensions.insert(Caller(user));
        parts.extensions.insert(who.clone());
        Ok(who)
    }
}

/// SHA-256 of a session token: how sockets remember their session.
pub fn session_key(token: &str) -> SessionKey {
    Sha256::digest(token.as_bytes()).into()
}

/// The request's client (see [`crate::proxy`]); the router's layer puts it in every
/// request's extensions.
pub fn client_of(parts: &Parts, state: &AppState) -> Client {
    if let Some(c) = parts.extensions.get::<Client>() {
        return c.clone();
    }
    let peer = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .unwrap_or(IpAddr::from([127, 0, 0, 1]));
    Client::from_parts(peer, &parts.headers, &state.settings.trusted_proxies)
}

async fn authenticate(
    parts: &mut Parts,
    state: &AppState,
) -> Result<(User, Option<SessionKey>), Response> {
    if let Some(token) = cookie_value(&parts.headers, SESSION_COOKIE) {
        match state.store.session_user(token).await {
            Ok(Some(u)) => return Ok((u, Some(session_key(token)))),
            Ok(None) => {}
            Err(e) => return Err(ApiError::Store(e).into_response()),
        }
    }
    let Some((name, pass)) = basic_credentials(&parts.headers) else {
        return Err(unauthorized(parts));
    };
    let client = client_of(parts, state);
    let user = basic_user(state, client.addr, &name, &pass)
        .await
        .map_err(|e| match e {
            SignInError::Rejected => unauthorized(parts),
            other => sign_in_error(other),
        })?;
    // A page loaded with Basic Auth also gets the cookie, so the WebSocket upgrade
    // authenticates where a browser does not resend Basic credentials.
    if wants_html(parts) {
        match state
            .store
            .create_session(&user.name, state.settings.session_ttl.as_millis() as i64)
            .await
        {
            Ok(token) => {
                parts
                    .extensions
                    .insert(NewSession(session_cookie(state, &token)));
            }
            Err(e) => tracing::warn!(error = %e, "could not create a session"),
        }
    }
    Ok((user, None))
}

/// A Basic credential: from the cache while the account's credential revision is unchanged,
/// else checked (once, however many requests bring it at the same moment).
async fn basic_user(
    state: &AppState,
    client: IpAddr,
    name: &str,
    pass: &str,
) -> Result<User, SignInError> {
    let key = credential_key(name, pass);
    if let Some(u) = cached_basic(state, &key).await? {
        return Ok(u);
    }
    let _checking = state.basic_cache.check(key).await;
    if let Some(u) = cached_basic(state, &key).await? {
        return Ok(u);
    }
    // Read before the password is checked: a change that lands during the check moves the
    // revision past this one, so the credential is checked again next time.
    let revision = state
        .store
        .user_revision(name)
        .await?
        .map(|(_, r)| r)
        .unwrap_or(0);
    let user = sign_in(state, client, name, pass).await?;
    state.basic_cache.put(key, &user.name, revision);
    Ok(user)
}

async fn cached_basic(
    state: &AppState,
    key: &crate::basic_cache::CredentialKey,
) -> Result<Option<User>, SignInError> {
    let Some((name, revision)) = state.basic_cache.get(key) else {
        return Ok(None);
    };
    // The cache spares the hash, not the account check: a new password, a disable or a
    // removal (by this server or by the CLI) moves the revision and ends it at once.
    match state.store.user_revision(&name).await? {
        Some((user, now)) if now == revision && !user.disabled => Ok(Some(user)),
        _ => {
            state.basic_cache.forget(key);
            Ok(None)
        }
    }
}

/// The answer to a sign-in that did not happen (other than a wrong password).
pub fn sign_in_error(e: SignInError) -> Response {
    match e {
        SignInError::Throttled(wait) => {
            let secs = SignInError::retry_after_secs(wait);
            (
                StatusCode::TOO_MANY_REQUESTS,
                [
                    (header::RETRY_AFTER, secs.to_string()),
                    (
                        header::CONTENT_TYPE,
                        "text/plain; charset=utf-8".to_string(),
                    ),
                ],
                format!("Too many failed sign-ins. Try again in {secs} seconds."),
            )
                .into_response()
        }
        SignInError::Rejected => StatusCode::UNAUTHORIZED.into_response(),
        SignInError::Store(e) => ApiError::Store(e).into_response(),
        SignInError::Workspace(e) => {
            let mut r = ApiError::Io(e).into_response();
            if r.status() == StatusCode::NOT_FOUND || r.status() == StatusCode::FORBIDDEN {
                *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            }
            r
        }
    }
}

pub fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

pub fn session_cookie(state: &AppState, token: &str) -> HeaderValue {
    let secure = if state.settings.secure_cookies {
        "; Secure"
    } else {
        ""
    };
    let max_age = state.settings.session_ttl.as_secs();
    HeaderValue::from_str(&format!(
        "{SESSION_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}"
    ))
    .expect("cookie is ascii")
}

pub fn clear_cookie() -> HeaderValue {
    HeaderValue::from_static("comfyume_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0")
}

fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()?;
    let s = String::from_utf8(raw).ok()?;
    let (u, p) = s.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

fn wants_html(parts: &Parts) -> bool {
    parts.method == Method::GET
        && parts
            .headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("text/html"))
}

fn unauthorized(parts: &Parts) -> Response {
    if wants_html(parts) {
        let next = parts
            .extensions
            .get::<Scope>()
            .map(|s| s.original_path.clone())
            .unwrap_or_else(|| parts.uri.path().to_string());
        let target = format!(
            "/login?next={}",
            percent_encoding::utf8_percent_encode(&next, percent_encoding::NON_ALPHANUMERIC)
        );
        return Redirect::to(&target).into_response();
    }
    (
        StatusCode::UNAUTHORIZED,
        [
            (
                header::WWW_AUTHENTICATE,
                "Basic realm=\"ComfyUMe\", charset=\"UTF-8\"",
            ),
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
        ],
        "401: Unauthorized",
    )
        .into_response()
}
