//! `comfyume serve`: wires the store, the gateway and telemetry together.

use std::path::PathBuf;
use std::time::Duration;

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use comfyume_dispatch::comfyui::ComfyUiBackend;
use comfyume_dispatch::{Backend, Dispatcher, Timeouts};
use comfyume_gateway::{AppState, Settings};

use crate::config::{CommonArgs, InferenceMode, ServeArgs, ServeConfig, resolve_serve};

/// What the serverless backend needs from the running server, bound once the
/// gateway's state exists (the backend is built before it).
#[derive(Default)]
struct ServerlessHost {
    state: std::sync::OnceLock<AppState>,
}

#[async_trait::async_trait]
impl comfyume_serverless::Host for ServerlessHost {
    /// To the participants named and everyone whose job waits in the workshop queue,
    /// as the banner's own message type.
    fn announce(&self, users: &[String], message: &str) {
        let Some(state) = self.state.get() else {
            return;
        };
        let mut to: std::collections::BTreeSet<String> = users.iter().cloned().collect();
        to.extend(state.queue.projected_order().into_iter().map(|(_, u)| u));
        let msg =
            serde_json::json!({"type": "comfyume", "data": {"message": message, "gpu": true}})
                .to_string();
        for u in to {
            state.queue.events().to_user(&u, &msg);
        }
    }

    async fn node_definitions(&self, info: serde_json::Value) {
        let Some(state) = self.state.get() else {
            return;
        };
        let n = info.as_object().map(|m| m.len()).unwrap_or(0);
        match comfyume_gateway::replace_object_info(state, info, "serverless warm-up").await {
            Ok(()) => tracing::info!(nodes = n, "node definitions from the serverless warm-up"),
            Err(e) => tracing::error!(error = %e, "could not store node definitions"),
        }
    }
}

/// The serverless backend, and its host to bind later.
type Serverless = Option<(
    Arc<comfyume_serverless::ServerlessBackend>,
    Arc<ServerlessHost>,
)>;

/// The backends jobs run on, a label for people, and the in-process simulator
/// (kept alive as long as the server runs) when that is the backend.
async fn build_backends(
    cfg: &ServeConfig,
    store: &Arc<dyn comfyume_store::Store>,
) -> Result<(
    Vec<Arc<dyn Backend>>,
    String,
    Option<comfyume_sim::SimHandle>,
    Serverless,
)> {
    let timeouts = Timeouts::default();
    match cfg.inference_mode {
        InferenceMode::Local => {
            let mut out: Vec<Arc<dyn Backend>> = Vec::new();
            for (i, url) in cfg.comfyui_urls.iter().enumerate() {
                let name = if cfg.comfyui_urls.len() == 1 {
                    "comfyui".to_string()
                } else {
                    format!("comfyui-{}", i + 1)
                };
                // `/view` waits for a result still being copied: announced at once.
                let b = ComfyUiBackend::new(name, url.clone(), cfg.backend_slots, timeouts)
                    .with_context(|| format!("COMFYUI_URLS entry {url}"))?
                    .announcing_results_early();
                out.push(Arc::new(b));
            }
            tracing::info!(
                servers = out.len(),
                "jobs run on ComfyUI servers (INFERENCE_MODE=local)"
            );
            let label = if out.len() == 1 {
                "ComfyUI".to_string()
            } else {
                format!("{} ComfyUI servers", out.len())
            };
            Ok((out, label, None, None))
        }
        InferenceMode::Simulator => {
            let mut sim_cfg =
                comfyume_sim::SimConfig::from_env().context("simulator settings (SIMULATOR_*)")?;
            if sim_cfg.data_dir.is_none() {
                sim_cfg.data_dir = Some(cfg.data_dir.join("simulator"));
            }
            // The simulator has no login, like ComfyUI itself: it listens on loopback under a
            // random path only this process knows, so other local users cannot reach it.
            sim_cfg.base_path = Some(comfyume_sim::random_base_path());
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let sim = comfyume_sim::try_spawn(sim_cfg, listener)
                .await
                .context("starting the simulator")?;
            let b = ComfyUiBackend::new("simulator", sim.url(), cfg.backend_slots, timeouts)?
                .announcing_results_early();
            // The address only: the URL holds the secret path.
            tracing::warn!(
                addr = %sim.addr(),
                "no GPU backend configured: jobs run on the built-in SIMULATOR (outputs are placeholders stamped SIMULATED). \
                 Set INFERENCE_MODE=local with COMFYUI_URLS to use real ComfyUI servers."
            );
            println!(
                "backend: simulator at {} under a secret path (no GPU; set COMFYUI_URLS for real ComfyUI servers)",
                sim.addr()
            );
            Ok((
                vec![Arc::new(b) as Arc<dyn Backend>],
                "simulator (no GPU)".into(),
                Some(sim),
                None,
            ))
        }
        InferenceMode::NoBackend => {
            tracing::warn!("INFERENCE_MODE=none: no backend; jobs are accepted and stay queued");
            println!("backend: none (jobs stay queued)");
            Ok((
                Vec::new(),
                "no backend (jobs stay queued)".into(),
                None,
                None,
            ))
        }
        InferenceMode::Serverless => {
            let sl_cfg = cfg
                .serverless
                .clone()
                .context("INFERENCE_MODE=serverless settings missing")?;
            let host = Arc::new(ServerlessHost::default());
            let b =
                comfyume_serverless::ServerlessBackend::new(sl_cfg, store.clone(), host.clone())
                    .await
                    .context("the serverless backend")?;
            let r = b.routing();
            tracing::info!(active = %r.active, failover = ?r.failover, "jobs run on serverless GPUs (INFERENCE_MODE=serverless)");
            println!("backend: serverless (active endpoint {})", r.active);
            Ok((
                vec![b.clone() as Arc<dyn Backend>],
                "serverless GPU".into(),
                None,
                Some((b, host)),
            ))
        }
    }
}

/// Refreshes the node definitions from the first backend that answers; keeps
/// the stored snapshot while none does.
async fn refresh_object_info(state: AppState, backends: Vec<Arc<dyn Backend>>) {
    // The first round happens before the listener opens (bounded), so a
    // participant's first page load already has the backend's nodes.
    let first = tokio::time::timeout(Duration::from_secs(5), refresh_once(&state, &backends)).await;
    if matches!(first, Ok(true)) || backends.is_empty() {
        return;
    }
    tokio::spawn(async move {
        let mut delay = Duration::from_secs(2);
        loop {
            if refresh_once(&state, &backends).await {
                return;
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(60));
        }
    });
}

/// One pass over the backends; true once one answered with node definitions.
async fn refresh_once(state: &AppState, backends: &[Arc<dyn Backend>]) -> bool {
    {
        {
            for b in backends {
                match b.object_info().await {
                    Ok(v) if v.as_object().is_some_and(|m| !m.is_empty()) => {
                        let n = v.as_object().map(|m| m.len()).unwrap_or(0);
                        match comfyume_gateway::replace_object_info(
                            state,
                            v,
                            &format!("backend:{}", b.name()),
                        )
                        .await
                        {
                            Ok(()) => tracing::info!(
                                backend = b.name(),
                                nodes = n,
                                "node definitions refreshed"
                            ),
                            Err(e) => {
                                tracing::error!(error = %e, "could not store node definitions")
                            }
                        }
                        return true;
                    }
                    Ok(_) => tracing::warn!(backend = b.name(), "backend has no node definitions"),
                    Err(e) => {
                        tracing::warn!(backend = b.name(), error = %e, "backend not reachable for node definitions yet")
                    }
                }
            }
            false
        }
    }
}

/// SIGTERM or SIGINT. The handlers are installed here, before "listening" is printed:
/// installed lazily, a signal in the first moments after start killed the process
/// instead of stopping it gracefully.
#[cfg(unix)]
fn shutdown_signal() -> Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::info!("shutting down");
    })
}

#[cfg(not(unix))]
fn shutdown_signal() -> Result<impl Future<Output = ()>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutting down");
    })
}

/// Compresses the frontend's files once, in the background: until it is done they are
/// served plain (or gzipped on the fly), never blocked. A read-only folder is fine: it
/// stays plain, and `comfyume frontend precompress` can be run where it is writable.
fn precompress_frontend(dir: PathBuf) {
    use comfyume_gateway::precompress::{self, PrecompressError};
    if precompress::is_done(&dir) {
        return;
    }
    tracing::info!(dir = %dir.display(), "compressing the frontend's files once (brotli, gzip) in the background");
    tokio::spawn(async move {
        let started = std::time::Instant::now();
        let d = dir.clone();
        match tokio::task::spawn_blocking(move || precompress::precompress(&d)).await {
            Ok(Ok(s)) => tracing::info!(
                files = s.compressed,
                kib = s.bytes / 1024,
                br_kib = s.br_bytes / 1024,
                gz_kib = s.gz_bytes / 1024,
                secs = started.elapsed().as_secs_f64(),
                "frontend precompressed"
            ),
            Ok(Err(e @ PrecompressError::Busy { .. })) => {
                tracing::info!(error = %e, "frontend precompression")
            }
            Ok(Err(e)) => tracing::warn!(
                error = %e,
                "could not precompress the frontend; its files are served without brotli"
            ),
            Err(e) => tracing::error!(error = %e, "frontend precompression task failed"),
        }
    });
}

/// Part files of output copies that an earlier process was killed in the middle of: hidden,
/// never served or counted, but taking disk space. Removed in the background at start.
fn remove_stale_parts(data_dir: &std::path::Path) {
    /// Far longer than any copy under way goes without writing (see `Timeouts::transfer`).
    const STALE: std::time::Duration = std::time::Duration::from_secs(3600);
    let roots = [data_dir.join("outputs"), data_dir.join("temp")];
    tokio::spawn(async move {
        let removed = tokio::task::spawn_blocking(move || {
            roots
                .iter()
                .map(|r| comfyume_comfyui::outputs::remove_stale_parts(r, STALE))
                .sum::<usize>()
        })
        .await;
        match removed {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                files = n,
                "removed part files of copies an earlier process left unfinished"
            ),
            Err(e) => tracing::error!(error = %e, "the cleanup of unfinished copies failed"),
        }
    });
}

pub async fn run(common: &CommonArgs, args: &ServeArgs) -> Result<()> {
    let cfg = resolve_serve(common, args)?;
    crate::logging::init(&cfg.log_format);
    if !cfg.frontend_dir.join("index.html").is_file() {
        bail!(
            "the ComfyUI frontend is not installed at {dir}\n\
             install it with:\n    scripts/install-frontend.sh {data}\n\
             (it runs `pip install comfyui-frontend-package=={v}` and copies its static/ folder to {dir}),\n\
             or point COMFYUME_FRONTEND_DIR / --frontend-dir at an existing copy",
            dir = cfg.frontend_dir.display(),
            data = cfg.data_dir.display(),
            v = crate::config::FRONTEND_VERSION,
        );
    }
    let store = crate::open_store(&cfg.data_dir).await?;
    precompress_frontend(cfg.frontend_dir.clone());
    remove_stale_parts(&cfg.data_dir);

    // Off: no recorder, so every metrics macro is a no-op (COMFYUME_METRICS=off).
    let recorder = if cfg.metrics {
        Some(crate::telemetry::install()?)
    } else {
        tracing::info!("COMFYUME_METRICS=off: no metrics are recorded");
        None
    };
    tracing::info!(
        version = crate::telemetry::VERSION,
        commit = crate::telemetry::COMMIT,
        "comfyume starting"
    );

    let (backends, label, _sim, serverless) = build_backends(&cfg, &store).await?;

    let mut settings = Settings::with_data_dir(&cfg.data_dir, &cfg.frontend_dir);
    settings.backend_label = label.clone();
    settings.templates_dir = cfg.templates_dir.clone();
    settings.max_upload_bytes = cfg.max_upload_bytes;
    settings.user_quota_bytes = cfg.user_quota_bytes;
    settings.secure_cookies = cfg.domain.is_some();
    settings.domain = cfg.domain.clone();
    settings.trusted_proxies = cfg.net.trusted_proxies.clone();
    settings.header_read_timeout = cfg.net.header_read_timeout;
    settings.idle_timeout = cfg.net.idle_timeout;
    settings.max_sockets_per_user = cfg.net.max_sockets_per_user;
    settings.max_connections = cfg.net.max_connections;
    if !settings.trusted_proxies.is_empty() {
        let list: Vec<String> = settings
            .trusted_proxies
            .iter()
            .map(|c| c.to_string())
            .collect();
        tracing::info!(proxies = %list.join(","), "forwarding headers are believed from these peers only");
    }
    settings.session_ttl = Duration::from_secs(cfg.session_ttl_hours * 3600);
    let (state, in_flight) = comfyume_gateway::build_state(settings, store, cfg.queue.clone())
        .await
        .context("opening the job queue")?;
    if !in_flight.is_empty() {
        tracing::warn!(
            jobs = in_flight.len(),
            "jobs were on a backend when the server last stopped"
        );
    }
    // What the instructor set at run time (policy, limits, pause, levels) before any job is taken.
    comfyume_admin::settings::restore(&state).await;
    tracing::info!(policy = %state.queue.policy(), queued = state.queue.queued_len(), paused = state.queue.is_paused(), "queue open");
    let dispatcher = Dispatcher::new(
        state.queue.clone(),
        backends.clone(),
        cfg.dispatch.clone(),
        cfg.data_dir.clone(),
    );
    let _dispatch = dispatcher.start(in_flight);
    let collector = recorder.map(|handle| {
        crate::telemetry::Collector::new(
            handle,
            state.store.clone(),
            state.queue.clone(),
            dispatcher.clone(),
            cfg.data_dir.clone(),
        )
    });
    let backends_empty = backends.is_empty();
    if let Some((b, host)) = &serverless {
        let _ = host.state.set(state.clone());
        b.start();
        // Never a probe of a public endpoint at start: node definitions come from the
        // stored snapshot, a warm-up, or `comfyume object-info import`.
    } else {
        refresh_object_info(state.clone(), backends).await;
    }
    let nodes = state.object_info().info.len();
    if nodes == 0 && backends_empty {
        tracing::warn!(
            "no node definitions yet: no backend has been reached and none were imported \
             (`comfyume object-info import FILE`); the node library stays empty until a backend answers"
        );
    } else {
        tracing::info!(nodes, "node definitions loaded");
    }

    let admin = comfyume_admin::Admin::new(&state, Some(dispatcher.clone()));
    let mut extra = comfyume_admin::routes_with(admin.clone(), serverless.map(|(b, _)| b));
    if let Some(c) = &collector {
        let metrics_listener = tokio::net::TcpListener::bind(cfg.metrics_listen)
            .await
            .with_context(|| format!("binding the metrics listener {}", cfg.metrics_listen))?;
        let metrics_addr = metrics_listener.local_addr()?;
        let app = crate::telemetry::metrics_app(c.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(metrics_listener, app).await {
                tracing::error!(error = %e, "metrics listener stopped");
            }
        });
        crate::telemetry::spawn_upkeep(c.handle.clone());
        extra = extra.merge(crate::telemetry::admin_route(c.clone()));
        tracing::info!(addr = %metrics_addr, "metrics at /metrics");
        // Machine-readable, before the `listening on` line (tests bind port 0).
        println!("metrics on http://{metrics_addr}/metrics");
    }

    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    let shutdown = shutdown_signal()?;
    tracing::info!(%addr, data_dir = %cfg.data_dir.display(), "comfyume is listening");
    // Machine-readable line for scripts and tests that bind port 0.
    println!("listening on http://{addr}");
    let extra = comfyume_admin::audited(extra, &state, &admin);
    comfyume_gateway::launch_with_limits(state, listener, extra, cfg.limits, shutdown).await?;
    Ok(())
}
