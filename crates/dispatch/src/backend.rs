//! What a backend is: something that runs one ComfyUI job and reports its
//! events as they happen. Implementations: ComfyUI's own API
//! ([`comfyume_comfyui::ComfyUiBackend`], the simulator included).

use serde_json::Value;
use tokio::sync::watch;

pub use comfyume_comfyui::{
    BackendError, BackendEvent, EventTx, InputFile, JobSpec, Outcome, OutcomeKind, Timeouts,
};

#[async_trait::async_trait]
pub trait Backend: Send + Sync {
    /// Shown to participants and on the dashboard (never a URL with secrets).
    fn name(&self) -> &str;
    /// How many jobs it may hold at once: one running plus those handed over
    /// in advance so the GPU starts the next the instant one ends.
    fn slots(&self) -> usize;
    /// The backend's node definitions (`/object_info`).
    async fn object_info(&self) -> Result<Value, BackendError>;
    /// Runs the job to its end. `interrupt` turns true when the owner cancels.
    async fn run(
        &self,
        job: JobSpec,
        events: EventTx,
        interrupt: watch::Receiver<bool>,
    ) -> Result<Outcome, BackendError>;
    /// Makes sure the backend no longer runs or holds the job (it timed out, or
    /// is about to be retried elsewhere). Best effort; the caller bounds it.
    async fn stop(&self, _job_id: &str) -> Result<(), BackendError> {
        Ok(())
    }
    /// The GPU endpoints behind this backend, for the instructor's GPU view. A backend
    /// that is one GPU server lists none (the dispatcher reports it from its own
    /// counters); one with several endpoints (serverless: spot / on-demand, failover)
    /// lists each with its state, cold starts and spend, and they appear there as is.
    fn endpoints(&self) -> Vec<EndpointStatus> {
        Vec::new()
    }
}

/// One GPU endpoint as the instructor's GPU view shows it.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct EndpointStatus {
    pub name: String,
    /// `cold`, `starting`, `ready`, `busy` or `failing`.
    pub state: String,
    /// Its place in the routing (`active`, `failover 1`, ...), if it has one.
    pub role: Option<String>,
    /// Jobs handed to it and not ended.
    pub in_flight: usize,
    /// Latest errors, newest last: (ms, message).
    pub recent_errors: Vec<(i64, String)>,
    /// Cold starts measured, seconds, newest last.
    pub cold_start_secs: Vec<u64>,
    /// What it cost so far (EUR), where known.
    pub spend_eur: Option<f64>,
    /// Anything else worth showing (no secrets: never a key or a URL with credentials).
    pub detail: serde_json::Value,
}

#[async_trait::async_trait]
impl Backend for comfyume_comfyui::ComfyUiBackend {
    fn name(&self) -> &str {
        comfyume_comfyui::ComfyUiBackend::name(self)
    }
    fn slots(&self) -> usize {
        comfyume_comfyui::ComfyUiBackend::slots(self)
    }
    async fn object_info(&self) -> Result<Value, BackendError> {
        comfyume_comfyui::ComfyUiBackend::object_info(self).await
    }
    async fn run(
        &self,
        job: JobSpec,
        events: EventTx,
        interrupt: watch::Receiver<bool>,
    ) -> Result<Outcome, BackendError> {
        comfyume_comfyui::ComfyUiBackend::run(self, job, events, interrupt).await
    }
    async fn stop(&self, job_id: &str) -> Result<(), BackendError> {
        comfyume_comfyui::ComfyUiBackend::stop(self, job_id).await
    }
}
