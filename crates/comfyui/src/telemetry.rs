//! The metrics this crate records: names declared once, with their help texts.

/// Latency of each call to a ComfyUI backend, by backend and call.
pub const BACKEND_CALL_DURATION: &str = "comfyume_backend_call_duration_seconds";
/// Failed calls to a ComfyUI backend, by backend, call and error kind.
pub const BACKEND_CALL_ERRORS: &str = "comfyume_backend_call_errors_total";
/// WebSocket re-connections after a drop mid-job, by backend.
pub const BACKEND_WS_RECONNECTS: &str = "comfyume_backend_websocket_reconnects_total";

/// Registers the descriptions of this module's metrics (once per process).
pub fn describe_metrics() {
    metrics::describe_histogram!(
        BACKEND_CALL_DURATION,
        metrics::Unit::Seconds,
        "Latency of calls to ComfyUI backends by backend and call"
    );
    metrics::describe_counter!(
        BACKEND_CALL_ERRORS,
        "Failed calls to ComfyUI backends by backend, call and error kind"
    );
    metrics::describe_counter!(
        BACKEND_WS_RECONNECTS,
        "WebSocket re-connections to ComfyUI backends after a drop mid-job"
    );
}
