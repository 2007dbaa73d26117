//! `comfyume-provider`: a stand-in for the serverless GPU provider (test support and
//! demo). It stands where the provider's gateway stands, in front of worker replicas it
//! starts and stops as processes (`comfyume-worker`, each with its own `comfyume-sim`),
//! and reproduces what the provider documents: an internal queue, health-gated routing
//! without stickiness, queue-load autoscaling from zero with a cold start, scale-down by
//! SIGTERM then SIGKILL, spot eviction, SSE re-framing, request TTL, async mode and the
//! management API. What the provider does not document is a knob (`config`).

pub mod config;
mod gateway;
mod manage;
mod replica;
pub mod scaling;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use config::Args;
use config::{DeploymentSettings, Price};
use scaling::{Action, Phase, ReplicaView, Timers};

#[derive(Debug, thiserror::Error)]
pub enum EmulatorError {
    #[error("{0}")]
    Config(String),
    #[error("{what} not found at {path} (build it, or give --{flag})")]
    MissingBinary {
        what: &'static str,
        path: PathBuf,
        flag: &'static str,
    },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// A replica's last health answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Health {
    Unknown,
    Ready,
    Busy,
    Unhealthy,
}

/// What the emulator wants a replica to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cmd {
    Run,
    /// Scale-down: SIGTERM, SIGKILL after the grace.
    Terminate,
    /// Spot eviction or emulator shutdown: SIGKILL now, no notice.
    Kill,
}

pub(crate) struct Replica {
    pub id: String,
    pub phase: Phase,
    pub health: Health,
    pub in_flight: usize,
    pub created: Instant,
    pub started_at: SystemTime,
    pub url: Option<String>,
    pub pid: Option<u32>,
    pub last_release: Instant,
    pub cmd: watch::Sender<Cmd>,
    pub probe_now: Arc<Notify>,
}

/// A request waiting in a deployment's queue for a replica.
pub(crate) struct Waiter {
    pub tx: oneshot::Sender<Lease>,
}

pub(crate) struct Dep {
    pub s: DeploymentSettings,
    pub queue: VecDeque<Waiter>,
    pub replicas: Vec<Replica>,
    pub timers: Timers,
}

pub(crate) struct World {
    pub deps: BTreeMap<String, Dep>,
}

/// A replica given to one request; released (the replica's slot freed) when dropped.
pub(crate) struct Lease {
    pub replica: String,
    pub url: String,
    _release: Release,
}

/// Sends the release to the controller when dropped (never locks: a lease may be
/// dropped while the world is locked).
pub(crate) struct Release {
    tx: mpsc::UnboundedSender<(String, String)>,
    dep: String,
    replica: String,
}

impl Drop for Release {
    fn drop(&mut self) {
        let _ = self.tx.send((
            std::mem::take(&mut self.dep),
            std::mem::take(&mut self.replica),
        ));
    }
}

/// One line of the replica lifecycle log (`GET /_emulator/events`).
#[derive(Debug, Clone, Serialize)]
pub struct LifeEvent {
    /// Milliseconds since the emulator started.
    pub t_ms: u64,
    pub deployment: String,
    pub replica: String,
    pub event: &'static str,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// An async-mode request (`Prefer: respond-async`).
pub(crate) struct AsyncJob {
    pub status: &'static str,
    pub error: Option<String>,
    pub result: Option<(u16, String, bytes::Bytes)>,
    pub created: Instant,
}

pub(crate) struct Tokens {
    pub access: HashMap<String, Instant>,
    pub refresh: HashMap<String, Instant>,
}

pub(crate) struct Emu {
    pub args: Args,
    pub world: Mutex<World>,
    pub wake: Notify,
    pub released: mpsc::UnboundedSender<(String, String)>,
    pub events: Mutex<Vec<LifeEvent>>,
    pub started: Instant,
    pub http: reqwest::Client,
    pub worker_bin: PathBuf,
    pub sim_bin: PathBuf,
    pub data_dir: PathBuf,
    pub replica_env: Vec<(String, String)>,
    pub prices: Vec<Price>,
    pub tokens: Mutex<Tokens>,
    pub async_jobs: Mutex<HashMap<(String, String), AsyncJob>>,
    pub next_replica: AtomicU64,
    pub shutdown: CancellationToken,
    pub health_interval: Duration,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Emu {
    pub fn world(&self) -> MutexGuard<'_, World> {
        lock(&self.world)
    }

    pub fn log(&self, dep: &str, replica: &str, event: &'static str, detail: String) {
        tracing::info!(deployment = dep, replica, event, detail = %detail, "replica");
        lock(&self.events).push(LifeEvent {
            t_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            deployment: dep.to_owned(),
            replica: replica.to_owned(),
            event,
            detail,
        });
    }

    /// Queues a request for a replica of `dep`; resolves with the lease, or `None` if the
    /// emulator stops first. Dropping the future leaves the queue (the controller skips
    /// a waiter nobody listens to).
    pub async fn lease(&self, dep: &str) -> Option<Lease> {
        let (tx, rx) = oneshot::channel();
        {
            let mut w = self.world();
            w.deps.get_mut(dep)?.queue.push_back(Waiter { tx });
        }
        self.wake.notify_one();
        rx.await.ok()
    }
}

/// Runs the emulator on `listener` until `shutdown` resolves; then every replica is
/// killed.
pub async fn run(
    args: Args,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), EmulatorError> {
    let deployments = args.deployments().map_err(EmulatorError::Config)?;
    for d in &deployments {
        if matches!(d.name.as_str(), "status" | "result" | "v1") {
            return Err(EmulatorError::Config(format!(
                "deployment name {} is reserved for the gateway's own routes",
                d.name
            )));
        }
    }
    let prices = args.price_table().map_err(EmulatorError::Config)?;
    let replica_env = args.replica_env().map_err(EmulatorError::Config)?;
    let here = std::env::current_exe()?
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let worker_bin = args
        .worker_bin
        .clone()
        .unwrap_or_else(|| here.join("comfyume-worker"));
    let sim_bin = args
        .sim_bin
        .clone()
        .unwrap_or_else(|| here.join("comfyume-sim"));
    for (what, path, flag) in [
        ("comfyume-worker", &worker_bin, "worker-bin"),
        ("comfyume-sim", &sim_bin, "sim-bin"),
    ] {
        if !path.exists() {
            return Err(EmulatorError::MissingBinary {
                what,
                path: path.clone(),
                flag,
            });
        }
    }
    let (data_dir, owned) = match &args.data_dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("comfyume-provider-{}", std::process::id())),
            true,
        ),
    };
    std::fs::create_dir_all(&data_dir)?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| EmulatorError::Config(e.to_string()))?;
    let (released_tx, released_rx) = mpsc::unbounded_channel();
    let emu = Arc::new(Emu {
        world: Mutex::new(World {
            deps: deployments
                .into_iter()
                .map(|s| {
                    (
                        s.name.clone(),
                        Dep {
                            s,
                            queue: VecDeque::new(),
                            replicas: Vec::new(),
                            timers: Timers::default(),
                        },
                    )
                })
                .collect(),
        }),
        wake: Notify::new(),
        released: released_tx,
        events: Mutex::new(Vec::new()),
        started: Instant::now(),
        http,
        worker_bin,
        sim_bin,
        data_dir: data_dir.clone(),
        replica_env,
        prices,
        tokens: Mutex::new(Tokens {
            access: HashMap::new(),
            refresh: HashMap::new(),
        }),
        async_jobs: Mutex::new(HashMap::new()),
        next_replica: AtomicU64::new(1),
        shutdown: CancellationToken::new(),
        health_interval: Duration::from_millis(args.health_interval_ms.max(10)),
        args,
    });

    // The control loop, started again (and logged) should it ever fail.
    let controller = {
        let emu = emu.clone();
        let released = Arc::new(tokio::sync::Mutex::new(released_rx));
        tokio::spawn(async move {
            loop {
                let run = tokio::spawn(controller(emu.clone(), released.clone()));
                match run.await {
                    Ok(()) => return,
                    Err(e) => tracing::error!(error = %e, "controller failed; restarting it"),
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let app = gateway::router(emu.clone());
    let stop = emu.shutdown.clone();
    tokio::spawn(async move {
        shutdown.await;
        stop.cancel();
    });
    let stop = emu.shutdown.clone();
    // The re-framed stream is small writes: TCP_NODELAY, as in the worker.
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await?;
    emu.shutdown.cancel();
    // Every replica goes, now.
    let pending: Vec<watch::Sender<Cmd>> = emu
        .world()
        .deps
        .values()
        .flat_map(|d| d.replicas.iter().map(|r| r.cmd.clone()))
        .collect();
    for cmd in &pending {
        let _ = cmd.send(Cmd::Kill);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while emu.world().deps.values().any(|d| !d.replicas.is_empty()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    controller.abort();
    if owned {
        let _ = std::fs::remove_dir_all(&data_dir);
    }
    Ok(())
}

/// The control loop: hands queued requests to ready replicas, applies releases, and runs
/// the autoscaler of each deployment.
async fn controller(
    emu: Arc<Emu>,
    released: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<(String, String)>>>,
) {
    let mut released = released.lock().await;
    loop {
        while let Ok((dep, replica)) = released.try_recv() {
            release(&emu, &dep, &replica);
        }
        let mut to_start: Vec<(
            DeploymentSettings,
            String,
            watch::Receiver<Cmd>,
            Arc<Notify>,
        )> = Vec::new();
        let mut to_stop: Vec<(String, String, watch::Sender<Cmd>)> = Vec::new();
        {
            let now = Instant::now();
            let mut w = emu.world();
            for dep in w.deps.values_mut() {
                dispatch(&emu, dep);
                let views: Vec<ReplicaView> = dep
                    .replicas
                    .iter()
                    .map(|r| ReplicaView {
                        id: r.id.clone(),
                        phase: r.phase,
                        busy: r.in_flight > 0,
                        created: r.created,
                    })
                    .collect();
                let waiting = dep.queue.len();
                for action in scaling::decide(&dep.s, now, waiting, &views, &mut dep.timers) {
                    match action {
                        Action::Start => {
                            let n = emu.next_replica.fetch_add(1, Ordering::Relaxed);
                            let id = format!("{}-r{n}", dep.s.name);
                            let (cmd, cmd_rx) = watch::channel(Cmd::Run);
                            let probe_now = Arc::new(Notify::new());
                            dep.replicas.push(Replica {
                                id: id.clone(),
                                phase: Phase::Provisioning,
                                health: Health::Unknown,
                                in_flight: 0,
                                created: now,
                                started_at: SystemTime::now(),
                                url: None,
                                pid: None,
                                last_release: now,
                                cmd,
                                probe_now: probe_now.clone(),
                            });
                            to_start.push((dep.s.clone(), id, cmd_rx, probe_now));
                        }
                        Action::Stop(id) => {
                            if let Some(r) = dep.replicas.iter_mut().find(|r| r.id == id) {
                                r.phase = Phase::Terminating;
                                to_stop.push((dep.s.name.clone(), id, r.cmd.clone()));
                            }
                        }
                    }
                }
            }
        }
        for (s, id, cmd_rx, probe_now) in to_start {
            emu.log(
                &s.name,
                &id,
                "provisioning",
                format!("cold start {} ms", s.cold_start.as_millis()),
            );
            tokio::spawn(supervise_replica(emu.clone(), s, id, cmd_rx, probe_now));
        }
        for (dep, id, cmd) in to_stop {
            emu.log(&dep, &id, "scale_down", String::new());
            let _ = cmd.send(Cmd::Terminate);
        }
        tokio::select! {
            _ = emu.wake.notified() => {}
            Some((dep, replica)) = released.recv() => release(&emu, &dep, &replica),
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = emu.shutdown.cancelled() => return,
        }
    }
}

/// A replica's task, supervised: should it fail, that is logged and the replica is
/// forgotten (its worker was killed when the task's process handle was dropped).
async fn supervise_replica(
    emu: Arc<Emu>,
    s: DeploymentSettings,
    id: String,
    cmd: watch::Receiver<Cmd>,
    probe_now: Arc<Notify>,
) {
    let dep = s.name.clone();
    let task = tokio::spawn(replica::run(emu.clone(), s, id.clone(), cmd, probe_now));
    if let Err(e) = task.await {
        emu.log(&dep, &id, "exited", format!("replica task failed: {e}"));
        if let Some(d) = emu.world().deps.get_mut(&dep) {
            d.replicas.retain(|r| r.id != id);
        }
        emu.wake.notify_one();
    }
}

fn release(emu: &Emu, dep: &str, replica: &str) {
    let mut w = emu.world();
    if let Some(r) = w
        .deps
        .get_mut(dep)
        .and_then(|d| d.replicas.iter_mut().find(|r| r.id == replica))
    {
        r.in_flight = r.in_flight.saturating_sub(1);
        r.last_release = Instant::now();
        // Its last answer said busy: it gets work again once it says ready.
        r.health = Health::Unknown;
        r.probe_now.notify_one();
    }
}

/// Hands waiting requests, oldest first, to ready replicas with a free slot (the one
/// idle longest first; no stickiness).
fn dispatch(emu: &Emu, dep: &mut Dep) {
    while let Some(front) = dep.queue.front() {
        if front.tx.is_closed() {
            dep.queue.pop_front();
            continue;
        }
        let concurrency = dep.s.concurrency;
        let Some(r) = dep
            .replicas
            .iter_mut()
            .filter(|r| {
                r.phase == Phase::Running && r.health == Health::Ready && r.in_flight < concurrency
            })
            .min_by_key(|r| r.last_release)
        else {
            return;
        };
        let Some(url) = r.url.clone() else { return };
        let Some(waiter) = dep.queue.pop_front() else {
            return;
        };
        r.in_flight += 1;
        let lease = Lease {
            replica: r.id.clone(),
            url,
            _release: Release {
                tx: emu.released.clone(),
                dep: dep.s.name.clone(),
                replica: r.id.clone(),
            },
        };
        // A waiter that left just now: the lease's release undoes the count.
        let _ = waiter.tx.send(lease);
    }
}
