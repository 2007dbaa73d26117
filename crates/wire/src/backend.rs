//! Messages a ComfyUI server sends on its WebSocket, as a client of it (the
//! dispatcher) reads them: pure parsing, no I/O. Text messages are
//! `{"type": ..., "data": {...}}`; binary ones are [`crate::shapes::BinaryFrame`]s.

use serde_json::{Map, Value};

/// Why a text message from a backend is not a ComfyUI message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendMessageError {
    #[error("not JSON: {0}")]
    NotJson(String),
    #[error("not a JSON object")]
    NotObject,
    #[error("no string \"type\"")]
    NoType,
    #[error("\"data\" is not an object")]
    BadData,
    #[error("\"data.prompt_id\" is not a string")]
    BadPromptId,
}

/// One parsed text message.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendMessage {
    pub kind: String,
    /// `data.prompt_id`, when the message names a prompt.
    pub prompt_id: Option<String>,
    /// `data` (empty when absent).
    pub data: Map<String, Value>,
}

impl BackendMessage {
    /// The backend's own queue state (`status`), its feature flags and logs:
    /// never a job's event.
    pub fn is_backend_state(&self) -> bool {
        matches!(self.kind.as_str(), "status" | "feature_flags" | "logs")
    }

    /// `executing` with `node: null`: ComfyUI's end-of-prompt marker.
    pub fn is_end_marker(&self) -> bool {
        self.kind == "executing" && self.data.get("node").is_some_and(Value::is_null)
    }

    /// `data.node` of `executing`/`executed`/`progress`.
    pub fn node(&self) -> Option<&str> {
        self.data.get("node").and_then(Value::as_str)
    }

    /// Whether this message belongs to prompt `id` (messages naming no prompt
    /// belong to whichever one is running).
    pub fn concerns(&self, id: &str) -> bool {
        self.prompt_id.as_deref().is_none_or(|p| p == id)
    }
}

/// Parses one text message of a ComfyUI WebSocket.
pub fn parse_backend_message(text: &str) -> Result<BackendMessage, BackendMessageError> {
    let v: Value =
        serde_json::from_str(text).map_err(|e| BackendMessageError::NotJson(e.to_string()))?;
    let Value::Object(mut m) = v else {
        return Err(BackendMessageError::NotObject);
    };
    let kind = match m.remove("type") {
        Some(Value::String(s)) => s,
        _ => return Err(BackendMessageError::NoType),
    };
    let data = match m.remove("data") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(d)) => d,
        Some(_) => return Err(BackendMessageError::BadData),
    };
    let prompt_id = match data.get("prompt_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(BackendMessageError::BadPromptId),
    };
    Ok(BackendMessage {
        kind,
        prompt_id,
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comfyui_messages() {
        let m =
            parse_backend_message(r#"{"type":"executing","data":{"node":null,"prompt_id":"p1"}}"#)
                .unwrap();
        assert!(m.is_end_marker() && m.concerns("p1") && !m.concerns("p2"));
        let m = parse_backend_message(
            r#"{"type":"executing","data":{"node":"3","display_node":"3","prompt_id":"p1"}}"#,
        )
        .unwrap();
        assert_eq!(m.node(), Some("3"));
        assert!(!m.is_end_marker());
        let m = parse_backend_message(
            r#"{"type":"status","data":{"status":{"exec_info":{"queue_remaining":0}},"sid":"x"}}"#,
        )
        .unwrap();
        assert!(m.is_backend_state() && m.prompt_id.is_none() && m.concerns("any"));
        // A custom node's message without data.
        assert!(parse_backend_message(r#"{"type":"custom"}"#).is_ok());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for (text, want) in [
            ("", "not JSON"),
            ("[1]", "not a JSON object"),
            (r#"{"data":{}}"#, "no string"),
            (r#"{"type":5}"#, "no string"),
            (r#"{"type":"x","data":[1]}"#, "is not an object"),
            (r#"{"type":"x","data":{"prompt_id":7}}"#, "prompt_id"),
        ] {
            let e = parse_backend_message(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}
