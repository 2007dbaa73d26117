//! One job as a ComfyUI server runs it: what it needs, the events it reports
//! while it runs, how it ends, and the ways it can fail.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Map, Value};
use tokio::sync::mpsc;

/// One job, as a backend needs it.
#[derive(Debug, Clone)]
pub struct JobSpec {
    /// Our job id; also the `prompt_id` on the backend, so a restart can find it.
    pub id: String,
    pub user: String,
    pub prompt: Value,
    /// Without secrets.
    pub extra_data: Value,
    pub outputs_to_execute: Vec<String>,
    /// Participant files the prompt names, to upload before `/prompt`.
    pub inputs: Vec<InputFile>,
    /// Where outputs are saved (the participant's `outputs/`).
    pub output_dir: PathBuf,
    /// Where temp previews are saved (the participant's `temp/`).
    pub temp_dir: PathBuf,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// After a restart of `serve`: the job may still be running or finished
    /// on the backend; find it before submitting again.
    pub reattach: bool,
}

/// A participant input file the prompt refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputFile {
    /// Absolute path on this machine.
    pub local: PathBuf,
    /// The value in the prompt (relative to the participant's input folder).
    pub name: String,
}

/// Events from a running job, in order. The backend never sends ComfyUI's
/// `status` messages (they describe the backend's queue, not the workshop's)
/// nor the final `executing: null` (the dispatcher sends it after recording
/// the outcome, so `/history` is already up to date when the frontend asks).
#[derive(Debug, Clone)]
pub enum BackendEvent {
    /// The backend accepted the prompt (it is queued there).
    Submitted,
    /// `execution_start` was seen: the GPU is working on it.
    Started,
    /// A ComfyUI WebSocket JSON message for the job's owner, with output
    /// references already rewritten to the participant's own files.
    Message(Value),
    /// A binary preview frame as ComfyUI sent it (type 1 or 4).
    Binary(Bytes),
    /// A plain note for the participant ("retrying…", "GPU is cold…").
    Notice(String),
}

pub type EventTx = mpsc::Sender<BackendEvent>;

/// How a job ended on the backend.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub kind: OutcomeKind,
    /// `{node_id: ui}` with references to the participant's own files.
    pub outputs: Map<String, Value>,
    /// ComfyUI's status messages: `[[event, data], ...]`.
    pub messages: Vec<Value>,
    pub meta: Map<String, Value>,
}

impl Outcome {
    /// ComfyUI's interrupt outcome without node details: a job stopped before it ran,
    /// or whose backend could not confirm that it stopped.
    pub fn cancelled(id: &str) -> Outcome {
        let data = serde_json::json!({
            "prompt_id": id,
            "node_id": null,
            "node_type": null,
            "executed": [],
            "timestamp": crate::client::now_ms(),
        });
        Outcome {
            messages: vec![serde_json::json!(["execution_interrupted", data.clone()])],
            kind: OutcomeKind::Interrupted(data),
            outputs: Map::new(),
            meta: Map::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum OutcomeKind {
    Success,
    /// ComfyUI's `execution_error` data: a runtime error of the workflow
    /// itself; passed to the participant as is and never retried.
    ExecutionError(Value),
    /// `execution_interrupted` data.
    Interrupted(Value),
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    /// Could not connect or the connection broke: worth another slot.
    #[error("the GPU server could not be reached: {0}")]
    Unreachable(String),
    /// The backend forgot the job or died mid-job: worth another slot.
    #[error("the GPU server lost the job: {0}")]
    Lost(String),
    /// A call took longer than its limit.
    #[error("the GPU server did not answer in time: {0}")]
    Timeout(String),
    /// The backend answered something we cannot use.
    #[error("the GPU server answered garbage: {0}")]
    Protocol(String),
    /// The backend refused the prompt (its own validation, 400 body):
    /// another attempt would be refused too.
    #[error("the GPU server refused the workflow")]
    Rejected(Value),
    /// Our own side could not keep the job's output (the data disk is full, ...):
    /// another GPU would fail the same way, so it is not retried.
    #[error("the server could not save the job's output: {0}")]
    Storage(String),
}

impl BackendError {
    pub fn retryable(&self) -> bool {
        !matches!(self, BackendError::Rejected(_) | BackendError::Storage(_))
    }
}

/// Limits every backend call respects.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Connecting and small requests (`/prompt`, `/history`, `/interrupt`).
    pub request: Duration,
    /// Uploads and output downloads.
    pub transfer: Duration,
    /// No WebSocket message for this long while a job runs: the backend is
    /// presumed gone (it still gets a `/history` check first).
    pub silence: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            request: Duration::from_secs(10),
            transfer: Duration::from_secs(120),
            silence: Duration::from_secs(120),
        }
    }
}
