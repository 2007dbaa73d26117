//! One mapping from failures to HTTP responses, in the shapes ComfyUI's callers expect.

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use comfyume_store::StoreError;

/// An error answered to a participant. Bodies follow ComfyUI: most routes answer
/// plain text (or nothing), the JSON routes answer `{"error": "..."}`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Status with an empty body (ComfyUI's 400/403/404 on file routes).
    #[error("{0}")]
    Empty(StatusCode),
    /// Status with a `text/plain` body.
    #[error("{1}")]
    Text(StatusCode, String),
    /// Status with `{"error": message}`.
    #[error("{1}")]
    Json(StatusCode, String),
    /// Status with an arbitrary JSON body (ComfyUI-shaped prompt errors).
    #[error("json error")]
    Body(StatusCode, serde_json::Value),
    /// Past the participant's storage quota: `413`, the reason in the status line too
    /// (the frontend's upload toast shows `status - statusText`).
    #[error(transparent)]
    Quota(#[from] crate::quota::Exceeded),
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

impl ApiError {
    pub fn bad_request(msg: impl Into<String>) -> Self {
        ApiError::Text(StatusCode::BAD_REQUEST, msg.into())
    }
    pub fn not_found() -> Self {
        ApiError::Empty(StatusCode::NOT_FOUND)
    }
    pub fn forbidden() -> Self {
        ApiError::Empty(StatusCode::FORBIDDEN)
    }

    /// A participant path that could not be resolved: the size limits answer 400
    /// with their reason; traversal and malformed paths answer `otherwise` (each
    /// route keeps ComfyUI's own status for those).
    pub fn path(e: crate::paths::PathError, otherwise: ApiError) -> Self {
        if e.is_limit() {
            ApiError::Text(StatusCode::BAD_REQUEST, format!("Invalid path: {e}."))
        } else {
            otherwise
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            ApiError::Empty(code) => code.into_response(),
            ApiError::Text(code, msg) => (
                code,
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                msg,
            )
                .into_response(),
            ApiError::Json(code, msg) => {
                (code, axum::Json(serde_json::json!({ "error": msg }))).into_response()
            }
            ApiError::Body(code, body) => (code, axum::Json(body)).into_response(),
            ApiError::Quota(e) => {
                let mut resp = (
                    StatusCode::PAYLOAD_TOO_LARGE,
                    [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                    e.message(),
                )
                    .into_response();
                if let Ok(reason) = hyper::ext::ReasonPhrase::try_from(
                    format!(
                        "Storage quota exceeded ({} of {} used)",
                        crate::quota::human(e.used),
                        crate::quota::human(e.quota)
                    )
                    .into_bytes(),
                ) {
                    resp.extensions_mut().insert(reason);
                }
                resp
            }
            ApiError::Store(e) => store_error_response(&e),
            ApiError::Io(e) => io_error_response(&e),
        }
    }
}

fn store_error_response(e: &StoreError) -> Response {
    match e {
        StoreError::NotFound => StatusCode::NOT_FOUND.into_response(),
        StoreError::AlreadyExists => (StatusCode::CONFLICT, "already exists").into_response(),
        StoreError::Unavailable(_) => {
            tracing::error!(error = %e, "store unavailable");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "storage is temporarily unavailable, please retry",
            )
                .into_response()
        }
        _ => {
            tracing::error!(error = %e, "store error");
            (StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response()
        }
    }
}

fn io_error_response(e: &std::io::Error) -> Response {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::NotFound => StatusCode::NOT_FOUND.into_response(),
        ErrorKind::PermissionDenied => StatusCode::FORBIDDEN.into_response(),
        // The paths are checked before use; these are a participant's names
        // meeting the file system's own limits, never the server's fault.
        ErrorKind::InvalidFilename => (
            StatusCode::BAD_REQUEST,
            "Invalid path: a name is too long or not allowed.",
        )
            .into_response(),
        ErrorKind::NotADirectory | ErrorKind::IsADirectory | ErrorKind::DirectoryNotEmpty => (
            StatusCode::CONFLICT,
            "A file or folder of that name is in the way.",
        )
            .into_response(),
        ErrorKind::StorageFull | ErrorKind::QuotaExceeded => {
            tracing::error!(error = %e, "disk full");
            (
                StatusCode::INSUFFICIENT_STORAGE,
                "the server's disk is full",
            )
                .into_response()
        }
        _ => {
            tracing::error!(error = %e, "i/o error");
            (StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response()
        }
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
