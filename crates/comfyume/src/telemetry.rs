//! The server's metrics: the recorder (installed once, with every crate's help texts and
//! histogram buckets), the gauges read at each scrape (jobs by state from the store, each
//! participant's queue, backends, disk), and the `/metrics` routes. Conventions:
//! docs/monitoring.md.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use comfyume_dispatch::telemetry as dispatch_tm;
use comfyume_dispatch::{Dispatcher, Queue};
use comfyume_store::Store;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// 1, with the version and the git commit the binary was built from as labels.
pub const BUILD_INFO: &str = "comfyume_build_info";
/// Free space for the data directory (what an unprivileged process may still write).
pub const DATA_DIR_FREE_BYTES: &str = "comfyume_data_dir_free_bytes";
/// Size of the file system that holds the data directory.
pub const DATA_DIR_SIZE_BYTES: &str = "comfyume_data_dir_size_bytes";

/// The version and the commit of this binary (see build.rs).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const COMMIT: &str = env!("COMFYUME_GIT_COMMIT");

/// How long a scrape waits for the store's counters before answering with the last ones.
const STORE_READ_LIMIT: Duration = Duration::from_secs(2);

fn describe() {
    metrics::describe_gauge!(
        BUILD_INFO,
        "1, labelled with the version and git commit of the running binary"
    );
    metrics::describe_gauge!(
        DATA_DIR_FREE_BYTES,
        metrics::Unit::Bytes,
        "Free space on the file system of the data directory"
    );
    metrics::describe_gauge!(
        DATA_DIR_SIZE_BYTES,
        metrics::Unit::Bytes,
        "Size of the file system of the data directory"
    );
}

/// Installs the process's recorder with every crate's buckets and help texts.
pub fn install() -> Result<PrometheusHandle> {
    let mut builder = PrometheusBuilder::new();
    for (name, buckets) in comfyume_store::telemetry::BUCKETS
        .iter()
        .chain(dispatch_tm::BUCKETS)
        .chain(comfyume_dispatch::comfyui::telemetry::BUCKETS)
        .chain(comfyume_gateway::telemetry::BUCKETS)
    {
        builder = builder
            .set_buckets_for_metric(Matcher::Full((*name).to_string()), buckets)
            .with_context(|| format!("histogram buckets of {name}"))?;
    }
    let handle = builder
        .install_recorder()
        .context("installing the metrics recorder")?;
    describe();
    comfyume_store::telemetry::describe();
    dispatch_tm::describe();
    comfyume_dispatch::comfyui::telemetry::describe();
    comfyume_gateway::telemetry::describe();
    dispatch_tm::enable_fractional();
    metrics::gauge!(BUILD_INFO, "version" => VERSION, "commit" => COMMIT).set(1.0);
    // Known at start (nobody is connected yet), so the dashboard shows 0, not "no data".
    metrics::gauge!(comfyume_gateway::telemetry::WS_OPEN).set(0.0);
    metrics::gauge!(comfyume_gateway::telemetry::PARTICIPANTS_ONLINE).set(0.0);
    Ok(handle)
}

/// What the gauges are read from at each scrape.
pub struct Collector {
    pub handle: PrometheusHandle,
    pub store: Arc<dyn Store>,
    pub queue: Arc<Queue>,
    pub dispatcher: Arc<Dispatcher>,
    pub data_dir: PathBuf,
    /// Participants given a `comfyume_participant_jobs` series: set to 0 when they leave
    /// the scheduler, never left at a stale count.
    seen: Mutex<HashSet<String>>,
}

impl Collector {
    pub fn new(
        handle: PrometheusHandle,
        store: Arc<dyn Store>,
        queue: Arc<Queue>,
        dispatcher: Arc<Dispatcher>,
        data_dir: PathBuf,
    ) -> Arc<Self> {
        Arc::new(Collector {
            handle,
            store,
            queue,
            dispatcher,
            data_dir,
            seen: Mutex::new(HashSet::new()),
        })
    }

    /// Reads the gauges' sources now.
    pub async fn collect(&self) {
        match tokio::time::timeout(STORE_READ_LIMIT, self.store.job_state_counts()).await {
            Ok(Ok(counts)) => {
                for (state, n) in counts {
                    metrics::gauge!(dispatch_tm::JOBS, "state" => state.as_str()).set(n as f64);
                }
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "metrics: could not read the job counts"),
            Err(_) => tracing::warn!("metrics: the job counts took too long to read"),
        }
        let (users, oldest_ms) = self.queue.load();
        metrics::gauge!(dispatch_tm::QUEUE_OLDEST_WAIT).set(oldest_ms as f64 / 1000.0);
        {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            let now: HashSet<&str> = users.iter().map(|(u, _, _)| u.as_str()).collect();
            for gone in seen.iter().filter(|u| !now.contains(u.as_str())) {
                for state in ["queued", "running"] {
                    metrics::gauge!(dispatch_tm::PARTICIPANT_JOBS, "user" => gone.clone(), "state" => state)
                        .set(0.0);
                }
            }
            seen.retain(|u| now.contains(u.as_str()));
            for (user, queued, running) in users {
                metrics::gauge!(dispatch_tm::PARTICIPANT_JOBS, "user" => user.clone(), "state" => "queued")
                    .set(queued as f64);
                metrics::gauge!(dispatch_tm::PARTICIPANT_JOBS, "user" => user.clone(), "state" => "running")
                    .set(running as f64);
                seen.insert(user);
            }
        }
        self.dispatcher.record_metrics();
        match rustix::fs::statvfs(&self.data_dir) {
            Ok(st) => {
                let frsize = st.f_frsize;
                metrics::gauge!(DATA_DIR_FREE_BYTES).set((st.f_bavail * frsize) as f64);
                metrics::gauge!(DATA_DIR_SIZE_BYTES).set((st.f_blocks * frsize) as f64);
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics: could not read the data directory's free space")
            }
        }
    }

    /// The whole exposition: fresh gauges, the recorder's text, the fractional counters.
    pub async fn render(&self) -> String {
        self.collect().await;
        let mut text = self.handle.render();
        text.push_str(&dispatch_tm::render_fractional());
        text
    }
}

/// `text/plain; version=0.0.4`: Prometheus' text format.
async fn metrics_text(State(c): State<Arc<Collector>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        c.render().await,
    )
}

/// The metrics listener's app: `/metrics` only.
pub fn metrics_app(c: Arc<Collector>) -> axum::Router {
    axum::Router::new()
        .route("/metrics", axum::routing::get(metrics_text))
        .with_state(c)
}

/// `/metrics` on the main listener too, for instructors only (an operator whose
/// Prometheus cannot reach the metrics listener scrapes it with an instructor's login).
pub fn admin_route(c: Arc<Collector>) -> axum::Router<comfyume_gateway::AppState> {
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move |_: comfyume_admin::Instructor| {
            let c = c.clone();
            async move { metrics_text(State(c)).await }
        }),
    )
}

/// Drains the histograms' buckets now and then (the exporter needs the upkeep). Supervised:
/// a panic is logged and the loop starts again.
pub fn spawn_upkeep(handle: PrometheusHandle) {
    tokio::spawn(async move {
        loop {
            let h = handle.clone();
            // The loop never ends: only a panic comes back.
            let Err(e) = tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    h.run_upkeep();
                }
            })
            .await;
            tracing::error!(error = %e, "metrics upkeep crashed; restarting it");
        }
    });
}
