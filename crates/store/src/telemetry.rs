//! The metrics this crate records: names declared once, with their help texts
//! (conventions: docs/monitoring.md).

use std::time::Duration;

use crate::StoreError;

/// Latency of each store call (waiting for a connection included), by operation.
/// Labels: `op` (the call's name, a fixed set: `get_job`, `enqueue`, `transition`, ...).
pub const STORE_OPERATION_DURATION: &str = "comfyume_store_operation_duration_seconds";
/// Store calls that failed for a reason other than the caller's input, by operation and kind.
/// Labels: `op`, `kind` (`unavailable`: timeout, disk full, locked; `other`: unexpected).
pub const STORE_OPERATION_ERRORS: &str = "comfyume_store_operation_errors_total";

/// Histogram buckets (seconds) of this crate's histograms: a local SQLite answers in
/// microseconds to milliseconds; the top buckets catch a disk or lock that stalls.
pub const BUCKETS: &[(&str, &[f64])] = &[(
    STORE_OPERATION_DURATION,
    &[
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0,
    ],
)];

/// Registers the help texts of this crate's metrics (once per process, after the recorder).
pub fn describe() {
    metrics::describe_histogram!(
        STORE_OPERATION_DURATION,
        metrics::Unit::Seconds,
        "Latency of store calls (connection wait included) by operation"
    );
    metrics::describe_counter!(
        STORE_OPERATION_ERRORS,
        "Store calls that failed (unavailable: timeout, disk, lock; other: unexpected) by operation and kind"
    );
}

/// Records one store call: its latency, and its failure when the store (not the caller's
/// input, nor a lost race) is the cause.
pub(crate) fn record<T>(op: &'static str, took: Duration, res: &Result<T, StoreError>) {
    metrics::histogram!(STORE_OPERATION_DURATION, "op" => op).record(took.as_secs_f64());
    let kind = match res {
        Err(StoreError::Unavailable(_)) => "unavailable",
        Err(StoreError::Other(_)) => "other",
        _ => return,
    };
    metrics::counter!(STORE_OPERATION_ERRORS, "op" => op, "kind" => kind).increment(1);
}
