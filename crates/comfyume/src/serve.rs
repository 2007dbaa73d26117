//! `comfyume serve`: wires the store, the gateway and telemetry together.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use comfyume_gateway::Settings;

use crate::config::{CommonArgs, ServeArgs, resolve_serve};

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutting down");
}

pub async fn run(common: &CommonArgs, args: &ServeArgs) -> Result<()> {
    let cfg = resolve_serve(common, args)?;
    init_logging(&cfg.log_format);
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

    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("installing the metrics recorder")?;
    comfyume_gateway::telemetry::describe();

    let mut settings = Settings::with_data_dir(&cfg.data_dir, &cfg.frontend_dir);
    settings.templates_dir = cfg.templates_dir.clone();
    settings.max_upload_bytes = cfg.max_upload_bytes;
    settings.secure_cookies = cfg.domain.is_some();
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
    tracing::info!(policy = %state.queue.policy(), queued = state.queue.queued_len(), "queue open");
    let nodes = state.object_info().info.len();
    if nodes == 0 {
        tracing::warn!(
            "no node definitions yet: no backend has been reached and none were imported \
             (`comfyume object-info import FILE`); the node library will be empty"
        );
    } else {
        tracing::info!(nodes, "node definitions loaded");
    }

    let metrics_listener = tokio::net::TcpListener::bind(cfg.metrics_listen)
        .await
        .with_context(|| format!("binding the metrics listener {}", cfg.metrics_listen))?;
    let handle = recorder.clone();
    tokio::spawn(async move {
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let h = handle.clone();
                async move { h.render() }
            }),
        );
        if let Err(e) = axum::serve(metrics_listener, app).await {
            tracing::error!(error = %e, "metrics listener stopped");
        }
    });
    // The exporter needs periodic upkeep to drain histogram buckets.
    let upkeep = recorder.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });

    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, metrics = %cfg.metrics_listen, data_dir = %cfg.data_dir.display(), "comfyume is listening");
    // Machine-readable line for scripts and tests that bind port 0.
    println!("listening on http://{addr}");
    comfyume_gateway::launch(state, listener, shutdown_signal()).await?;
    Ok(())
}
