//! The `serverless` backend of `comfyume serve`: every job is one long `POST
//! <endpoint>/run` to a `comfyume-worker` behind a serverless GPU provider
//! (docs/worker-protocol.md), streamed back as the job's ComfyUI events. A failed
//! attempt moves down the failover chain (active endpoint, then
//! `SERVERLESS_FAILOVER`); cold starts are noticed, announced with an estimate learnt
//! from earlier ones, and can be avoided by a warm-up; the provider's management API
//! says what each deployment is doing and what its replicas cost.

pub mod config;
mod endpoint;
pub mod files;
mod job;
pub mod manage;
pub mod policy;
mod tasks;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use comfyume_dispatch::{Backend, BackendError, JobSpec, Outcome};
use comfyume_store::MetaStore;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::watch;

pub use config::ServerlessConfig;
pub use endpoint::now_ms;
use endpoint::{Endpoint, InFlight};
pub use policy::Routing;

/// Meta keys in the store.
const META_ROUTING: &str = "serverless.routing";
const META_COLD_STARTS: &str = "serverless.cold_starts";
const META_USAGE: &str = "serverless.usage";
/// Jobs kept in memory for the cost view.
const RECENT_JOBS: usize = 100;
/// Failed endpoints remembered per job (bounded: jobs that vanish are forgotten).
const TRIED_JOBS: usize = 10_000;

/// What the backend needs from the server it runs in.
#[async_trait::async_trait]
pub trait Host: Send + Sync {
    /// A note for participants: those named, and everyone whose job waits in the
    /// workshop queue.
    fn announce(&self, users: &[String], message: &str);
    /// Node definitions a warm-up fetched from a worker.
    async fn node_definitions(&self, info: Value);
}

/// A host that tells nobody (tests, benchmarks).
pub struct Quiet;

#[async_trait::async_trait]
impl Host for Quiet {
    fn announce(&self, _: &[String], _: &str) {}
    async fn node_definitions(&self, _: Value) {}
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ServerlessError {
    #[error("unknown endpoint {name:?} (known: {known})")]
    UnknownEndpoint { name: String, known: String },
    #[error("{0}")]
    Config(String),
    #[error("could not save the change: {0}")]
    Store(String),
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
struct ReplicaSeen {
    started: i64,
    last_seen: i64,
}

/// GPU time and replica time, kept in the store.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Usage {
    /// Local date `YYYY-MM-DD` of `user_ms_today`.
    #[serde(default)]
    day: String,
    #[serde(default)]
    user_ms_today: BTreeMap<String, u64>,
    #[serde(default)]
    endpoint_ms: BTreeMap<String, u64>,
    #[serde(default)]
    endpoint_jobs: BTreeMap<String, u64>,
    /// endpoint -> replica id -> when seen running.
    #[serde(default)]
    replicas: BTreeMap<String, BTreeMap<String, ReplicaSeen>>,
}

/// One finished job's GPU time, for the cost view.
#[derive(Debug, Clone, Serialize)]
struct JobCost {
    job_id: String,
    user: String,
    endpoint: String,
    gpu_seconds: f64,
    cost_eur: f64,
    finished_at_ms: i64,
}

pub struct ServerlessBackend {
    cfg: ServerlessConfig,
    http: reqwest::Client,
    endpoints: Vec<Arc<Endpoint>>,
    routing: Mutex<Routing>,
    store: Arc<dyn MetaStore>,
    host: Arc<dyn Host>,
    manage: Option<manage::ManagementApi>,
    objects: Option<files::ObjectFetcher>,
    /// Job id -> endpoints that failed it (the next attempt goes elsewhere).
    tried: Mutex<HashMap<String, Vec<String>>>,
    usage: Mutex<Usage>,
    recent: Mutex<VecDeque<JobCost>>,
    object_info: Mutex<Option<Value>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn today() -> String {
    chrono::Local::now().format("%Y-%m-%d").to_string()
}

impl ServerlessBackend {
    /// Builds the backend from its settings and what the store remembers (routing
    /// changed through the admin API, learnt cold starts, usage). No network call:
    /// serve never probes a public endpoint at start.
    pub async fn new(
        cfg: ServerlessConfig,
        store: Arc<dyn MetaStore>,
        host: Arc<dyn Host>,
    ) -> Result<Arc<Self>, ServerlessError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .tcp_keepalive(Duration::from_secs(30))
            .build()
            .map_err(|e| ServerlessError::Config(format!("HTTP client: {e}")))?;
        let objects = match &cfg.store {
            Some(s) => Some(
                files::ObjectFetcher::connect(s)
                    .map_err(|e| ServerlessError::Config(e.to_string()))?,
            ),
            None => None,
        };
        let manage = cfg
            .management
            .clone()
            .map(|m| manage::ManagementApi::new(m, http.clone()));
        let endpoints: Vec<Arc<Endpoint>> = cfg
            .endpoints
            .iter()
            .cloned()
            .map(|e| Arc::new(Endpoint::new(e)))
            .collect();
        let mut routing = Routing {
            active: cfg.active.clone(),
            failover: cfg.failover.clone(),
        };
        let known = |n: &str| endpoints.iter().any(|e| e.name() == n);
        if let Some(saved) = read_meta::<Routing>(&store, META_ROUTING).await {
            if known(&saved.active) && saved.failover.iter().all(|f| known(f)) {
                if saved != routing {
                    tracing::info!(active = %saved.active, failover = ?saved.failover,
                        "serverless routing as the instructor last set it (the admin API overrides SERVERLESS_ACTIVE/SERVERLESS_FAILOVER)");
                }
                routing = saved;
            } else {
                tracing::warn!(active = %saved.active, failover = ?saved.failover,
                    "the saved serverless routing names endpoints no longer configured; using SERVERLESS_ACTIVE/SERVERLESS_FAILOVER");
            }
        }
        if let Some(cold) = read_meta::<BTreeMap<String, Vec<u64>>>(&store, META_COLD_STARTS).await
        {
            for ep in &endpoints {
                if let Some(v) = cold.get(ep.name()) {
                    ep.st().cold_starts = v.clone();
                }
            }
        }
        let usage = read_meta::<Usage>(&store, META_USAGE)
            .await
            .unwrap_or_default();
        for ep in &endpoints {
            tracing::info!(endpoint = %ep.name(), url = %config::redact_url(&ep.cfg.url),
                max_in_flight = ep.cfg.max_in_flight, deployment = ?ep.cfg.deployment, "serverless endpoint");
        }
        Ok(Arc::new(ServerlessBackend {
            cfg,
            http,
            endpoints,
            routing: Mutex::new(routing),
            store,
            host,
            manage,
            objects,
            tried: Mutex::new(HashMap::new()),
            usage: Mutex::new(usage),
            recent: Mutex::new(VecDeque::new()),
            object_info: Mutex::new(None),
        }))
    }

    /// Starts the background tasks (management API polling, the daily warm-up), each
    /// supervised.
    pub fn start(self: &Arc<Self>) {
        tasks::start(self);
    }

    pub fn config(&self) -> &ServerlessConfig {
        &self.cfg
    }

    fn endpoint(&self, name: &str) -> Option<&Arc<Endpoint>> {
        self.endpoints.iter().find(|e| e.name() == name)
    }

    fn known_names(&self) -> String {
        self.endpoints
            .iter()
            .map(|e| e.name().to_owned())
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn routing(&self) -> Routing {
        lock(&self.routing).clone()
    }

    /// Changes the active endpoint and failover order: from the next dispatch on, and
    /// kept in the store for restarts.
    pub async fn set_routing(&self, r: Routing) -> Result<Routing, ServerlessError> {
        let r = Routing {
            active: r.active.trim().to_ascii_lowercase(),
            failover: r
                .failover
                .iter()
                .map(|f| f.trim().to_ascii_lowercase())
                .filter(|f| !f.is_empty())
                .collect(),
        };
        for n in std::iter::once(&r.active).chain(r.failover.iter()) {
            if self.endpoint(n).is_none() {
                return Err(ServerlessError::UnknownEndpoint {
                    name: n.clone(),
                    known: self.known_names(),
                });
            }
        }
        let text = serde_json::to_string(&r).map_err(|e| ServerlessError::Store(e.to_string()))?;
        self.store
            .put_meta(META_ROUTING, &text, "admin")
            .await
            .map_err(|e| ServerlessError::Store(e.to_string()))?;
        *lock(&self.routing) = r.clone();
        tracing::info!(active = %r.active, failover = ?r.failover, "serverless routing changed");
        Ok(r)
    }

    /// The first usable endpoint of the chain: where new jobs go.
    fn primary(&self) -> Option<Arc<Endpoint>> {
        let chain = self.routing().chain();
        let name = policy::pick_endpoint(&chain, |n| self.usable(n), &[], 1)?.to_owned();
        self.endpoint(&name).cloned()
    }

    fn usable(&self, name: &str) -> bool {
        self.endpoint(name).is_some_and(|e| e.usable())
    }

    fn pick_for(&self, job: &JobSpec) -> Option<Arc<Endpoint>> {
        let chain = self.routing().chain();
        let failed = lock(&self.tried).get(&job.id).cloned().unwrap_or_default();
        let name =
            policy::pick_endpoint(&chain, |n| self.usable(n), &failed, job.attempt)?.to_owned();
        self.endpoint(&name).cloned()
    }

    /// Adds the provider's inference key and the workers' token.
    fn authorize(&self, r: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        let r = match &self.cfg.api_key {
            Some(k) => r.bearer_auth(k.expose()),
            None => r,
        };
        match &self.cfg.worker_token {
            Some(t) => r.header("x-worker-token", t.expose()),
            None => r,
        }
    }

    async fn save_meta<T: Serialize>(&self, key: &str, v: &T) {
        let Ok(text) = serde_json::to_string(v) else {
            return;
        };
        if let Err(e) = self.store.put_meta(key, &text, "serverless").await {
            tracing::warn!(key, error = %e, "could not save serverless state");
        }
    }

    async fn save_cold_starts(&self) {
        let map: BTreeMap<String, Vec<u64>> = self
            .endpoints
            .iter()
            .map(|e| (e.name().to_owned(), e.st().cold_starts.clone()))
            .collect();
        self.save_meta(META_COLD_STARTS, &map).await;
    }

    /// A job's GPU time (`timing.execution_ms` of its final event).
    async fn record_usage(&self, job: &JobSpec, ep: &Endpoint, execution_ms: Option<u64>) {
        let ms = execution_ms.unwrap_or(0);
        let snapshot = {
            let mut u = lock(&self.usage);
            let day = today();
            if u.day != day {
                u.day = day;
                u.user_ms_today.clear();
            }
            *u.user_ms_today.entry(job.user.clone()).or_default() += ms;
            *u.endpoint_ms.entry(ep.name().to_owned()).or_default() += ms;
            *u.endpoint_jobs.entry(ep.name().to_owned()).or_default() += 1;
            u.clone()
        };
        comfyume_dispatch::telemetry::gpu_billed(
            ep.name(),
            ms as f64 / 1000.0,
            policy::gpu_cost(ms, ep.cfg.price_eur_per_hour),
        );
        {
            let mut r = lock(&self.recent);
            r.push_back(JobCost {
                job_id: job.id.clone(),
                user: job.user.clone(),
                endpoint: ep.name().to_owned(),
                gpu_seconds: ms as f64 / 1000.0,
                cost_eur: policy::gpu_cost(ms, ep.cfg.price_eur_per_hour),
                finished_at_ms: now_ms(),
            });
            while r.len() > RECENT_JOBS {
                r.pop_front();
            }
        }
        tracing::info!(job_id = %job.id, user = %job.user, endpoint = %ep.name(), gpu_ms = ms, "GPU time");
        self.save_meta(META_USAGE, &snapshot).await;
    }

    /// The instructor's view: routing, and every endpoint's state.
    pub fn status(&self) -> Value {
        let routing = self.routing();
        let chain = routing.chain();
        let u = lock(&self.usage).clone();
        let default_cold = self.cfg.cold_start_estimate.as_secs();
        let endpoints: Vec<Value> = self
            .endpoints
            .iter()
            .map(|e| {
                let role = if e.name() == routing.active {
                    "active".to_owned()
                } else if let Some(i) = chain.iter().position(|n| n == e.name()) {
                    format!("failover {i}")
                } else {
                    "unused".to_owned()
                };
                let mut v = e.view(
                    default_cold,
                    &role,
                    u.endpoint_ms.get(e.name()).copied().unwrap_or(0),
                    u.endpoint_jobs.get(e.name()).copied().unwrap_or(0),
                );
                let (intervals, cost) = replica_cost(&u, e.name(), e.cfg.price_eur_per_hour);
                v["replica_intervals"] = json!(intervals);
                v["replica_cost_eur"] = json!(round2(cost));
                v
            })
            .collect();
        json!({
            "active": routing.active,
            "failover": routing.failover,
            "primary": self.primary().map(|e| e.name().to_owned()),
            "async_mode": self.cfg.async_mode,
            "management_api": self.manage.as_ref().map(|m| config::redact_url(m.api_url())),
            "warmup_at": self.cfg.warmup_at.map(|(h, m)| format!("{h:02}:{m:02}")),
            "endpoints": endpoints,
            "costs": self.costs(),
        })
    }

    /// GPU time and replica cost: per endpoint, per participant today, recent jobs.
    pub fn costs(&self) -> Value {
        let u = lock(&self.usage).clone();
        let mut total_gpu = 0.0;
        let mut total_replicas = 0.0;
        let endpoints: Vec<Value> = self
            .endpoints
            .iter()
            .map(|e| {
                let ms = u.endpoint_ms.get(e.name()).copied().unwrap_or(0);
                let gpu = policy::gpu_cost(ms, e.cfg.price_eur_per_hour);
                let (intervals, replicas) = replica_cost(&u, e.name(), e.cfg.price_eur_per_hour);
                total_gpu += gpu;
                total_replicas += replicas;
                json!({
                    "name": e.name(),
                    "price_eur_per_hour": e.cfg.price_eur_per_hour,
                    "jobs": u.endpoint_jobs.get(e.name()).copied().unwrap_or(0),
                    "gpu_seconds": ms as f64 / 1000.0,
                    "gpu_cost_eur": round2(gpu),
                    "replica_intervals": intervals,
                    "replica_cost_eur": round2(replicas),
                })
            })
            .collect();
        let day = today();
        let participants: Vec<Value> = if u.day == day {
            u.user_ms_today
                .iter()
                .map(|(user, ms)| json!({"user": user, "gpu_seconds": *ms as f64 / 1000.0}))
                .collect()
        } else {
            Vec::new()
        };
        json!({
            "currency": "EUR",
            "billing": "running replicas, in 10-minute intervals",
            "day": day,
            "endpoints": endpoints,
            "participants_today": participants,
            "recent_jobs": lock(&self.recent).iter().rev().cloned().collect::<Vec<_>>(),
            "total_gpu_cost_eur": round2(total_gpu),
            "total_replica_cost_eur": round2(total_replicas),
        })
    }

    /// What a participant's banner shows: a cold start under way, their GPU time today.
    pub fn banner(&self, user: &str) -> Value {
        let ms = {
            let u = lock(&self.usage);
            if u.day == today() {
                u.user_ms_today.get(user).copied().unwrap_or(0)
            } else {
                0
            }
        };
        let gpu = self.primary().and_then(|e| {
            let s = e.st();
            let c = s.cold.as_ref()?;
            let est =
                policy::cold_start_estimate(&s.cold_starts, self.cfg.cold_start_estimate.as_secs());
            Some(policy::cold_start_text(est, c.began.elapsed().as_secs()))
        });
        json!({
            "gpu": gpu,
            "gpu_time_today_ms": ms,
            "gpu_time_text": policy::gpu_time_text(ms),
        })
    }

    /// Warms an endpoint (the active one by default): a `GET <base>/object_info`
    /// through the provider, which starts a replica if none runs; its answer is the
    /// node definitions. Runs in the background; false if it is already warming.
    pub fn warmup(self: &Arc<Self>, name: Option<&str>) -> Result<String, ServerlessError> {
        let name = match name {
            Some(n) => n.trim().to_ascii_lowercase(),
            None => self.routing().active,
        };
        let Some(ep) = self.endpoint(&name).cloned() else {
            return Err(ServerlessError::UnknownEndpoint {
                name,
                known: self.known_names(),
            });
        };
        tasks::spawn_warmup(self.clone(), ep);
        Ok(name)
    }

    /// One attempt on its endpoint, with the bookkeeping of how it went.
    async fn run_attempt(
        &self,
        job: JobSpec,
        events: comfyume_dispatch::backend::EventTx,
        mut interrupt: watch::Receiver<bool>,
    ) -> Result<Outcome, BackendError> {
        let Some(ep) = self.pick_for(&job) else {
            return Err(BackendError::Unreachable(
                "no serverless endpoint configured".into(),
            ));
        };
        // Per endpoint as many requests as its replica limit; the rest wait here.
        let permit = tokio::select! {
            p = ep.permits.clone().acquire_owned() => p.map_err(|_| BackendError::Unreachable("endpoint closed".into()))?,
            _ = async { let _ = interrupt.wait_for(|v| *v).await; } => return Ok(job::cancelled(&job.id)),
        };
        let id = job.id.clone();
        let flight = InFlight::new(ep.clone(), &job.id, &job.user);
        tracing::info!(job_id = %id, user = %job.user, endpoint = %ep.name(), attempt = job.attempt, "sending the job");
        let mut attempt = job::Attempt::new(self, ep.clone(), job, events, flight);
        let res = attempt.run(interrupt).await;
        drop(attempt);
        drop(permit);
        ep.publish_state();
        match &res {
            Ok(_) => {
                ep.succeeded();
                lock(&self.tried).remove(&id);
            }
            Err(BackendError::Rejected(body)) => {
                lock(&self.tried).remove(&id);
                let msg = body["error"]["message"].as_str().unwrap_or("refused");
                tracing::warn!(job_id = %id, endpoint = %ep.name(), error = %msg, "the job was refused");
            }
            Err(e) => {
                let msg = e.to_string();
                let reason = match e {
                    BackendError::Unreachable(_) => "unreachable",
                    BackendError::Lost(_) => "lost",
                    BackendError::Timeout(_) => "timeout",
                    BackendError::Protocol(_) => "protocol",
                    BackendError::Rejected(_) => "rejected",
                    BackendError::Storage(_) => "storage",
                };
                comfyume_dispatch::telemetry::endpoint_failure(ep.name(), reason);
                if ep.failed(&msg, self.cfg.fail_threshold) {
                    // The instructor sees it in the admin API's state, and here.
                    tracing::warn!(endpoint = %ep.name(), error = %msg,
                        "serverless endpoint passed over: it keeps failing; jobs go to the next one in the failover list");
                }
                let mut tried = lock(&self.tried);
                if tried.len() >= TRIED_JOBS {
                    tried.clear();
                }
                let list = tried.entry(id.clone()).or_default();
                if !list.iter().any(|n| n == ep.name()) {
                    list.push(ep.name().to_owned());
                }
            }
        }
        res
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Billed intervals and EUR of an endpoint's replicas as seen so far.
fn replica_cost(u: &Usage, endpoint: &str, eur_per_hour: f64) -> (u64, f64) {
    let intervals: u64 = u
        .replicas
        .get(endpoint)
        .map(|m| {
            m.values()
                .map(|r| policy::billed_intervals(r.started, r.last_seen))
                .sum()
        })
        .unwrap_or(0);
    (intervals, policy::interval_cost(intervals, eur_per_hour))
}

async fn read_meta<T: serde::de::DeserializeOwned>(
    store: &Arc<dyn MetaStore>,
    key: &str,
) -> Option<T> {
    match store.get_meta(key).await {
        Ok(Some(e)) => match serde_json::from_str(&e.value) {
            Ok(v) => Some(v),
            Err(err) => {
                tracing::warn!(key, error = %err, "ignoring unreadable serverless state");
                None
            }
        },
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(key, error = %e, "could not read serverless state");
            None
        }
    }
}

#[async_trait::async_trait]
impl Backend for ServerlessBackend {
    fn name(&self) -> &str {
        "serverless"
    }

    /// Every endpoint as the instructor's GPU view shows it (from [`Self::status`]).
    fn endpoints(&self) -> Vec<comfyume_dispatch::backend::EndpointStatus> {
        let status = self.status();
        status["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| comfyume_dispatch::backend::EndpointStatus {
                name: v["name"].as_str().unwrap_or_default().to_owned(),
                state: v["state"].as_str().unwrap_or("cold").to_owned(),
                role: v["role"].as_str().map(str::to_owned),
                in_flight: v["in_flight"].as_u64().unwrap_or(0) as usize,
                recent_errors: v["recent_errors"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|e| {
                        let at = e["at_ms"].as_i64().unwrap_or(0);
                        (at, e["error"].as_str().unwrap_or_default().to_owned())
                    })
                    .collect(),
                cold_start_secs: v["cold_start_secs"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(serde_json::Value::as_u64)
                    .collect(),
                spend_eur: v["replica_cost_eur"].as_f64(),
                detail: v.clone(),
            })
            .collect()
    }

    /// The primary endpoint's limit, plus what runs elsewhere (retries on failover
    /// endpoints do not take the primary's places).
    fn slots(&self) -> usize {
        let primary = self.primary();
        let base = primary.as_ref().map(|e| e.cfg.max_in_flight).unwrap_or(1);
        let elsewhere: usize = self
            .endpoints
            .iter()
            .filter(|e| primary.as_ref().is_none_or(|p| p.name() != e.name()))
            .map(|e| e.st().in_flight)
            .sum();
        base + elsewhere
    }

    /// Only what a warm-up fetched: asking a public endpoint would queue work there.
    async fn object_info(&self) -> Result<Value, BackendError> {
        lock(&self.object_info).clone().ok_or_else(|| {
            BackendError::Unreachable(
                "serverless node definitions come from a warm-up (POST /admin/api/serverless/warmup) \
                 or `comfyume object-info import`"
                    .into(),
            )
        })
    }

    async fn run(
        &self,
        job: JobSpec,
        events: comfyume_dispatch::backend::EventTx,
        interrupt: watch::Receiver<bool>,
    ) -> Result<Outcome, BackendError> {
        self.run_attempt(job, events, interrupt).await
    }

    /// Nothing to do: closing the job's stream (dropping the run) stops it on the worker.
    async fn stop(&self, _job_id: &str) -> Result<(), BackendError> {
        Ok(())
    }
}
