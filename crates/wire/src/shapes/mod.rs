//! Builders for the ComfyUI response shapes the queue, history and WebSocket views need.
//! Pure: they take plain data (timestamps included) and return `serde_json::Value`s or bytes.

pub mod jobs;
pub mod queue;
pub mod ws;

pub use jobs::{
    JobSort, JobSource, JobStatus, JobsQuery, JobsQueryError, QueuedJob, job_detail, job_entry,
    job_not_found, outputs_summary,
};
pub use queue::{
    ExecStatus, HistoryRecord, StatusStr, history_item, history_response, history_window,
    meta_entry, prompt_accepted, prompt_info, queue_item, queue_response,
};
pub use ws::{
    BinaryFrame, ExecutionErrorInfo, FrameError, NodeProgress, client_feature_flags, executed,
    executing, executing_done, execution_cached, execution_error, execution_interrupted,
    execution_start, execution_success, feature_flags, preview_image_frame,
    preview_image_with_metadata_frame, preview_metadata, progress, progress_state, status_message,
    text_frame, to_python_json, wants_preview_metadata, ws_message,
};
