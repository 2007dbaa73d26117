//! `comfyume-worker`: the agent in a serverless GPU container. It runs one job per
//! `POST /run` request on the ComfyUI beside it and streams the job's events and outputs
//! back (`docs/worker-protocol.md`); `/health` tells the provider when it may send work.
//!
//! [`serve`] runs it on a listener until a shutdown signal (SIGTERM in the binary), so
//! tests run it in-process on port 0.

pub(crate) mod comfy;
pub mod config;
pub mod health;
mod http;
mod job;
pub mod results;
pub mod store;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use comfyume_comfyui::ComfyUiBackend;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

pub use config::Args;

/// Why the worker cannot start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("warm-up workflow {path}: {reason}")]
    Warmup { path: PathBuf, reason: String },
    #[error("ComfyUI: {0}")]
    Comfy(String),
    #[error("output store: {0}")]
    Store(#[from] store::StoreError),
    #[error("data directory {path}: {reason}")]
    DataDir { path: PathBuf, reason: String },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// State that health and admission read and change together.
pub(crate) struct Inner {
    pub health: health::State,
    pub results: results::Results,
}

/// Everything the routes, the job tasks and the ComfyUI supervisor share.
pub(crate) struct Shared {
    pub args: Args,
    pub worker_id: String,
    pub comfy: ComfyUiBackend,
    pub comfy_url: String,
    pub store: Option<store::OutputStore>,
    pub inner: Mutex<Inner>,
    /// `/object_info` as ComfyUI sent it, once known.
    pub object_info: Mutex<Option<Bytes>>,
    /// Counts ComfyUI's deaths; a running job aborts when it changes.
    pub deaths: watch::Sender<u64>,
    /// Cancelled on SIGTERM.
    pub stopping: CancellationToken,
    /// Signalled whenever the job slot is released.
    pub slot_freed: Notify,
    /// A job suspects ComfyUI is gone: the supervisor probes at once.
    pub check_comfy: Notify,
    pub jobs_dir: PathBuf,
    pub warmup: Option<Value>,
    /// Job ids sent to this ComfyUI already (a rerun gets a fresh ComfyUI prompt id).
    pub submitted: Mutex<std::collections::HashSet<String>>,
    pub reruns: AtomicU64,
    /// Numbers each run's directory.
    pub run_seq: AtomicU64,
    pub probe: reqwest::Client,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        lock(&self.inner)
    }

    pub fn set_comfy(&self, c: health::Comfy) {
        let mut inner = self.lock();
        if inner.health.comfy != c {
            tracing::info!(state = ?c, "ComfyUI state");
            inner.health.comfy = c;
        }
    }

    /// The ComfyUI prompt id for a job: its own id the first time, a fresh one for a
    /// rerun (ComfyUI would still have the earlier run under that id in its history).
    pub fn comfy_prompt_id(&self, job_id: &str) -> String {
        if lock(&self.submitted).insert(job_id.to_owned()) {
            job_id.to_owned()
        } else {
            let n = self.reruns.fetch_add(1, Ordering::Relaxed) + 1;
            format!("{job_id}.r{n}")
        }
    }

    /// Resolves once no job holds the slot.
    pub async fn idle(&self) {
        loop {
            let freed = self.slot_freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if self.lock().health.job.is_none() {
                return;
            }
            freed.await;
        }
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs the worker on `listener` until `shutdown` resolves (SIGTERM), then drains as the
/// protocol says: health 503 at once, a running job gets up to `WORKER_ABORT_AFTER_SECS`
/// to finish before it is aborted, then the ComfyUI it started is stopped.
pub async fn serve(
    args: Args,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), WorkerError> {
    let args = args.resolve()?;
    let warmup = match &args.warmup_workflow {
        Some(path) => Some(load_warmup(path)?),
        None => None,
    };
    let store = match args.store()? {
        Some(s) => Some(store::OutputStore::connect(&s)?),
        None => None,
    };
    let (data_dir, owned_dir) = match &args.data_dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("comfyume-worker-{}", std::process::id())),
            true,
        ),
    };
    let jobs_dir = data_dir.join("jobs");
    // Results of an earlier process cannot be replayed (they lived in its memory).
    let _ = std::fs::remove_dir_all(&jobs_dir);
    std::fs::create_dir_all(&jobs_dir).map_err(|e| WorkerError::DataDir {
        path: jobs_dir.clone(),
        reason: e.to_string(),
    })?;

    let port = if args.comfyui_cmd.is_some() {
        free_port()?
    } else {
        0
    };
    let (comfy_url, comfy_cmd) = config::comfyui_target(
        args.comfyui_url.as_deref(),
        args.comfyui_cmd.as_deref(),
        port,
    );
    let comfy = ComfyUiBackend::new("comfyui", &comfy_url, 1, args.timeouts())
        .map_err(|e| WorkerError::Comfy(e.to_string()))?;
    let probe = reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(2))
        .timeout(comfy::PROBE_TIMEOUT)
        .build()
        .map_err(|e| WorkerError::Comfy(e.to_string()))?;
    let shared = Arc::new(Shared {
        worker_id: args.worker_id(),
        inner: Mutex::new(Inner {
            health: health::State::new(),
            results: results::Results::new(
                Duration::from_secs(args.keep_results_secs),
                args.keep_results_bytes,
            ),
        }),
        args,
        comfy,
        comfy_url,
        store,
        object_info: Mutex::new(None),
        deaths: watch::Sender::new(0),
        stopping: CancellationToken::new(),
        slot_freed: Notify::new(),
        check_comfy: Notify::new(),
        jobs_dir,
        warmup,
        submitted: Mutex::new(Default::default()),
        reruns: AtomicU64::new(0),
        run_seq: AtomicU64::new(1),
        probe,
    });

    let supervisor_stop = CancellationToken::new();
    // If the supervisor itself fails (a bug), it is logged and started again.
    let supervisor = {
        let shared = shared.clone();
        let stop = supervisor_stop.clone();
        tokio::spawn(async move {
            loop {
                let run = tokio::spawn(comfy::supervise(
                    shared.clone(),
                    comfy_cmd.clone(),
                    stop.clone(),
                ));
                match run.await {
                    Ok(()) if stop.is_cancelled() => return,
                    Ok(()) => {
                        tracing::error!("ComfyUI supervisor ended unexpectedly; restarting it")
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "ComfyUI supervisor failed; restarting it")
                    }
                }
                shared.set_comfy(health::Comfy::Down(
                    "the worker restarts its ComfyUI supervisor".into(),
                ));
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };

    {
        let shared = shared.clone();
        tokio::spawn(async move {
            shutdown.await;
            tracing::info!("SIGTERM: health reports stopping; a running job gets its grace");
            shared.lock().health.stopping = true;
            shared.stopping.cancel();
        });
    }

    // Kept results leave the disk when they are too old, requests or not.
    let sweeper = {
        let shared = shared.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(30)).await;
                shared.lock().results.sweep(tokio::time::Instant::now());
            }
        })
    };
    let drained = {
        let shared = shared.clone();
        async move {
            shared.stopping.cancelled().await;
            shared.idle().await;
        }
    };
    let app = http::router(shared.clone());
    // Events are small writes: without TCP_NODELAY each waits for the reader's
    // delayed ACK (~40 ms a job, measured in comfyume-bench serverless).
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let server = axum::serve(listener, app).with_graceful_shutdown(drained);
    // A reader that stopped reading must not keep the process past the provider's grace.
    let hard_limit = {
        let stopping = shared.stopping.clone();
        let limit = shared.args.abort_after() + Duration::from_secs(8);
        async move {
            stopping.cancelled().await;
            tokio::time::sleep(limit).await;
        }
    };
    tokio::select! {
        res = server => res?,
        _ = hard_limit => tracing::warn!("streams still open after the grace; exiting anyway"),
    }

    sweeper.abort();
    supervisor_stop.cancel();
    match tokio::time::timeout(Duration::from_secs(10), supervisor).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "ComfyUI supervisor failed"),
        Err(_) => tracing::warn!("ComfyUI supervisor did not stop in time"),
    }
    if owned_dir {
        let _ = std::fs::remove_dir_all(&data_dir);
    } else {
        let _ = std::fs::remove_dir_all(&shared.jobs_dir);
    }
    tracing::info!("worker stopped");
    Ok(())
}

fn load_warmup(path: &std::path::Path) -> Result<Value, WorkerError> {
    let err = |reason: String| WorkerError::Warmup {
        path: path.to_owned(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| err(format!("not JSON: {e}")))?;
    // A bare API-format prompt, or `{"prompt": {...}}` as sent to /prompt.
    let prompt = match v.get("prompt") {
        Some(p) if p.is_object() => p.clone(),
        _ => v,
    };
    match &prompt {
        Value::Object(m) if !m.is_empty() => Ok(prompt),
        _ => Err(err("not an API-format prompt (an object of nodes)".into())),
    }
}

/// A local port nobody listens on right now (for `{port}` in `COMFYUI_CMD`).
fn free_port() -> std::io::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}
