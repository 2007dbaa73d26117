//! Bounds on what one request may make the server read and keep: JSON bodies
//! (`/userdata`, `/settings`, `/prompt`; uploads keep `MAX_UPLOAD_SIZE`) and
//! the prompt caps of [`comfyume_wire::PromptLimits`]. The router puts one
//! [`Limits`] into every request's extensions.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{StatusCode, header};
use comfyume_wire::PromptLimits;

use crate::error::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest JSON (or userdata) request body, in bytes.
    pub max_json_body: usize,
    pub prompt: PromptLimits,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_json_body: 8 * 1024 * 1024,
            prompt: PromptLimits::default(),
        }
    }
}

/// A body over [`Limits::max_json_body`] (or one that broke off).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyError {
    TooLarge { limit: usize },
    Unreadable(String),
}

impl BodyError {
    pub fn message(&self) -> String {
        match self {
            BodyError::TooLarge { limit } => format!(
                "The request body is larger than this server accepts ({} MB).",
                limit / (1024 * 1024)
            ),
            BodyError::Unreadable(e) => format!("The request body could not be read: {e}"),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            BodyError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            BodyError::Unreadable(_) => StatusCode::BAD_REQUEST,
        }
    }
}

/// The request's limits (the defaults when the router set none).
pub fn of(req: &Request) -> Limits {
    req.extensions()
        .get::<Limits>()
        .copied()
        .unwrap_or_default()
}

/// Reads the whole body, refusing it as soon as it passes the JSON limit (a
/// declared `Content-Length` over it is refused before a byte is read).
pub async fn read_body(req: Request) -> Result<Bytes, BodyError> {
    let limit = of(&req).max_json_body;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(BodyError::TooLarge { limit });
    }
    axum::body::to_bytes(req.into_body(), limit)
        .await
        .map_err(|e| {
            // to_bytes reports the limit as a boxed LengthLimitError.
            let over = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            if over {
                BodyError::TooLarge { limit }
            } else {
                BodyError::Unreadable(e.to_string())
            }
        })
}

/// A request body within [`Limits::max_json_body`]; over it, 413 with a message.
pub struct JsonBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = ApiError;
    async fn from_request(req: Request, _: &S) -> Result<Self, Self::Rejection> {
        read_body(req)
            .await
            .map(JsonBody)
            .map_err(|e| ApiError::Text(e.status(), e.message()))
    }
}
