//! The participant-facing HTTP gateway: accounts and login, the per-participant
//! ComfyUI API (`/api/*`, `/ws`), the static frontend, `/view` and `/upload`.

pub mod api;
pub mod auth;
pub mod error;
pub mod extension;
pub mod frontend;
pub mod hub;
pub mod login;
pub mod paths;
pub mod provision;
pub mod scope;
pub mod state;
pub mod telemetry;
pub mod ws;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
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
    let reserved = scope::reserved_names(&settings.frontend_dir);
    let extensions = frontend::extension_list(&settings.frontend_dir);
    let auth = auth::AuthState::new(settings.login_max_failures, settings.login_window);
    let state = AppState {
        settings: Arc::new(settings),
        store,
        hub,
        queue,
        auth: Arc::new(auth),
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

async fn track_metrics(req: Request, next: Next) -> Response {
    let start = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "static".into());
    let method = req.method().to_string();
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    metrics::counter!(telemetry::HTTP_REQUESTS, "route" => route.clone(), "method" => method, "status" => status)
        .increment(1);
    metrics::histogram!(telemetry::HTTP_DURATION, "route" => route)
        .record(start.elapsed().as_secs_f64());
    resp
}

async fn banner_status(
    State(state): State<AppState>,
    who: auth::Participant,
) -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({
        "user": who.name,
        "backend": state.settings.backend_label,
        "message": serde_json::Value::Null,
    }))
}

/// The whole router (before the participant-prefix rewrite).
pub fn router(state: AppState) -> Router {
    let api = api::routes().route("/comfyume/status", get(banner_status));
    let authed = Router::new()
        .merge(api.clone())
        .nest("/api", api)
        .merge(api::internal_routes())
        .route("/", get(frontend::index))
        .route("/index.html", get(frontend::index))
        .route("/__comfyume_add_slash", get(frontend::add_slash))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_auth,
        ));
    let public = Router::new()
        .route("/login", get(login::login_page).post(login::login_submit))
        .route("/logout", get(login::logout).post(login::logout))
        .route("/healthz", get(|| async { "ok" }))
        .fallback(frontend::static_file);
    // Compress text, never media (Range requests on video must stay byte-exact).
    let predicate = SizeAbove::new(1024)
        .and(NotForContentType::IMAGES)
        .and(NotForContentType::const_new("video/"))
        .and(NotForContentType::const_new("audio/"))
        .and(NotForContentType::const_new("application/octet-stream"));
    authed
        .merge(public)
        .layer(DefaultBodyLimit::max(
            state.settings.max_upload_bytes as usize,
        ))
        .layer(middleware::from_fn(track_metrics))
        .layer(CompressionLayer::new().compress_when(predicate))
        .with_state(state)
}

/// Serves the gateway on `listener` until `shutdown` resolves.
pub async fn launch(
    state: AppState,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let reserved = state.reserved.clone();
    let app = router(state);
    let svc = tower::util::MapRequestLayer::new(move |req: Request| scope::rewrite(req, &reserved))
        .layer(app);
    let make = axum::ServiceExt::<Request>::into_make_service_with_connect_info::<SocketAddr>(svc);
    axum::serve(listener, make)
        .with_graceful_shutdown(shutdown)
        .await
}
