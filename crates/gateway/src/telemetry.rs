//! Metric names, declared once with their descriptions.

pub const HTTP_REQUESTS: &str = "comfyume_http_requests_total";
pub const HTTP_DURATION: &str = "comfyume_http_request_duration_seconds";
pub const LOGIN_FAILURES: &str = "comfyume_login_failures_total";
pub const WS_OPEN: &str = "comfyume_websockets_open";
pub const WS_DROPPED: &str = "comfyume_websocket_messages_dropped_total";
pub const UPLOAD_BYTES: &str = "comfyume_upload_bytes_total";
pub const LOGIN_THROTTLED: &str = "comfyume_login_throttled_total";
pub const CONNECTIONS_REFUSED: &str = "comfyume_connections_refused_total";
pub const CONNECTIONS_TIMED_OUT: &str = "comfyume_connections_timed_out_total";

pub fn describe() {
    metrics::describe_counter!(
        HTTP_REQUESTS,
        "HTTP requests by matched route, method and status"
    );
    metrics::describe_histogram!(
        HTTP_DURATION,
        metrics::Unit::Seconds,
        "HTTP request latency by matched route"
    );
    metrics::describe_counter!(
        LOGIN_FAILURES,
        "Failed logins (wrong or unknown credentials)"
    );
    metrics::describe_gauge!(WS_OPEN, "Open participant WebSockets");
    metrics::describe_counter!(
        WS_DROPPED,
        "WebSocket messages dropped (previews and progress first) because a client stopped reading"
    );
    metrics::describe_counter!(
        LOGIN_THROTTLED,
        "Sign-in attempts refused with 429 (too many failures from that client)"
    );
    metrics::describe_counter!(
        CONNECTIONS_REFUSED,
        "Connections refused with 503 because MAX_CONNECTIONS were open"
    );
    metrics::describe_counter!(
        CONNECTIONS_TIMED_OUT,
        "Connections closed because nothing moved for IDLE_TIMEOUT_SECS"
    );
    metrics::describe_counter!(
        UPLOAD_BYTES,
        metrics::Unit::Bytes,
        "Bytes uploaded by participants"
    );
}
