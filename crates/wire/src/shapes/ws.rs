//! WebSocket messages (PROTOCOL.md §4): JSON text messages and binary preview frames.

use serde_json::{Map, Number, Value, json};

use crate::py::float_repr;

/// `{"type": kind, "data": data}`.
pub fn ws_message(kind: &str, data: Value) -> Value {
    json!({"type": kind, "data": data})
}

/// `status`; `sid` is only sent in the greeting right after connect.
pub fn status_message(queue_remaining: u64, sid: Option<&str>) -> Value {
    let mut data = Map::new();
    data.insert(
        "status".into(),
        json!({"exec_info": {"queue_remaining": queue_remaining}}),
    );
    if let Some(sid) = sid {
        data.insert("sid".into(), Value::String(sid.to_owned()));
    }
    ws_message("status", Value::Object(data))
}

/// The server's reply to a client's first-message `feature_flags`.
pub fn feature_flags(max_upload_size: u64) -> Value {
    ws_message(
        "feature_flags",
        json!({
            "supports_preview_metadata": true,
            "max_upload_size": max_upload_size,
            "extension": {"manager": {"supports_v4": true}},
        }),
    )
}

/// The `data` of a client text message when it is `feature_flags` (only the first message
/// of a connection counts; the caller tracks that).
pub fn client_feature_flags(text: &str) -> Option<Map<String, Value>> {
    let v: Value = serde_json::from_str(text).ok()?;
    if v.get("type")?.as_str()? != "feature_flags" {
        return None;
    }
    v.get("data")?.as_object().cloned()
}

/// Whether a client's `feature_flags` data asks for type-4 previews.
pub fn wants_preview_metadata(flags: &Map<String, Value>) -> bool {
    flags.get("supports_preview_metadata") == Some(&Value::Bool(true))
}

pub fn execution_start(prompt_id: &str, timestamp_ms: u64) -> Value {
    ws_message(
        "execution_start",
        json!({"prompt_id": prompt_id, "timestamp": timestamp_ms}),
    )
}

/// `execution_cached` with the ids of the nodes whose outputs were cached.
pub fn execution_cached(nodes: &[String], prompt_id: &str, timestamp_ms: u64) -> Value {
    ws_message(
        "execution_cached",
        json!({"nodes": nodes, "prompt_id": prompt_id, "timestamp": timestamp_ms}),
    )
}

/// `executing` for a node about to run.
pub fn executing(node: &str, display_node: &str, prompt_id: &str) -> Value {
    ws_message(
        "executing",
        json!({"node": node, "display_node": display_node, "prompt_id": prompt_id}),
    )
}

/// `executing` with `node: null`: the end-of-prompt marker (success, error or interrupt).
pub fn executing_done(prompt_id: &str) -> Value {
    ws_message("executing", json!({"node": null, "prompt_id": prompt_id}))
}

/// `progress` from a node's progress hook (samplers, SaveImageWebsocket, ...).
pub fn progress(value: u64, max: u64, prompt_id: &str, node: &str) -> Value {
    ws_message(
        "progress",
        json!({"value": value, "max": max, "prompt_id": prompt_id, "node": node}),
    )
}

/// A node's entry in `progress_state`.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeProgress {
    pub node_id: String,
    pub display_node_id: String,
    pub parent_node_id: Option<String>,
    pub real_node_id: String,
    /// Floats (`0.0`/`1.0`) during a run; ints (`1`) for fully cached reruns.
    pub value: Number,
    pub max: Number,
    pub running: bool,
}

impl NodeProgress {
    fn float(x: f64) -> Number {
        Number::from_f64(x).unwrap_or_else(|| Number::from(0))
    }
    /// A top-level node that just started: value 0.0 of 1.0.
    pub fn started(node_id: &str) -> Self {
        NodeProgress {
            node_id: node_id.into(),
            display_node_id: node_id.into(),
            parent_node_id: None,
            real_node_id: node_id.into(),
            value: Self::float(0.0),
            max: Self::float(1.0),
            running: true,
        }
    }
    /// A top-level node that finished: value 1.0 of 1.0.
    pub fn finished(node_id: &str) -> Self {
        NodeProgress {
            value: Self::float(1.0),
            running: false,
            ..Self::started(node_id)
        }
    }
}

/// `progress_state`: cumulative, covering every node that is not pending.
pub fn progress_state(prompt_id: &str, nodes: &[NodeProgress]) -> Value {
    let mut map = Map::new();
    for n in nodes {
        map.insert(
            n.node_id.clone(),
            json!({
                "value": n.value,
                "max": n.max,
                "state": if n.running { "running" } else { "finished" },
                "node_id": n.node_id,
                "prompt_id": prompt_id,
                "display_node_id": n.display_node_id,
                "parent_node_id": n.parent_node_id,
                "real_node_id": n.real_node_id,
            }),
        );
    }
    ws_message(
        "progress_state",
        json!({"prompt_id": prompt_id, "nodes": map}),
    )
}

/// `executed` with a node's ui output (`{"images": [...]}`, ...).
pub fn executed(node: &str, display_node: &str, output: &Value, prompt_id: &str) -> Value {
    ws_message(
        "executed",
        json!({"node": node, "display_node": display_node, "output": output, "prompt_id": prompt_id}),
    )
}

pub fn execution_success(prompt_id: &str, timestamp_ms: u64) -> Value {
    ws_message(
        "execution_success",
        json!({"prompt_id": prompt_id, "timestamp": timestamp_ms}),
    )
}

/// The body of an `execution_error`.
#[derive(Debug, Clone, PartialEq)]
pub struct ExecutionErrorInfo {
    pub prompt_id: String,
    pub node_id: String,
    pub node_type: String,
    pub executed: Vec<String>,
    pub exception_message: String,
    pub exception_type: String,
    pub traceback: Vec<String>,
    /// input name -> list of formatted values.
    pub current_inputs: Value,
    /// Node ids with cached outputs.
    pub current_outputs: Vec<String>,
}

pub fn execution_error(e: &ExecutionErrorInfo, timestamp_ms: u64) -> Value {
    ws_message(
        "execution_error",
        json!({
            "prompt_id": e.prompt_id,
            "node_id": e.node_id,
            "node_type": e.node_type,
            "executed": e.executed,
            "exception_message": e.exception_message,
            "exception_type": e.exception_type,
            "traceback": e.traceback,
            "current_inputs": e.current_inputs,
            "current_outputs": e.current_outputs,
            "timestamp": timestamp_ms,
        }),
    )
}

pub fn execution_interrupted(
    prompt_id: &str,
    node_id: &str,
    node_type: &str,
    executed: &[String],
    timestamp_ms: u64,
) -> Value {
    ws_message(
        "execution_interrupted",
        json!({
            "prompt_id": prompt_id,
            "node_id": node_id,
            "node_type": node_type,
            "executed": executed,
            "timestamp": timestamp_ms,
        }),
    )
}

/// Serializes like Python's `json.dumps` defaults (`", "`/`": "` separators, ASCII-only
/// escapes, Python float repr), i.e. byte-identical to what ComfyUI sends.
pub fn to_python_json(v: &Value) -> String {
    let mut out = String::new();
    write_py_json(v, &mut out);
    out
}

fn write_py_json_str(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn write_py_json(v: &Value, out: &mut String) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => out.push_str(&i.to_string()),
            (_, Some(u), _) => out.push_str(&u.to_string()),
            (_, _, Some(f)) => out.push_str(&float_repr(f)),
            _ => out.push_str("null"),
        },
        Value::String(s) => write_py_json_str(s, out),
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_py_json(x, out);
            }
            out.push(']');
        }
        Value::Object(m) => {
            out.push('{');
            for (i, (k, x)) in m.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_py_json_str(k, out);
                out.push_str(": ");
                write_py_json(x, out);
            }
            out.push('}');
        }
    }
}

/// Binary event types.
pub const PREVIEW_IMAGE: u32 = 1;
pub const TEXT: u32 = 3;
pub const PREVIEW_IMAGE_WITH_METADATA: u32 = 4;

/// Type-1 image formats.
pub const FORMAT_JPEG: u32 = 1;
pub const FORMAT_PNG: u32 = 2;

/// A binary WebSocket frame.
#[derive(Debug, Clone, PartialEq)]
pub enum BinaryFrame {
    /// Type 1: `[u32 format][image]`, for clients without `supports_preview_metadata`.
    PreviewImage { format: u32, image: Vec<u8> },
    /// Type 4: `[u32 json_len][json][image]`.
    PreviewImageWithMetadata { metadata: Value, image: Vec<u8> },
    /// Type 3: `[u32 node_id_len][node_id][text]`.
    Text { node_id: String, text: String },
    /// Any other event type, kept verbatim.
    Other { event: u32, payload: Vec<u8> },
}

/// Why a binary frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("binary frame shorter than its {0}-byte header")]
    Truncated(usize),
    #[error("length field {0} exceeds the frame")]
    BadLength(usize),
    #[error("preview metadata is not valid JSON: {0}")]
    BadMetadata(String),
    #[error("text frame is not valid UTF-8")]
    BadText,
}

fn be_u32(b: &[u8], at: usize) -> Result<u32, FrameError> {
    let bytes: [u8; 4] = b
        .get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .ok_or(FrameError::Truncated(at + 4))?;
    Ok(u32::from_be_bytes(bytes))
}

/// Type-4 metadata, in ComfyUI's key order.
pub fn preview_metadata(
    node_id: &str,
    prompt_id: &str,
    display_node_id: &str,
    parent_node_id: Option<&str>,
    real_node_id: &str,
    image_type: &str,
) -> Value {
    json!({
        "node_id": node_id,
        "prompt_id": prompt_id,
        "display_node_id": display_node_id,
        "parent_node_id": parent_node_id,
        "real_node_id": real_node_id,
        "image_type": image_type,
    })
}

fn mime_to_format(image_type: &str) -> Option<u32> {
    match image_type {
        "image/png" => Some(FORMAT_PNG),
        "image/jpeg" | "image/jpg" => Some(FORMAT_JPEG),
        _ => None,
    }
}

impl BinaryFrame {
    pub fn event_type(&self) -> u32 {
        match self {
            BinaryFrame::PreviewImage { .. } => PREVIEW_IMAGE,
            BinaryFrame::PreviewImageWithMetadata { .. } => PREVIEW_IMAGE_WITH_METADATA,
            BinaryFrame::Text { .. } => TEXT,
            BinaryFrame::Other { event, .. } => *event,
        }
    }

    /// The frame's bytes (metadata serialized as Python's `json.dumps` does).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.event_type().to_be_bytes().to_vec();
        match self {
            BinaryFrame::PreviewImage { format, image } => {
                out.extend_from_slice(&format.to_be_bytes());
                out.extend_from_slice(image);
            }
            BinaryFrame::PreviewImageWithMetadata { metadata, image } => {
                let json = to_python_json(metadata);
                out.extend_from_slice(&(json.len() as u32).to_be_bytes());
                out.extend_from_slice(json.as_bytes());
                out.extend_from_slice(image);
            }
            BinaryFrame::Text { node_id, text } => {
                out.extend_from_slice(&(node_id.len() as u32).to_be_bytes());
                out.extend_from_slice(node_id.as_bytes());
                out.extend_from_slice(text.as_bytes());
            }
            BinaryFrame::Other { payload, .. } => out.extend_from_slice(payload),
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, FrameError> {
        let event = be_u32(bytes, 0)?;
        let rest = &bytes[4..];
        match event {
            PREVIEW_IMAGE => Ok(BinaryFrame::PreviewImage {
                format: be_u32(bytes, 4)?,
                image: rest[4..].to_vec(),
            }),
            PREVIEW_IMAGE_WITH_METADATA | TEXT => {
                let len = be_u32(bytes, 4)? as usize;
                let body = &rest[4..];
                if len > body.len() {
                    return Err(FrameError::BadLength(len));
                }
                let (head, tail) = body.split_at(len);
                if event == TEXT {
                    let node_id = std::str::from_utf8(head).map_err(|_| FrameError::BadText)?;
                    let text = std::str::from_utf8(tail).map_err(|_| FrameError::BadText)?;
                    Ok(BinaryFrame::Text {
                        node_id: node_id.to_owned(),
                        text: text.to_owned(),
                    })
                } else {
                    let metadata = serde_json::from_slice(head)
                        .map_err(|e| FrameError::BadMetadata(e.to_string()))?;
                    Ok(BinaryFrame::PreviewImageWithMetadata {
                        metadata,
                        image: tail.to_vec(),
                    })
                }
            }
            event => Ok(BinaryFrame::Other {
                event,
                payload: rest.to_vec(),
            }),
        }
    }

    /// The type-1 equivalent of a type-4 preview, for a client that did not announce
    /// `supports_preview_metadata`; `None` for an image type type 1 cannot carry.
    /// Other frames are returned unchanged.
    pub fn to_legacy(&self) -> Option<BinaryFrame> {
        match self {
            BinaryFrame::PreviewImageWithMetadata { metadata, image } => {
                let mime = metadata
                    .get("image_type")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                Some(BinaryFrame::PreviewImage {
                    format: mime_to_format(mime)?,
                    image: image.clone(),
                })
            }
            other => Some(other.clone()),
        }
    }
}

/// Type 1 frame bytes.
pub fn preview_image_frame(format: u32, image: &[u8]) -> Vec<u8> {
    BinaryFrame::PreviewImage {
        format,
        image: image.to_vec(),
    }
    .encode()
}

/// Type 4 frame bytes.
pub fn preview_image_with_metadata_frame(metadata: &Value, image: &[u8]) -> Vec<u8> {
    BinaryFrame::PreviewImageWithMetadata {
        metadata: metadata.clone(),
        image: image.to_vec(),
    }
    .encode()
}

/// Type 3 frame bytes (progress text of a node).
pub fn text_frame(node_id: &str, text: &str) -> Vec<u8> {
    BinaryFrame::Text {
        node_id: node_id.to_owned(),
        text: text.to_owned(),
    }
    .encode()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each trace line: "<ms> <json>".
    fn trace(name: &str) -> Vec<Value> {
        let path = format!(
            "{}/../../tests/fixtures/comfyui/traces/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(_, j)| serde_json::from_str(j).unwrap())
            .collect()
    }

    fn same(ours: &Value, theirs: &Value) {
        assert_eq!(to_python_json(ours), to_python_json(theirs));
    }

    #[test]
    fn owner_trace_is_reproduced_message_by_message() {
        let t = trace("ws_owner.txt");
        let pid = "8a9f5b71-56ae-4628-811e-9d49ad018114";
        same(&status_message(0, Some("ownerA")), &t[0]);
        same(&status_message(1, None), &t[1]);
        same(&execution_start(pid, 1795781176156), &t[3]);
        same(&execution_cached(&[], pid, 1795781176157), &t[4]);
        same(&progress_state(pid, &[NodeProgress::started("1")]), &t[5]);
        same(&executing("1", "1", pid), &t[6]);
        same(
            &progress_state(
                pid,
                &[NodeProgress::finished("1"), NodeProgress::started("2")],
            ),
            &t[8],
        );
        let output = json!({"images": [{"filename": "nomodel_00010_.png", "subfolder": "", "type": "output"}]});
        same(&executed("3", "3", &output, pid), &t[13]);
        same(&execution_success(pid, 1795781176162), &t[15]);
        same(&executing_done(pid), &t[17]);
    }

    #[test]
    fn interrupt_trace_is_reproduced() {
        let t = trace("ws_queue_interrupt.txt");
        let pid = "f210ca92-133c-421f-9f8d-f1a9f293b4f4";
        let msg = t
            .iter()
            .find(|m| m["type"] == "execution_interrupted")
            .unwrap();
        same(
            &execution_interrupted(
                pid,
                "3",
                "ImageInvert",
                &["2".into(), "1".into()],
                1795780902092,
            ),
            msg,
        );
    }

    #[test]
    fn python_json_text_matches_comfyui_bytes() {
        let line = std::fs::read_to_string(format!(
            "{}/../../tests/fixtures/comfyui/traces/ws_owner.txt",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        let first = line.lines().next().unwrap().split_once(' ').unwrap().1;
        assert_eq!(to_python_json(&status_message(0, Some("ownerA"))), first);
        assert_eq!(
            to_python_json(&json!({"a": [1.0, 1e16, "é\n"]})),
            r#"{"a": [1.0, 1e+16, "\u00e9\n"]}"#
        );
    }

    #[test]
    fn binary_frames_round_trip() {
        let png = [0x89, b'P', b'N', b'G'];
        let t1 = preview_image_frame(FORMAT_PNG, &png);
        assert_eq!(&t1[..8], &[0, 0, 0, 1, 0, 0, 0, 2]);
        assert_eq!(&t1[8..], &png);
        let meta = preview_metadata("4", "p", "4", None, "4", "image/png");
        let t4 = preview_image_with_metadata_frame(&meta, &png);
        let json = r#"{"node_id": "4", "prompt_id": "p", "display_node_id": "4", "parent_node_id": null, "real_node_id": "4", "image_type": "image/png"}"#;
        assert_eq!(&t4[..4], &[0, 0, 0, 4]);
        assert_eq!(
            u32::from_be_bytes(t4[4..8].try_into().unwrap()) as usize,
            json.len()
        );
        assert_eq!(&t4[8..8 + json.len()], json.as_bytes());
        let decoded = BinaryFrame::decode(&t4).unwrap();
        assert_eq!(decoded.to_legacy().unwrap().encode(), t1);
        let t3 = text_frame("2", "width: 32, height: 16\n batch size: 2");
        assert_eq!(&t3[..9], &[0, 0, 0, 3, 0, 0, 0, 1, b'2']);
        assert_eq!(
            BinaryFrame::decode(&t3).unwrap(),
            BinaryFrame::Text {
                node_id: "2".into(),
                text: "width: 32, height: 16\n batch size: 2".into()
            }
        );
        assert_eq!(
            BinaryFrame::decode(&[0, 0, 0, 4, 0, 0, 0, 9, 1]),
            Err(FrameError::BadLength(9))
        );
        assert_eq!(BinaryFrame::decode(&[0, 0]), Err(FrameError::Truncated(4)));
        let webp = BinaryFrame::PreviewImageWithMetadata {
            metadata: preview_metadata("1", "p", "1", None, "1", "image/webp"),
            image: vec![],
        };
        assert_eq!(webp.to_legacy(), None);
    }

    #[test]
    fn feature_flags_messages() {
        let reply = feature_flags(104857600);
        assert_eq!(
            serde_json::to_string(&reply).unwrap(),
            r#"{"type":"feature_flags","data":{"supports_preview_metadata":true,"max_upload_size":104857600,"extension":{"manager":{"supports_v4":true}}}}"#
        );
        let flags = client_feature_flags(
            r#"{"type":"feature_flags","data":{"supports_preview_metadata":true,"supports_manager_v4_ui":true}}"#,
        )
        .unwrap();
        assert!(wants_preview_metadata(&flags));
        assert!(client_feature_flags(r#"{"type":"other","data":{}}"#).is_none());
        assert!(client_feature_flags("not json").is_none());
    }
}
