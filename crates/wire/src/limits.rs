//! Bounds on one `POST /prompt`, checked before the (costlier) validation: how
//! many nodes a prompt may have, how much `extra_data` the history may keep for
//! it, and the shape of a client-chosen `prompt_id`. Errors are ComfyUI-shaped,
//! so the stock frontend shows them like any validation failure.

use std::io::Write;

use serde_json::Value;

use crate::validate::PromptError;

/// Caps on one prompt. ComfyUI has none; a workshop server shared by a room needs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PromptLimits {
    /// Nodes in `prompt` (a real workflow has tens to a few hundred).
    pub max_nodes: usize,
    /// `extra_data` as JSON, in bytes (it holds the UI workflow; the history keeps it).
    pub max_extra_data_bytes: usize,
}

impl Default for PromptLimits {
    fn default() -> Self {
        PromptLimits {
            max_nodes: 2000,
            max_extra_data_bytes: 4 * 1024 * 1024,
        }
    }
}

/// `true` for a UUID as ComfyUI's clients send one: 32 hex digits, bare or in
/// the 8-4-4-4-12 hyphenated form.
pub fn is_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    match b.len() {
        32 => b.iter().all(u8::is_ascii_hexdigit),
        36 => b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        }),
        _ => false,
    }
}

/// Counts bytes without keeping them.
struct Counter(usize);

impl Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn json_len(v: &Value) -> usize {
    let mut c = Counter(0);
    // Writing a Value to a counter cannot fail.
    let _ = serde_json::to_writer(&mut c, v);
    c.0
}

fn mb(bytes: usize) -> String {
    format!("{:.1} MB", bytes as f64 / (1024.0 * 1024.0))
}

/// Checks `body` (a `POST /prompt` body) against `limits`; a body without a
/// `prompt` passes here and gets ComfyUI's own `no_prompt` from validation.
pub fn check_prompt_request(body: &Value, limits: &PromptLimits) -> Result<(), PromptError> {
    // Present means a UUID string: ComfyUI str()s whatever it gets (null became "None").
    if let Some(id) = body.get("prompt_id") {
        let ok = id.as_str().is_some_and(is_uuid);
        if !ok {
            return Err(PromptError::rejected(
                "invalid_prompt",
                "Invalid prompt_id",
                "prompt_id must be a UUID, e.g. 0f8fad5b-d9cb-469f-a165-70867728950e",
            ));
        }
    }
    if let Some(nodes) = body.get("prompt").and_then(Value::as_object)
        && nodes.len() > limits.max_nodes
    {
        return Err(PromptError::rejected(
            "prompt_too_large",
            &format!(
                "The workflow has {} nodes; this workshop server runs at most {} per job.",
                nodes.len(),
                limits.max_nodes
            ),
            "",
        ));
    }
    if let Some(extra) = body.get("extra_data") {
        let n = json_len(extra);
        if n > limits.max_extra_data_bytes {
            return Err(PromptError::rejected(
                "extra_data_too_large",
                &format!(
                    "The workflow data sent with this job is {}; this workshop server keeps at most {} per job.",
                    mb(n),
                    mb(limits.max_extra_data_bytes)
                ),
                "",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn uuids() {
        assert!(is_uuid("0f8fad5b-d9cb-469f-a165-70867728950e"));
        assert!(is_uuid("0F8FAD5BD9CB469FA16570867728950E"));
        for bad in [
            "",
            "my-own-id-123",
            "../../x",
            "0f8fad5b-d9cb-469f-a165-70867728950",
            "0f8fad5b-d9cb-469f-a165_70867728950e",
            "{0f8fad5b-d9cb-469f-a165-70867728950e}",
            "0f8fad5b d9cb 469f a165 70867728950e",
            "g f8fad5b-d9cb-469f-a165-70867728950e",
        ] {
            assert!(!is_uuid(bad), "{bad}");
        }
    }

    #[test]
    fn caps() {
        let l = PromptLimits {
            max_nodes: 3,
            max_extra_data_bytes: 100,
        };
        let nodes = |n: usize| {
            Value::Object(
                (0..n)
                    .map(|i| (i.to_string(), json!({"class_type": "X", "inputs": {}})))
                    .collect(),
            )
        };
        assert!(check_prompt_request(&json!({"prompt": nodes(3)}), &l).is_ok());
        let e = check_prompt_request(&json!({"prompt": nodes(4)}), &l).unwrap_err();
        assert_eq!(e.error_type(), "prompt_too_large");
        assert!(e.message().contains("4 nodes"), "{}", e.message());
        assert_eq!(e.body()["node_errors"], json!({}));
        let big = json!({"prompt": nodes(1), "extra_data": {"w": "x".repeat(100)}});
        assert_eq!(
            check_prompt_request(&big, &l).unwrap_err().error_type(),
            "extra_data_too_large"
        );
        for id in [json!("../../x"), json!(5), json!("a b"), json!(null)] {
            let e = check_prompt_request(&json!({"prompt": {}, "prompt_id": id}), &l).unwrap_err();
            assert_eq!(e.message(), "Invalid prompt_id");
        }
        let ok = json!({"prompt": {}, "prompt_id": "0f8fad5b-d9cb-469f-a165-70867728950e"});
        assert!(check_prompt_request(&ok, &l).is_ok());
    }
}
