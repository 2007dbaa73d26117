//! The metrics of the workshop queue, the dispatcher and the backends: names declared
//! once, with their help texts (conventions: docs/monitoring.md).
//!
//! Labels are bounded: `backend` and `endpoint` are configured names, `user` an account
//! name, and `state`, `outcome`, `reason` come from the fixed lists below.

use comfyume_store::JobState;

// ---- jobs ---------------------------------------------------------------------------------

/// Jobs in the store by state (`queued`, `dispatched`, `running`, `succeeded`, `failed`,
/// `cancelled`, `interrupted`), read from the store's own per-state counters at each scrape.
pub const JOBS: &str = "comfyume_jobs";
/// Jobs accepted (stored, answered 200).
pub const JOBS_SUBMITTED: &str = "comfyume_jobs_submitted_total";
/// Jobs that reached a final state, by `outcome` (a [`JobState::FINISHED`] name).
pub const JOBS_FINISHED: &str = "comfyume_jobs_finished_total";
/// A participant's jobs now: `state` is `queued` (waiting in the workshop queue) or
/// `running` (taken from the queue: handed to a backend or running there).
pub const PARTICIPANT_JOBS: &str = "comfyume_participant_jobs";
/// How long the longest-waiting queued job has waited (0 when none waits).
pub const QUEUE_OLDEST_WAIT: &str = "comfyume_queue_oldest_wait_seconds";
/// Time from submission to the start of execution on a backend, by `backend`.
pub const JOB_WAIT: &str = "comfyume_job_wait_seconds";
/// Time from the start of execution to its end on a backend, by `backend`.
pub const JOB_RUN: &str = "comfyume_job_run_seconds";

// ---- dispatch -----------------------------------------------------------------------------

/// Jobs handed to a backend (each attempt once; a re-attach after a restart is not one).
pub const DISPATCH_ATTEMPTS: &str = "comfyume_dispatch_attempts_total";
/// Jobs put back in the queue for another attempt after a backend failed them, by `backend`.
pub const DISPATCH_RETRIES: &str = "comfyume_dispatch_retries_total";
/// Attempts that failed through the backend's fault, by `backend` and `reason`
/// (one of [`FAILURE_REASONS`]).
pub const DISPATCH_FAILURES: &str = "comfyume_dispatch_failures_total";
/// Why an attempt failed: the backend's error kinds, `never_started` (no start within
/// `JOB_START_TIMEOUT`), `job_timeout` (ran past `JOB_TIMEOUT`), `crashed` (a bug in the
/// dispatcher).
pub const FAILURE_REASONS: [&str; 9] = [
    "unreachable",
    "lost",
    "timeout",
    "protocol",
    "rejected",
    "never_started",
    "job_timeout",
    "crashed",
    "storage",
];

// ---- backends -----------------------------------------------------------------------------

/// Jobs a backend may hold at once, by `backend`.
pub const BACKEND_SLOTS: &str = "comfyume_backend_slots";
/// Of those, the slots holding a job now, by `backend`.
pub const BACKEND_SLOTS_IN_USE: &str = "comfyume_backend_slots_in_use";
/// 1 for the backend's current `state`, 0 for the others (see [`BACKEND_STATES`]).
pub const BACKEND_STATE: &str = "comfyume_backend_state";
/// `ready`: taking jobs; `failing`: failed a job in the last 30 s (passed over while
/// another backend is free).
pub const BACKEND_STATES: [&str; 2] = ["ready", "failing"];

// ---- serverless endpoints (filled by the serverless backend through the hooks below) ------

/// 1 for the endpoint's current `state`, 0 for the others (see [`ENDPOINT_STATES`]).
pub const ENDPOINT_STATE: &str = "comfyume_endpoint_state";
/// `cold`: no replica running; `starting`: a replica is starting (a cold start);
/// `ready`: a replica is up and idle; `busy`: running jobs; `failing`: its last requests
/// failed; `disabled`: taken out of the failover chain.
pub const ENDPOINT_STATES: [&str; 6] = ["cold", "starting", "ready", "busy", "failing", "disabled"];
/// Requests to an endpoint that failed, by `endpoint` and `reason` (a [`FAILURE_REASONS`] name).
pub const ENDPOINT_FAILURES: &str = "comfyume_endpoint_failures_total";
/// Cold starts (a job waited for a replica to start), by `endpoint`.
pub const COLD_STARTS: &str = "comfyume_cold_starts_total";
/// How long each cold start took until the replica was ready, by `endpoint`.
pub const COLD_START_DURATION: &str = "comfyume_cold_start_duration_seconds";
/// GPU time billed by the provider, by `endpoint`.
pub const GPU_SECONDS: &str = "comfyume_gpu_seconds_total";
/// What that GPU time cost in euros (the price table's currency), by `endpoint`.
pub const GPU_COST: &str = "comfyume_gpu_cost_eur_total";

/// Histogram buckets (seconds) of this crate's histograms.
pub const BUCKETS: &[(&str, &[f64])] = &[
    // From "taken at once" to "waited half an hour in a full workshop".
    (
        JOB_WAIT,
        &[
            0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0,
            1800.0, 3600.0,
        ],
    ),
    // From a simulator's blink to a long video job.
    (
        JOB_RUN,
        &[
            0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0,
            1800.0,
        ],
    ),
    // Serverless cold starts take from seconds to several minutes.
    (
        COLD_START_DURATION,
        &[
            5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 240.0, 300.0, 450.0, 600.0,
            900.0,
        ],
    ),
];

/// Registers the help texts of this crate's metrics (once per process, after the recorder).
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(
        JOBS,
        "Jobs in the store by state (from the store's per-state counters)"
    );
    describe_counter!(JOBS_SUBMITTED, "Jobs accepted (stored, answered 200)");
    describe_counter!(
        JOBS_FINISHED,
        "Jobs that reached a final state, by outcome (succeeded, failed, cancelled, interrupted)"
    );
    describe_gauge!(
        PARTICIPANT_JOBS,
        "A participant's jobs now: queued (waiting) or running (handed to or running on a backend)"
    );
    describe_gauge!(
        QUEUE_OLDEST_WAIT,
        Unit::Seconds,
        "How long the longest-waiting queued job has waited (0 when none waits)"
    );
    describe_histogram!(
        JOB_WAIT,
        Unit::Seconds,
        "Time from submission to the start of execution, by backend"
    );
    describe_histogram!(
        JOB_RUN,
        Unit::Seconds,
        "Time from the start of execution to its end, by backend"
    );
    describe_counter!(
        DISPATCH_ATTEMPTS,
        "Jobs handed to a backend, each attempt once, by backend"
    );
    describe_counter!(
        DISPATCH_RETRIES,
        "Jobs queued again for another attempt after a backend failed them, by backend"
    );
    describe_counter!(
        DISPATCH_FAILURES,
        "Attempts that failed through the backend's fault, by backend and reason"
    );
    describe_gauge!(BACKEND_SLOTS, "Jobs a backend may hold at once");
    describe_gauge!(BACKEND_SLOTS_IN_USE, "Backend slots holding a job now");
    describe_gauge!(
        BACKEND_STATE,
        "1 for the backend's current state (ready, failing), 0 for the others"
    );
    describe_gauge!(
        ENDPOINT_STATE,
        "1 for the serverless endpoint's current state (cold, starting, ready, busy, failing, disabled), 0 for the others"
    );
    describe_counter!(
        ENDPOINT_FAILURES,
        "Requests to a serverless endpoint that failed, by endpoint and reason"
    );
    describe_counter!(COLD_STARTS, "Cold starts of a serverless endpoint");
    describe_histogram!(
        COLD_START_DURATION,
        Unit::Seconds,
        "Time until a cold serverless replica was ready, by endpoint"
    );
    // GPU_SECONDS and GPU_COST are described where they are rendered (`render_fractional`).
}

/// A job reached its final state (`outcome` is the state's name).
pub fn job_finished(state: JobState) {
    metrics::counter!(JOBS_FINISHED, "outcome" => state.as_str()).increment(1);
}

/// Sets an enum-like gauge: 1 for `current`, 0 for the other names of `all`.
fn set_state(
    name: &'static str,
    key: &'static str,
    who: &str,
    all: &[&'static str],
    current: &str,
) {
    for s in all {
        let v = if *s == current { 1.0 } else { 0.0 };
        metrics::gauge!(name, key => who.to_owned(), "state" => *s).set(v);
    }
}

/// The backend's state (one of [`BACKEND_STATES`]; anything else counts as none of them).
pub fn backend_state(backend: &str, state: &str) {
    set_state(BACKEND_STATE, "backend", backend, &BACKEND_STATES, state);
}

// ---- hooks for the serverless backend ------------------------------------------------------

/// The endpoint's state (one of [`ENDPOINT_STATES`]).
pub fn endpoint_state(endpoint: &str, state: &str) {
    set_state(
        ENDPOINT_STATE,
        "endpoint",
        endpoint,
        &ENDPOINT_STATES,
        state,
    );
}

/// A request to the endpoint failed; `reason` outside [`FAILURE_REASONS`] counts as `other`.
pub fn endpoint_failure(endpoint: &str, reason: &str) {
    let reason = FAILURE_REASONS
        .into_iter()
        .find(|r| *r == reason)
        .unwrap_or("other");
    metrics::counter!(ENDPOINT_FAILURES, "endpoint" => endpoint.to_owned(), "reason" => reason)
        .increment(1);
}

/// A cold start of the endpoint ended after `secs` (the replica became ready).
pub fn cold_start(endpoint: &str, secs: f64) {
    metrics::counter!(COLD_STARTS, "endpoint" => endpoint.to_owned()).increment(1);
    metrics::histogram!(COLD_START_DURATION, "endpoint" => endpoint.to_owned()).record(secs);
}

/// GPU time the provider bills for the endpoint, and what it costs (euros, the price table's currency; 0 when the
/// price is unknown). Both are fractional counters (see [`render_fractional`]).
pub fn gpu_billed(endpoint: &str, secs: f64, eur: f64) {
    add_fractional(GPU_SECONDS, endpoint, secs);
    add_fractional(GPU_COST, endpoint, eur);
}

// ---- fractional counters ---------------------------------------------------------------------

/// The `metrics` crate counts in integers; GPU-seconds and euros need fractions. These
/// two counters live here and are appended to the exporter's text by [`render_fractional`].
static FRACTIONAL: std::sync::Mutex<std::collections::BTreeMap<(&'static str, String), f64>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// Whether fractional counters are recorded (off with `COMFYUME_METRICS=off`).
static FRACTIONAL_ON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Turns recording of the fractional counters on (the server does when metrics are on).
pub fn enable_fractional() {
    FRACTIONAL_ON.store(true, std::sync::atomic::Ordering::Relaxed);
}

fn add_fractional(name: &'static str, endpoint: &str, v: f64) {
    if !FRACTIONAL_ON.load(std::sync::atomic::Ordering::Relaxed) || !v.is_finite() || v < 0.0 {
        return;
    }
    let mut m = FRACTIONAL.lock().unwrap_or_else(|p| p.into_inner());
    *m.entry((name, endpoint.to_owned())).or_insert(0.0) += v;
}

/// The fractional counters in Prometheus' text format (to append to the exporter's).
pub fn render_fractional() -> String {
    use std::fmt::Write;
    let m = FRACTIONAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut out = String::new();
    for (name, help) in [
        (
            GPU_SECONDS,
            "GPU time billed by the serverless provider, by endpoint",
        ),
        (
            GPU_COST,
            "Cost of the billed GPU time in euros, by endpoint",
        ),
    ] {
        let series: Vec<_> = m.iter().filter(|((n, _), _)| *n == name).collect();
        if series.is_empty() {
            continue;
        }
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} counter");
        for ((_, endpoint), v) in series {
            let _ = writeln!(out, "{name}{{endpoint=\"{}\"}} {v}", label_value(endpoint));
        }
        out.push('\n');
    }
    out
}

/// A label value escaped as the text format wants (`\\`, `\"`, `\n`).
fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fractional_counters_add_up_and_render_as_counters() {
        // Off: nothing is kept.
        gpu_billed("test-off", 1.0, 1.0);
        assert!(!render_fractional().contains("test-off"));
        enable_fractional();
        gpu_billed("h200-spot", 1.25, 0.25);
        gpu_billed("h200-spot", 0.5, 0.125);
        gpu_billed("we\"ird", 2.0, -1.0);
        let text = render_fractional();
        assert!(
            text.contains("# TYPE comfyume_gpu_seconds_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("comfyume_gpu_seconds_total{endpoint=\"h200-spot\"} 1.75\n"),
            "{text}"
        );
        assert!(
            text.contains("comfyume_gpu_cost_eur_total{endpoint=\"h200-spot\"} 0.375\n"),
            "{text}"
        );
        assert!(
            text.contains("comfyume_gpu_seconds_total{endpoint=\"we\\\"ird\"} 2\n"),
            "{text}"
        );
        // A negative or unknown price adds nothing.
        assert!(!text.contains("cost_eur_total{endpoint=\"we"), "{text}");
    }

    /// What the serverless backend's hooks leave on `/metrics`: one state at a time, cold
    /// starts counted with their duration, failure reasons from the fixed list.
    #[test]
    fn hooks_record_bounded_series() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(COLD_START_DURATION.into()),
                BUCKETS[2].1,
            )
            .unwrap()
            .build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            describe();
            endpoint_state("h200-spot", "starting");
            endpoint_state("h200-spot", "ready");
            backend_state("gpu-1", "failing");
            cold_start("h200-spot", 42.0);
            endpoint_failure("h200-spot", "unreachable");
            endpoint_failure(
                "h200-spot",
                "the provider said: quota for key sk-123 exceeded",
            );
        });
        let text = handle.render();
        let has = |line: &str| text.lines().any(|l| l == line);
        assert!(
            has(r#"comfyume_endpoint_state{endpoint="h200-spot",state="ready"} 1"#),
            "{text}"
        );
        assert!(has(
            r#"comfyume_endpoint_state{endpoint="h200-spot",state="starting"} 0"#
        ));
        assert!(has(
            r#"comfyume_endpoint_state{endpoint="h200-spot",state="cold"} 0"#
        ));
        assert!(has(
            r#"comfyume_backend_state{backend="gpu-1",state="failing"} 1"#
        ));
        assert!(has(
            r#"comfyume_backend_state{backend="gpu-1",state="ready"} 0"#
        ));
        assert!(has(r#"comfyume_cold_starts_total{endpoint="h200-spot"} 1"#));
        assert!(has(
            r#"comfyume_cold_start_duration_seconds_bucket{endpoint="h200-spot",le="45"} 1"#
        ));
        assert!(has(
            r#"comfyume_cold_start_duration_seconds_bucket{endpoint="h200-spot",le="30"} 0"#
        ));
        assert!(has(
            r#"comfyume_endpoint_failures_total{endpoint="h200-spot",reason="unreachable"} 1"#
        ));
        assert!(has(
            r#"comfyume_endpoint_failures_total{endpoint="h200-spot",reason="other"} 1"#
        ));
        assert!(!text.contains("sk-123"));
        assert!(text.contains("# HELP comfyume_cold_starts_total"));
    }
}
