//! The workshop queue and dispatch: the fair scheduler over the durable store,
//! and (in `dispatcher`) the backends that run jobs.

pub mod backend;
pub mod dispatcher;
pub mod events;
pub mod queue;
pub mod telemetry;

pub use backend::{
    Backend, BackendError, BackendEvent, EndpointStatus, JobSpec, Outcome, OutcomeKind, Timeouts,
};
pub use comfyui::ComfyUiBackend;
/// The ComfyUI client, job state machine and output storage (its own crate, shared with the worker).
pub use comfyume_comfyui as comfyui;
pub use dispatcher::{BackendStatus, DispatchConfig, Dispatcher, ErrorNote, supervise};
pub use events::EventSink;
pub use queue::{CancelOutcome, LiveProgress, Queue, QueueConfig, QueueError, QueueSettings};
