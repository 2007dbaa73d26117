//! ComfyUI 0.11.0 wire formats for ComfyUMe: pure data, no I/O.
//!
//! * [`object_info`]: typed `/object_info` access and the per-participant view.
//! * [`validate`]: `POST /prompt` validation with ComfyUI's exact error bodies.
//! * [`sensitive`]: the `extra_data` keys kept out of queue/history views.
//! * [`shapes`]: queue, history, jobs and WebSocket message builders.
//! * [`limits`]: bounds on one `POST /prompt` (nodes, `extra_data`, `prompt_id`).
//! * [`redact`]: server paths cut out of job errors shown to participants.
//! * [`backend`]: parsing what a ComfyUI server sends on its WebSocket.
//! * [`worker`]: the worker protocol (`docs/worker-protocol.md`) and SSE framing.
//! * [`models`]: the model files the loaders offer, by ComfyUI model folder.

mod py;

pub mod backend;
pub mod limits;
pub mod models;
pub mod object_info;
pub mod redact;
pub mod sensitive;
pub mod shapes;
pub mod validate;
pub mod worker;

pub use backend::{BackendMessage, BackendMessageError, parse_backend_message};
pub use limits::{PromptLimits, check_prompt_request, is_uuid};
pub use object_info::{
    FileKind, InputCategory, InputKind, InputSpec, NumberSpec, ObjectInfo, ObjectInfoError,
    UserFiles, ViewTemplate, participant_node, participant_view, upload_kind,
};
/// Python `repr(float)`, `str(value)` and `bool(value)` of JSON values, for text that
/// must read like ComfyUI's (validation details, node outputs).
pub use py::{float_repr, py_str, truthy};
pub use redact::{strip_server_paths, strip_server_paths_in};
pub use sensitive::{SENSITIVE_EXTRA_DATA_KEYS, split_sensitive};
pub use validate::{
    PromptError, ValidPrompt, uses_server_counter, validate_prompt, validate_prompt_with_files,
};
