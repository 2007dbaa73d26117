//! One endpoint at run time: its request limit, what our requests are doing there,
//! its failures, cold starts, and what the management API last said about it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::config::{EndpointConfig, redact_url};
use crate::manage::{ReplicaInfo, replica_running, replica_starting};
use crate::policy::{self, StateInputs};

/// Errors kept per endpoint for the instructor.
const RECENT_ERRORS: usize = 10;
/// After this long passed over for failing, an endpoint is tried again.
pub const FAILING_COOLDOWN: std::time::Duration = std::time::Duration::from_secs(60);
/// A job ended here within this long: the endpoint counts as warm (no management API).
const RECENTLY_SERVED_MS: i64 = 5 * 60 * 1000;
/// Streams cut without a final event in a row before the provider's async mode is used
/// (a spot eviction cuts one too, hence more than one).
pub const CUTS_BEFORE_ASYNC: u32 = 3;
/// How long an endpoint stays in async mode before streaming is tried again.
pub const ASYNC_FALLBACK_FOR: std::time::Duration = std::time::Duration::from_secs(600);

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[derive(Debug, Clone)]
pub struct ColdStart {
    /// When the first request that found the GPU cold was sent.
    pub began: Instant,
    pub began_ms: i64,
}

impl EpState {
    pub fn waiting_users(&self) -> Vec<String> {
        self.waiting.values().map(|(u, _)| u.clone()).collect()
    }

    /// When the longest-waiting request was sent.
    pub fn waiting_since(&self) -> Option<Instant> {
        self.waiting.values().map(|(_, t)| *t).min()
    }

    pub fn async_fallback(&self) -> bool {
        self.async_until.is_some_and(|t| Instant::now() < t)
    }
}

#[derive(Debug, Default)]
pub struct EpState {
    pub in_flight: usize,
    /// Our requests a worker has accepted.
    pub accepted: usize,
    /// Job id -> participant and when it was sent, of requests not accepted yet.
    pub waiting: HashMap<String, (String, Instant)>,
    pub consecutive_failures: u32,
    /// Why and since when it is passed over; until when, for failures.
    pub passed_over: Option<(String, i64)>,
    pub retry_after: Option<Instant>,
    pub recent_errors: VecDeque<(i64, String)>,
    pub cold: Option<ColdStart>,
    /// Learnt cold starts, seconds (newest last).
    pub cold_starts: Vec<u64>,
    pub deployment_status: Option<String>,
    pub replicas: Option<Vec<ReplicaInfo>>,
    pub ttl_secs: Option<u64>,
    pub polled_at_ms: Option<i64>,
    pub last_served_ms: i64,
    pub stream_cuts: u32,
    /// Async mode until then (streams kept being cut).
    pub async_until: Option<Instant>,
    pub warming: bool,
    /// When the last warm-up succeeded.
    pub warmed_at_ms: Option<i64>,
}

pub struct Endpoint {
    pub cfg: EndpointConfig,
    pub permits: Arc<Semaphore>,
    st: Mutex<EpState>,
}

impl Endpoint {
    pub fn new(cfg: EndpointConfig) -> Self {
        Endpoint {
            permits: Arc::new(Semaphore::new(cfg.max_in_flight)),
            cfg,
            st: Mutex::new(EpState::default()),
        }
    }

    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    pub fn st(&self) -> MutexGuard<'_, EpState> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Not passed over (a failing one becomes usable again after its cooldown).
    pub fn usable(&self) -> bool {
        let mut s = self.st();
        if s.passed_over.is_none() {
            return true;
        }
        if s.retry_after.is_some_and(|t| Instant::now() >= t) {
            // Half-open: one more chance; the next failure passes it over again.
            s.retry_after = None;
            s.passed_over = None;
            s.consecutive_failures = s.consecutive_failures.saturating_sub(1);
            tracing::info!(endpoint = %self.cfg.name, "trying a passed-over endpoint again");
            return true;
        }
        false
    }

    pub fn record_error(&self, msg: &str) {
        let mut s = self.st();
        s.recent_errors.push_back((now_ms(), msg.to_owned()));
        while s.recent_errors.len() > RECENT_ERRORS {
            s.recent_errors.pop_front();
        }
    }

    /// A failed attempt here; true when this passed it over.
    pub fn failed(&self, msg: &str, threshold: u32) -> bool {
        self.record_error(msg);
        let mut s = self.st();
        s.consecutive_failures += 1;
        if s.consecutive_failures >= threshold && s.passed_over.is_none() {
            s.passed_over = Some((
                format!(
                    "{} failed attempts in a row (last: {msg})",
                    s.consecutive_failures
                ),
                now_ms(),
            ));
            s.retry_after = Some(Instant::now() + FAILING_COOLDOWN);
            return true;
        }
        false
    }

    pub fn succeeded(&self) {
        let mut s = self.st();
        s.consecutive_failures = 0;
        s.last_served_ms = now_ms();
        if s.retry_after.is_some() {
            s.passed_over = None;
            s.retry_after = None;
        }
    }

    /// Exports the endpoint's state to the metrics (`comfyume_endpoint_state`).
    pub fn publish_state(&self) {
        let state = policy::endpoint_state(&inputs(&self.st()));
        comfyume_dispatch::telemetry::endpoint_state(self.name(), state.as_str());
    }

    /// The instructor's view (no secrets: the URL without user info or query).
    pub fn view(&self, default_cold_secs: u64, role: &str, gpu_ms: u64, jobs: u64) -> Value {
        let s = self.st();
        let state = policy::endpoint_state(&inputs(&s));
        let (running, starting) = counts(&s);
        json!({
            "name": self.cfg.name,
            "url": redact_url(&self.cfg.url),
            "deployment": self.cfg.deployment,
            "role": role,
            "state": state,
            "in_flight": s.in_flight,
            "accepted": s.accepted,
            "max_in_flight": self.cfg.max_in_flight,
            "mode": if s.async_fallback() { "async" } else { "stream" },
            "passed_over": s.passed_over.as_ref().map(|(why, since)| json!({"reason": why, "since_ms": since})),
            "consecutive_failures": s.consecutive_failures,
            "recent_errors": s.recent_errors.iter().map(|(at, m)| json!({"at_ms": at, "error": m})).collect::<Vec<_>>(),
            "cold_start": s.cold.as_ref().map(|c| json!({
                "since_ms": c.began_ms,
                "elapsed_secs": c.began.elapsed().as_secs(),
            })),
            "cold_start_secs": s.cold_starts,
            "cold_start_estimate_secs": policy::cold_start_estimate(&s.cold_starts, default_cold_secs),
            "deployment_status": s.deployment_status,
            "replicas_running": running,
            "replicas_starting": starting,
            "request_ttl_secs": s.ttl_secs,
            "polled_at_ms": s.polled_at_ms,
            "warming_up": s.warming,
            "warmed_up_at_ms": s.warmed_at_ms,
            "price_eur_per_hour": self.cfg.price_eur_per_hour,
            "gpu_seconds": gpu_ms as f64 / 1000.0,
            "jobs": jobs,
        })
    }
}

fn counts(s: &EpState) -> (Option<usize>, Option<usize>) {
    match &s.replicas {
        Some(list) => (
            Some(list.iter().filter(|r| replica_running(&r.status)).count()),
            Some(list.iter().filter(|r| replica_starting(&r.status)).count()),
        ),
        None => (None, None),
    }
}

fn inputs(s: &EpState) -> StateInputs {
    let (running, starting) = counts(s);
    StateInputs {
        passed_over: s.passed_over.is_some(),
        cold_start_in_progress: s.cold.is_some(),
        in_flight: s.in_flight,
        accepted: s.accepted,
        replicas_running: running,
        replicas_starting: starting,
        recently_served: s.last_served_ms > 0 && now_ms() - s.last_served_ms < RECENTLY_SERVED_MS,
    }
}

/// A request of ours on an endpoint: counted while it lives.
pub struct InFlight {
    ep: Arc<Endpoint>,
    job: String,
    accepted: bool,
}

impl InFlight {
    pub fn new(ep: Arc<Endpoint>, job: &str, user: &str) -> Self {
        {
            let mut s = ep.st();
            s.in_flight += 1;
            s.waiting
                .insert(job.to_owned(), (user.to_owned(), Instant::now()));
        }
        InFlight {
            ep,
            job: job.to_owned(),
            accepted: false,
        }
    }

    pub fn is_accepted(&self) -> bool {
        self.accepted
    }

    /// A worker took it; the cold start it waited through (if any) as measured.
    pub fn accepted(&mut self) -> Option<u64> {
        if self.accepted {
            return None;
        }
        self.accepted = true;
        let mut s = self.ep.st();
        s.accepted += 1;
        s.waiting.remove(&self.job);
        s.cold.take().map(|c| {
            let secs = c.began.elapsed().as_secs().max(1);
            policy::push_sample(&mut s.cold_starts, secs);
            comfyume_dispatch::telemetry::cold_start(&self.ep.cfg.name, secs as f64);
            secs
        })
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut s = self.ep.st();
        s.in_flight = s.in_flight.saturating_sub(1);
        if self.accepted {
            s.accepted = s.accepted.saturating_sub(1);
        }
        s.waiting.remove(&self.job);
        if s.in_flight == 0 && !s.warming {
            // Nobody waits on it any more: a cold start nobody completed is not measured.
            s.cold = None;
        }
    }
}
