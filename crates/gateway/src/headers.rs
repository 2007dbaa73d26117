//! Security headers: one response layer for every answer (vaultwarden-style),
//! and the stricter set every participant file is sent with.

use axum::extract::Request;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;

/// No page of this server may be framed (clickjacking of the UI or the
/// instructor's pages); nothing is content-sniffed; no full URLs (with
/// participant names) leak to other sites.
pub async fn security_headers(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    // The WebSocket upgrade is exempt: its 101 carries only the handshake.
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        return resp;
    }
    let h = resp.headers_mut();
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // Appended, not set: a participant file's own `sandbox` policy stays (browsers
    // enforce every Content-Security-Policy header of a response).
    h.append(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("frame-ancestors 'none'"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    resp
}

/// Headers of a participant's file (an upload, an output, a userdata file): shown
/// inline only as the image, video or audio type its bytes were sniffed as
/// ([`crate::sniff::media_type`]); anything else is an opaque download. A sandbox
/// policy keeps even a file opened directly from running script on this origin.
pub fn participant_file(h: &mut HeaderMap, media: Option<&'static str>, file_name: &str) {
    let (ct, disposition) = match media {
        // ComfyUI's own disposition for /view (no `inline`; the browser shows media).
        Some(ct) => (ct, format!("filename=\"{}\"", ascii_name(file_name))),
        None => (
            "application/octet-stream",
            format!("attachment; filename=\"{}\"", ascii_name(file_name)),
        ),
    };
    let mut disposition = disposition;
    if !file_name.is_ascii() {
        disposition.push_str("; filename*=UTF-8''");
        disposition.push_str(
            &percent_encoding::utf8_percent_encode(file_name, percent_encoding::NON_ALPHANUMERIC)
                .to_string(),
        );
    }
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
    h.insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_str(&disposition).unwrap_or_else(|_| {
            HeaderValue::from_static(if media.is_some() {
                "inline"
            } else {
                "attachment"
            })
        }),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("sandbox"),
    );
    h.insert(
        HeaderName::from_static("cross-origin-resource-policy"),
        HeaderValue::from_static("same-origin"),
    );
}

/// The name as a quoted-string: visible ASCII only, no quote or backslash.
fn ascii_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if (c.is_ascii_graphic() || c == ' ') && c != '"' && c != '\\' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downloads_and_media() {
        let mut h = HeaderMap::new();
        participant_file(&mut h, None, "x\".xhtml");
        assert_eq!(h[header::CONTENT_TYPE], "application/octet-stream");
        assert_eq!(
            h[header::CONTENT_DISPOSITION],
            "attachment; filename=\"x_.xhtml\""
        );
        assert_eq!(h[header::CONTENT_SECURITY_POLICY], "sandbox");
        assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        let mut h = HeaderMap::new();
        participant_file(&mut h, Some("image/png"), "café.png");
        assert_eq!(h[header::CONTENT_TYPE], "image/png");
        assert_eq!(
            h[header::CONTENT_DISPOSITION],
            "filename=\"caf_.png\"; filename*=UTF-8''caf%C3%A9%2Epng"
        );
    }
}
