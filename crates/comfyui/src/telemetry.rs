//! The metrics this crate records: names declared once, with their help texts
//! (conventions: docs/monitoring.md).

/// Latency of each call to a ComfyUI backend, by `backend` and `call` (a fixed set of
/// names: `prompt`, `history`, `view`, `upload`, ...).
pub const BACKEND_CALL_DURATION: &str = "comfyume_backend_call_duration_seconds";
/// Failed calls to a ComfyUI backend, by `backend`, `call` and error `kind`.
pub const BACKEND_CALL_ERRORS: &str = "comfyume_backend_call_errors_total";
/// WebSocket re-connections after a drop mid-job, by `backend`.
pub const BACKEND_WS_RECONNECTS: &str = "comfyume_backend_websocket_reconnects_total";

/// Histogram buckets (seconds) of this crate's histograms: small calls on a LAN take
/// milliseconds; downloading a video output takes seconds.
pub const BUCKETS: &[(&str, &[f64])] = &[(
    BACKEND_CALL_DURATION,
    &[
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ],
)];

/// Registers the descriptions of this module's metrics (once per process).
pub fn describe() {
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

/// [`describe`] under its former name (kept so branches that call it still build).
#[doc(hidden)]
pub fn describe_metrics() {
    describe()
}
