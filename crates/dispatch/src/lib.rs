//! The workshop queue and dispatch: the fair scheduler over the durable store,
//! and (in `dispatcher`) the backends that run jobs.

pub mod events;
pub mod queue;

pub use events::EventSink;
pub use queue::{Queue, QueueConfig, QueueError};
