//! The metrics of the participant-facing gateway: names declared once, with their help
//! texts (conventions: docs/monitoring.md). Every label value comes from a bounded set:
//! matched routes (never the raw path), the standard methods, status codes, account
//! names, and the fixed lists below.

/// HTTP requests by matched `route`, `method` and `status`.
pub const HTTP_REQUESTS: &str = "comfyume_http_requests_total";
/// HTTP request latency (until the response head) by matched `route`.
pub const HTTP_DURATION: &str = "comfyume_http_request_duration_seconds";
/// Bytes written to participants' connections (responses and WebSocket frames, as sent).
pub const HTTP_SENT_BYTES: &str = "comfyume_http_sent_bytes_total";
/// Bytes read from participants' connections (requests, uploads, WebSocket frames).
pub const HTTP_RECEIVED_BYTES: &str = "comfyume_http_received_bytes_total";
pub const LOGIN_FAILURES: &str = "comfyume_login_failures_total";
pub const LOGIN_THROTTLED: &str = "comfyume_login_throttled_total";
/// Open participant WebSockets.
pub const WS_OPEN: &str = "comfyume_websockets_open";
/// Participants with at least one WebSocket open (a ComfyUI tab).
pub const PARTICIPANTS_ONLINE: &str = "comfyume_participants_online";
/// WebSocket messages dropped because a client stopped reading, by `priority`
/// (`low`: previews and progress; `normal`: step messages; `critical`: the socket is closed).
pub const WS_DROPPED: &str = "comfyume_websocket_messages_dropped_total";
/// Bytes of files participants uploaded (`/upload/image`, `/upload/mask`).
pub const UPLOAD_BYTES: &str = "comfyume_upload_bytes_total";
pub const CONNECTIONS_REFUSED: &str = "comfyume_connections_refused_total";
pub const CONNECTIONS_TIMED_OUT: &str = "comfyume_connections_timed_out_total";
/// Submissions (`POST /prompt`) refused, by `reason` (one of [`REFUSAL_REASONS`]).
pub const JOBS_REFUSED: &str = "comfyume_jobs_refused_total";

/// The error types `POST /prompt` answers with (ComfyUI's, and ours); anything else is
/// counted as `other`.
pub const REFUSAL_REASONS: [&str; 13] = [
    "invalid_json",
    "request_too_large",
    "invalid_prompt",
    "no_prompt",
    "prompt_no_outputs",
    "prompt_outputs_failed_validation",
    "prompt_too_large",
    "extra_data_too_large",
    "duplicate_prompt_id",
    "queue_limit_reached",
    "queue_full",
    "server_unavailable",
    "server_error",
];

/// The response header that carries the request id (also in every log line of the request).
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Histogram buckets (seconds) of this crate's histograms: from a cached static file to a
/// large upload or a slow `/view`.
pub const BUCKETS: &[(&str, &[f64])] = &[(
    HTTP_DURATION,
    &[
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ],
)];

pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        HTTP_REQUESTS,
        "HTTP requests by matched route, method and status"
    );
    describe_histogram!(
        HTTP_DURATION,
        Unit::Seconds,
        "HTTP request latency (until the response head) by matched route"
    );
    describe_counter!(
        HTTP_SENT_BYTES,
        Unit::Bytes,
        "Bytes written to participants' connections (responses and WebSocket frames)"
    );
    describe_counter!(
        HTTP_RECEIVED_BYTES,
        Unit::Bytes,
        "Bytes read from participants' connections (requests, uploads, WebSocket frames)"
    );
    describe_counter!(
        LOGIN_FAILURES,
        "Failed logins (wrong or unknown credentials)"
    );
    describe_gauge!(WS_OPEN, "Open participant WebSockets");
    describe_gauge!(
        PARTICIPANTS_ONLINE,
        "Participants with at least one WebSocket (a ComfyUI tab) open"
    );
    describe_counter!(
        WS_DROPPED,
        "WebSocket messages dropped because a client stopped reading, by priority (low: previews and progress)"
    );
    describe_counter!(
        LOGIN_THROTTLED,
        "Sign-in attempts refused with 429 (too many failures from that client)"
    );
    describe_counter!(
        CONNECTIONS_REFUSED,
        "Connections refused with 503 because MAX_CONNECTIONS were open"
    );
    describe_counter!(
        CONNECTIONS_TIMED_OUT,
        "Connections closed because nothing moved for IDLE_TIMEOUT_SECS"
    );
    describe_counter!(
        UPLOAD_BYTES,
        Unit::Bytes,
        "Bytes of files uploaded by participants"
    );
    describe_counter!(
        JOBS_REFUSED,
        "Submissions (POST /prompt) refused, by reason (the error type answered)"
    );
}

/// The `method` label: the standard methods, else `other` (a client may send any token).
pub fn method_label(m: &http::Method) -> &'static str {
    use http::Method;
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// The `reason` label of a refused submission: its error type if known, else `other`.
pub fn refusal_reason(error_type: &str) -> &'static str {
    REFUSAL_REASONS
        .into_iter()
        .find(|r| *r == error_type)
        .unwrap_or("other")
}

/// A submission was refused with this error type.
pub fn job_refused(error_type: &str) {
    metrics::counter!(JOBS_REFUSED, "reason" => refusal_reason(error_type)).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_from_requests_are_bounded() {
        assert_eq!(method_label(&http::Method::POST), "POST");
        let odd = http::Method::from_bytes(b"X-SECRET-TOKEN-123").unwrap();
        assert_eq!(method_label(&odd), "other");
        assert_eq!(refusal_reason("queue_full"), "queue_full");
        assert_eq!(refusal_reason("anything a client made up"), "other");
    }
}
