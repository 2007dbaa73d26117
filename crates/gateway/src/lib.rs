//! The participant-facing HTTP gateway: accounts and login, the per-participant
//! ComfyUI API (`/api/*`, `/ws`), the static frontend, `/view` and `/upload`.

pub mod accounts;
pub mod api;
pub mod auth;
pub mod basic_cache;
pub mod error;
pub mod export;
pub mod extension;
pub mod frontend;
pub mod fsx;
pub mod headers;
pub mod hub;
pub mod limits;
pub mod login;
pub mod observe;
pub mod paths;
pub mod precompress;
pub mod provision;
pub mod proxy;
pub mod quota;
pub mod scope;
pub mod server;
pub mod signin;
pub mod sniff;
pub mod state;
pub mod telemetry;
pub mod templates;
pub mod throttle;
pub mod ws;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};

use axum::Router;
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequestParts, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use comfyume_dispatch::{Queue, QueueConfig, QueueError};
use comfyume_store::{JobRecord, Store};
use tokio::net::TcpListener;
use tower::Layer;
use tower_http::compression::CompressionLayer;
use tower_http::compression::predicate::{NotForContentType, Predicate, SizeAbove};

pub use state::{AppState, Settings, UserDirs};

/// Builds the shared state: opens the queue over the store and loads the
/// object_info snapshot. Also returns the jobs a previous process left on a
/// backend, for the dispatcher to re-attach or retry.
pub async fn build_state(
    settings: Settings,
    store: Arc<dyn Store>,
    queue_cfg: QueueConfig,
) -> Result<(AppState, Vec<JobRecord>), QueueError> {
    let hub = Arc::new(hub::Hub::new());
    let (queue, in_flight) = Queue::open(store.clone(), queue_cfg, hub.clone()).await?;
    let object_info = match store.get_meta(OBJECT_INFO_KEY).await {
        Ok(Some(entry)) => serde_json::from_str(&entry.value).unwrap_or_else(|e| {
            tracing::error!(error = %e, "stored object_info snapshot is not valid JSON; ignoring it");
            serde_json::json!({})
        }),
        Ok(None) => serde_json::json!({}),
        Err(e) => {
            tracing::error!(error = %e, "could not read the object_info snapshot");
            serde_json::json!({})
        }
    };
    // Both read the frontend's folder: off the runtime's threads.
    let dir = settings.frontend_dir.clone();
    let (reserved, extensions) = tokio::task::spawn_blocking(move || {
        (scope::reserved_names(&dir), frontend::extension_list(&dir))
    })
    .await
    .map_err(|e| QueueError::Store(comfyume_store::StoreError::Other(e.to_string())))?;
    let throttle = throttle::Throttle::new(throttle::ThrottleConfig::new(
        settings.login_max_failures,
        settings.login_delay,
        settings.login_window,
    ));
    let state = AppState {
        settings: Arc::new(settings),
        store,
        hub,
        queue,
        throttle: Arc::new(throttle),
        basic_cache: Arc::new(basic_cache::BasicCache::new()),
        object_info: Arc::new(RwLock::new(Arc::new(state::NodeDefs::new(object_info)))),
        extensions: Arc::new(extensions),
        reserved: Arc::new(reserved),
        known_users: Arc::new(Mutex::new(Default::default())),
        settings_locks: Arc::new(Mutex::new(Default::default())),
    };
    Ok((state, in_flight))
}

/// The meta key of the node definitions snapshot.
pub const OBJECT_INFO_KEY: &str = "object_info";

/// Stores a new node definitions snapshot and starts serving it.
pub async fn replace_object_info(
    state: &AppState,
    value: serde_json::Value,
    source: &str,
) -> Result<(), comfyume_store::StoreError> {
    state
        .store
        .put_meta(OBJECT_INFO_KEY, &value.to_string(), source)
        .await?;
    state.set_object_info(value);
    Ok(())
}

/// Who the client is (see [`proxy`]): from the socket, or from a trusted proxy's headers.
async fn client_info(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .unwrap_or(IpAddr::from([127, 0, 0, 1]));
    let client = proxy::Client::from_parts(peer, req.headers(), &state.settings.trusted_proxies);
    req.extensions_mut().insert(client);
    next.run(req).await
}

/// Cross-site request guard. Browsers resend cached Basic credentials on
/// cross-site requests, so a state-changing request (or a WebSocket upgrade)
/// whose `Origin` is not this server is refused, as ComfyUI refuses them
/// (403, empty body). Requests without an `Origin` (scripts) pass. Behind a
/// reverse proxy "this server" is also the public origin: `DOMAIN`, or the host
/// a trusted proxy forwarded.
async fn same_origin(State(state): State<AppState>, req: Request, next: Next) -> Response {
    use axum::http::{Method, StatusCode, header};
    let upgrade = req.headers().contains_key(header::UPGRADE);
    let safe = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) && !upgrade;
    if !safe && let Some(origin) = req.headers().get(header::ORIGIN) {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok());
        let client = req.extensions().get::<proxy::Client>();
        let allowed = match (origin.to_str(), client) {
            (Ok(origin), Some(client)) => {
                proxy::origin_allowed(origin, host, state.settings.domain.as_deref(), client)
            }
            _ => false,
        };
        if !allowed {
            return StatusCode::FORBIDDEN.into_response();
        }
    }
    next.run(req).await
}

/// Authenticates every route behind it (the [`auth::Participant`] extractor, run once per
/// request), makes an instructor-opened workspace ready, and puts the cookie of a session
/// made for a Basic Auth page load on the answer.
async fn authenticated(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let (mut parts, body) = req.into_parts();
    let who = match auth::Participant::from_request_parts(&mut parts, &state).await {
        Ok(w) => w,
        Err(rejection) => return rejection,
    };
    // The request's span (see `observe`): its log lines now name the participant.
    tracing::Span::current().record("user", who.name.as_str());
    // A participant's folders are made when they sign in; the instructor may open a
    // workspace before its owner ever did.
    if who.name != who.caller.name
        && let Err(e) = provision::ensure_user(&state, &who.name).await
    {
        tracing::error!(user = %who.name, error = %e, "could not prepare the participant's folders");
        return auth::sign_in_error(signin::SignInError::Workspace(e));
    }
    let cookie = parts.extensions.remove::<auth::NewSession>();
    let mut resp = next.run(Request::from_parts(parts, body)).await;
    if let Some(auth::NewSession(c)) = cookie {
        resp.headers_mut().append(axum::http::header::SET_COOKIE, c);
    }
    resp
}

/// `/api/comfyume/status`: what the participant's banner shows: who they
/// are, where their next job stands in the workshop queue, and where it runs.
async fn banner_status(
    State(state): State<AppState>,
    who: auth::Participant,
) -> Result<axum::Json<serde_json::Value>, error::ApiError> {
    use comfyume_store::{JobQuery, JobState};
    let order = state.queue.projected_order();
    let ahead = order.iter().position(|(_, u)| *u == who.name);
    let waiting = order.iter().filter(|(_, u)| *u == who.name).count();
    let (running, _) = state
        .store
        .list_jobs(&JobQuery {
            user: Some(who.name.clone()),
            states: vec![JobState::Dispatched, JobState::Running],
            ..Default::default()
        })
        .await?;
    let running_on: Vec<String> = running.iter().filter_map(|r| r.backend.clone()).collect();
    let message = match (running_on.first(), ahead) {
        (Some(b), _) => Some(format!("Your job is running on {b}")),
        (None, Some(0)) => Some("Your job is next in the workshop queue".to_string()),
        (None, Some(n)) => Some(format!("{n} job(s) ahead of yours in the workshop queue")),
        (None, None) => None,
    };
    let used = quota::usage(&state, &who.name).await.total();
    Ok(axum::Json(serde_json::json!({
        "user": who.name,
        "backend": state.settings.backend_label,
        "queue_position": ahead,
        "waiting": waiting,
        "running_on": running_on,
        "message": message,
        // What the participant's files take, and the quota (null: none).
        "storage": {"used_bytes": used, "quota_bytes": state.settings.user_quota_bytes},
    })))
}

/// The whole router (before the participant-prefix rewrite). `extra` routes
/// (the instructor's API) sit behind the same authentication.
pub fn router(state: AppState, extra: Router<AppState>) -> Router {
    router_with_limits(state, extra, limits::Limits::default())
}

/// [`router`] with the request-size limits of this server.
pub fn router_with_limits(
    state: AppState,
    extra: Router<AppState>,
    limits: limits::Limits,
) -> Router {
    let api = api::routes()
        .route("/comfyume/status", get(banner_status))
        .route("/comfyume/export.zip", get(export::download_my_work));
    let authed = Router::new()
        .merge(api.clone())
        .nest("/api", api)
        .merge(api::internal_routes())
        .merge(api::assets_routes())
        .route("/", get(frontend::index))
        .route("/index.html", get(frontend::index))
        .route("/__comfyume_add_slash", get(frontend::add_slash))
        .route("/templates/{*rest}", get(templates::serve))
        .merge(extra)
        .layer(middleware::from_fn_with_state(state.clone(), authenticated));
    let public = Router::new()
        .route("/login", get(login::login_page).post(login::login_submit))
        .route("/logout", get(login::logout).post(login::logout))
        .route("/healthz", get(|| async { "ok" }))
        .fallback(frontend::static_file);
    // Compress text, never media (Range requests on video must stay byte-exact). Gzip
    // only: a brotli encoder holds megabytes per response, and the big static files are
    // served precompressed (see `precompress`), so on the fly is only for API answers.
    let predicate = SizeAbove::new(1024)
        .and(NotForContentType::IMAGES)
        .and(NotForContentType::const_new("video/"))
        .and(NotForContentType::const_new("audio/"))
        .and(NotForContentType::const_new("application/octet-stream"))
        // Zips are streamed as they are read (see `export`): compressed already.
        .and(NotForContentType::const_new("application/zip"));
    authed
        .merge(public)
        .layer(DefaultBodyLimit::max(
            state.settings.max_upload_bytes as usize,
        ))
        .layer(axum::Extension(limits))
        .layer(middleware::from_fn_with_state(state.clone(), same_origin))
        .layer(middleware::from_fn_with_state(state.clone(), client_info))
        .layer(middleware::from_fn(headers::security_headers))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            observe::observe,
        ))
        .layer(
            CompressionLayer::new()
                .no_br()
                .no_deflate()
                .no_zstd()
                .compress_when(predicate),
        )
        .with_state(state)
}

/// Serves the gateway on `listener` until `shutdown` resolves.
pub async fn launch(
    state: AppState,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    launch_with(state, listener, Router::new(), shutdown).await
}

/// [`launch`] with extra authenticated routes (the instructor's API). Also watches the
/// store for account changes (see [`accounts`]) while it serves.
pub async fn launch_with(
    state: AppState,
    listener: TcpListener,
    extra: Router<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    launch_with_limits(state, listener, extra, limits::Limits::default(), shutdown).await
}

/// [`launch_with`] and the request-size limits (`MAX_JSON_BODY_MB`, ...).
pub async fn launch_with_limits(
    state: AppState,
    listener: TcpListener,
    extra: Router<AppState>,
    limits: limits::Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let reserved = state.reserved.clone();
    let conn_limits = server::ConnLimits {
        header_read_timeout: state.settings.header_read_timeout,
        idle_timeout: state.settings.idle_timeout,
        max_connections: state.settings.max_connections,
    };
    let watcher = accounts::spawn(state.clone());
    let app = router_with_limits(state, extra, limits);
    let svc = tower::util::MapRequestLayer::new(move |req: Request| scope::rewrite(req, &reserved))
        .layer(app);
    let served = server::serve(listener, svc, conn_limits, shutdown).await;
    watcher.abort();
    served
}
