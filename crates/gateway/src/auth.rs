//! Authentication: HTTP Basic on every request (the predecessor's scheme) and a
//! session cookie set by the login page or by any page load with Basic Auth, so
//! that assets, the WebSocket and the API never re-prompt. Also the per-address
//! and per-account rate limit on failed logins, and the participant scope check.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use base64::Engine;
use comfyume_store::{Role, User};
use sha2::{Digest, Sha256};

use crate::scope::Scope;
use crate::state::AppState;

pub const SESSION_COOKIE: &str = "comfyume_session";
/// How long a verified Basic credential is trusted without re-hashing. Argon2id
/// costs tens of milliseconds by design; a page load makes ~60 requests.
const BASIC_CACHE_TTL: Duration = Duration::from_secs(60);

/// The authenticated account making the request.
#[derive(Debug, Clone)]
pub struct Caller(pub User);

/// Whose data a request addresses: the caller's own, or (for an admin on
/// `/userNNN/`) the participant's.
#[derive(Debug, Clone)]
pub struct Participant {
    pub name: String,
    pub caller: User,
}

impl<S: Send + Sync> FromRequestParts<S> for Participant {
    type Rejection = StatusCode;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Participant>()
            .cloned()
            .ok_or(StatusCode::UNAUTHORIZED)
    }
}

pub struct AuthState {
    basic_cache: Mutex<HashMap<[u8; 32], (User, Instant)>>,
    failures: Mutex<HashMap<String, VecDeque<Instant>>>,
    max_failures: u32,
    window: Duration,
}

impl AuthState {
    pub fn new(max_failures: u32, window: Duration) -> Self {
        AuthState {
            basic_cache: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
            max_failures,
            window,
        }
    }

    /// Seconds to wait if any of `keys` is over its failure budget.
    pub fn blocked_for(&self, keys: &[String]) -> Option<u64> {
        let now = Instant::now();
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let mut wait = None;
        for k in keys {
            if let Some(q) = map.get_mut(k) {
                while q
                    .front()
                    .is_some_and(|t| now.duration_since(*t) > self.window)
                {
                    q.pop_front();
                }
                // A room behind one NAT shares an address: the per-address
                // budget is ten accounts' worth, the per-account one is tight.
                let budget = if k.starts_with("ip:") {
                    self.max_failures.saturating_mul(10)
                } else {
                    self.max_failures
                };
                if q.len() as u32 >= budget
                    && let Some(first) = q.front()
                {
                    let left = self.window.saturating_sub(now.duration_since(*first));
                    wait = Some(left.as_secs().max(1));
                }
            }
        }
        wait
    }

    pub fn record_failure(&self, keys: &[String]) {
        let now = Instant::now();
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() > 100_000 {
            // Bounded memory under a spray of addresses: forget old windows.
            map.retain(|_, q| {
                q.back()
                    .is_some_and(|t| now.duration_since(*t) < self.window)
            });
        }
        for k in keys {
            map.entry(k.clone()).or_default().push_back(now);
        }
    }

    pub fn clear(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    fn cached_basic(&self, key: &[u8; 32]) -> Option<User> {
        let map = self.basic_cache.lock().unwrap_or_else(|p| p.into_inner());
        map.get(key)
            .filter(|(_, t)| t.elapsed() < BASIC_CACHE_TTL)
            .map(|(u, _)| u.clone())
    }

    fn forget_basic(&self, key: &[u8; 32]) {
        self.basic_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    fn remember_basic(&self, key: [u8; 32], user: User) {
        let mut map = self.basic_cache.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() > 10_000 {
            map.retain(|_, (_, t)| t.elapsed() < BASIC_CACHE_TTL);
        }
        map.insert(key, (user, Instant::now()));
    }
}

pub fn limiter_keys(ip: IpAddr, user: &str) -> Vec<String> {
    vec![
        format!("ip:{ip}"),
        format!("user:{}", user.to_ascii_lowercase()),
    ]
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

fn wants_html(req: &Request) -> bool {
    req.method() == Method::GET
        && req
            .headers()
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("text/html"))
}

fn client_ip(req: &Request) -> IpAddr {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .unwrap_or(IpAddr::from([127, 0, 0, 1]))
}

fn unauthorized(req: &Request) -> Response {
    if wants_html(req) {
        let next = req
            .extensions()
            .get::<Scope>()
            .map(|s| s.original_path.clone())
            .unwrap_or_else(|| req.uri().path().to_string());
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

fn too_many(secs: u64) -> Response {
    (
        StatusCode::TOO_MANY_REQUESTS,
        [(header::RETRY_AFTER, secs.to_string())],
        format!("Too many failed logins. Try again in {secs} seconds."),
    )
        .into_response()
}

/// Middleware: authenticates the request, checks the participant scope, and
/// puts [`Caller`] and [`Participant`] into its extensions.
pub async fn require_auth(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let mut new_cookie = None;
    let mut user = None;
    if let Some(token) = cookie_value(req.headers(), SESSION_COOKIE) {
        match state.store.session_user(token).await {
            Ok(u) => user = u,
            Err(e) => return crate::error::ApiError::Store(e).into_response(),
        }
    }
    if user.is_none()
        && let Some((name, pass)) = basic_credentials(req.headers())
    {
        let key: [u8; 32] = Sha256::digest(format!("{name}\0{pass}").as_bytes()).into();
        if let Some(u) = state.auth.cached_basic(&key) {
            // The cache spares the hash, not the account check: a disabled or
            // removed account is refused at once (and a role change applies).
            match state.store.get_user(&u.name).await {
                Ok(Some(fresh)) if !fresh.disabled => user = Some(fresh),
                Ok(_) => state.auth.forget_basic(&key),
                Err(e) => return crate::error::ApiError::Store(e).into_response(),
            }
        } else {
            let keys = limiter_keys(client_ip(&req), &name);
            if let Some(secs) = state.auth.blocked_for(&keys) {
                return too_many(secs);
            }
            match state.store.verify_password(&name, &pass).await {
                Ok(Some(u)) => {
                    state.auth.clear(&keys[1]);
                    state.auth.remember_basic(key, u.clone());
                    user = Some(u);
                }
                Ok(None) => {
                    state.auth.record_failure(&keys);
                    metrics::counter!(crate::telemetry::LOGIN_FAILURES).increment(1);
                }
                Err(e) => return crate::error::ApiError::Store(e).into_response(),
            }
        }
        // A page loaded with Basic Auth also gets the cookie, so the WebSocket
        // upgrade authenticates where a browser does not resend Basic credentials.
        if let Some(u) = &user
            && wants_html(&req)
        {
            match state
                .store
                .create_session(&u.name, state.settings.session_ttl.as_millis() as i64)
                .await
            {
                Ok(token) => new_cookie = Some(session_cookie(&state, &token)),
                Err(e) => tracing::warn!(error = %e, "could not create a session"),
            }
        }
    }
    let Some(user) = user else {
        return unauthorized(&req);
    };
    let scope = req.extensions().get::<Scope>().cloned().unwrap_or_default();
    let name = match scope.user {
        None => user.name.clone(),
        Some(ref target) if *target == user.name => user.name.clone(),
        Some(ref target) if user.role == Role::Admin => match state.store.get_user(target).await {
            Ok(Some(_)) => target.clone(),
            Ok(None) => return StatusCode::NOT_FOUND.into_response(),
            Err(e) => return crate::error::ApiError::Store(e).into_response(),
        },
        Some(_) => {
            return (
                StatusCode::FORBIDDEN,
                "This workspace belongs to another participant.",
            )
                .into_response();
        }
    };
    if let Err(e) = crate::provision::ensure_user(&state, &name).await {
        tracing::error!(user = %name, error = %e, "could not prepare the participant's folders");
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            "could not prepare your workspace",
        )
            .into_response();
    }
    req.extensions_mut().insert(Caller(user.clone()));
    req.extensions_mut()
        .insert(Participant { name, caller: user });
    let mut resp = next.run(req).await;
    if let Some(c) = new_cookie {
        resp.headers_mut().append(header::SET_COOKIE, c);
    }
    resp
}
