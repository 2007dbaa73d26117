//! The CSRF token of a session: SHA-256 of a fixed label and the session's token (which
//! only the browser's HttpOnly cookie holds; the store keeps a different hash of it). The
//! page gets it in a `<meta>` tag and in the live stream's first message, and sends it back
//! as `X-CSRF-Token` with every state change. Stable across restarts of `serve`.

use axum::http::HeaderMap;
use comfyume_gateway::auth::{SESSION_COOKIE, cookie_value};
use sha2::{Digest, Sha256};

pub const HEADER: &str = "x-csrf-token";

/// The token for a session token.
pub fn token_for(session_token: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"comfyume-csrf\0");
    h.update(session_token.as_bytes());
    hex::encode(h.finalize())
}

/// The token of the session cookie in `headers`, if there is one.
pub fn token_of(headers: &HeaderMap) -> Option<String> {
    cookie_value(headers, SESSION_COOKIE).map(token_for)
}

/// Whether `headers` carry the right token for their session cookie.
pub fn check(headers: &HeaderMap) -> bool {
    let (Some(want), Some(got)) = (
        token_of(headers),
        headers.get(HEADER).and_then(|v| v.to_str().ok()),
    ) else {
        return false;
    };
    // Constant time: the comparison does not tell how much of a guess was right.
    want.len() == got.len()
        && want
            .bytes()
            .zip(got.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_matches_its_session_only() {
        let mut h = HeaderMap::new();
        h.insert("cookie", "a=b; comfyume_session=tok123".parse().unwrap());
        assert!(!check(&h), "no header");
        h.insert(HEADER, token_for("other").parse().unwrap());
        assert!(!check(&h), "another session's token");
        h.insert(HEADER, token_for("tok123").parse().unwrap());
        assert!(check(&h));
        assert_ne!(token_for("tok123"), "tok123");
        assert_eq!(token_for("tok123").len(), 64);
        let mut no_cookie = HeaderMap::new();
        no_cookie.insert(HEADER, token_for("tok123").parse().unwrap());
        assert!(!check(&no_cookie));
    }
}
