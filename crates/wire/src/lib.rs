//! ComfyUI 0.11.0 wire formats for ComfyUMe: pure data, no I/O.
//!
//! * [`object_info`]: typed `/object_info` access and the per-participant view.
//! * [`validate`]: `POST /prompt` validation with ComfyUI's exact error bodies.
//! * [`sensitive`]: the `extra_data` keys kept out of queue/history views.
//! * [`shapes`]: queue, history, jobs and WebSocket message builders.
//! * [`worker`]: the worker protocol (`docs/worker-protocol.md`) and SSE framing.

mod py;

pub mod object_info;
pub mod sensitive;
pub mod shapes;
pub mod validate;
pub mod worker;

pub use object_info::{
    FileKind, InputCategory, InputKind, InputSpec, NumberSpec, ObjectInfo, ObjectInfoError,
    UserFiles, ViewTemplate, participant_node, participant_view, upload_kind,
};
/// Python `repr(float)`, `str(value)` and `bool(value)` of JSON values, for text that
/// must read like ComfyUI's (validation details, node outputs).
pub use py::{float_repr, py_str, truthy};
pub use sensitive::{SENSITIVE_EXTRA_DATA_KEYS, split_sensitive};
pub use validate::{
    PromptError, ValidPrompt, uses_server_counter, validate_prompt, validate_prompt_with_files,
};
