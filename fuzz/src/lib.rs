//! What each fuzz target checks, as plain functions: the cargo-fuzz targets in
//! `fuzz_targets/` call them, and `crates/wire/tests/fuzz_seeds.rs` runs them
//! over the seed corpus and a bounded random loop in every `cargo test`.
//! Each must never panic, whatever the bytes, and each states what must hold.

use std::sync::OnceLock;

use comfyume_wire::shapes::{BinaryFrame, client_feature_flags, wants_preview_metadata};
use comfyume_wire::{
    ObjectInfo, PromptLimits, UserFiles, check_prompt_request, parse_backend_message,
    strip_server_paths, strip_server_paths_in, validate_prompt, validate_prompt_with_files,
};
use serde_json::Value;

/// The node definitions the prompt seeds use (a subset of the captured ComfyUI 0.11.0 ones).
pub const OBJECT_INFO: &str = include_str!("../data/object_info.json");

fn info() -> &'static ObjectInfo {
    static I: OnceLock<ObjectInfo> = OnceLock::new();
    I.get_or_init(|| {
        ObjectInfo::from_value(serde_json::from_str(OBJECT_INFO).expect("object_info.json"))
            .expect("an object")
    })
}

/// `POST /prompt` bodies: the caps and the validator answer a ComfyUI-shaped 400
/// or a prompt whose outputs are nodes of the prompt.
pub fn prompt_validator(data: &[u8]) {
    let Ok(body) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let limits = PromptLimits {
        max_nodes: 64,
        max_extra_data_bytes: 4096,
    };
    if let Err(e) = check_prompt_request(&body, &limits) {
        assert_eq!(e.body()["node_errors"], serde_json::json!({}));
    }
    let files = UserFiles {
        images: vec!["a.png".into(), "sub/b.png".into()],
        all: vec!["a.png".into(), "sub/b.png".into()],
        ..Default::default()
    };
    for result in [
        validate_prompt(&body, info()),
        validate_prompt_with_files(&body, info(), &files),
    ] {
        match result {
            Ok(v) => {
                for out in &v.outputs_to_execute {
                    assert!(v.prompt.get(out).is_some(), "output {out} is a node");
                }
                let mut sorted = v.outputs_to_execute.clone();
                sorted.sort();
                assert_eq!(sorted, v.outputs_to_execute);
                let r = v.response("id", &v.priority(1));
                assert!(r["node_errors"].is_object());
            }
            Err(e) => {
                assert_eq!(e.status(), 400);
                let b = e.body();
                assert!(b["error"]["type"].is_string() && b["error"]["message"].is_string());
                assert!(b["node_errors"].is_object());
            }
        }
    }
}

/// Binary WebSocket frames: whatever decodes re-encodes to a frame that decodes
/// the same; a client's first text message is read without panicking.
pub fn ws_codec(data: &[u8]) {
    if let Ok(frame) = BinaryFrame::decode(data) {
        let again = BinaryFrame::decode(&frame.encode()).expect("an encoded frame decodes");
        assert_eq!(again, frame);
        if let Some(legacy) = frame.to_legacy() {
            let _ = BinaryFrame::decode(&legacy.encode()).expect("legacy frame decodes");
        }
    }
    if let Ok(text) = std::str::from_utf8(data)
        && let Some(flags) = client_feature_flags(text)
    {
        let _ = wants_preview_metadata(&flags);
    }
}

/// What a ComfyUI server sends on its WebSocket, and the path redaction applied
/// to job errors: never a panic; a redacted text is never longer.
pub fn backend_message(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(m) = parse_backend_message(&text) {
        if let Some(p) = m.prompt_id.clone() {
            assert!(m.concerns(&p));
        }
        if m.is_end_marker() {
            assert_eq!(m.kind, "executing");
        }
        let _ = (m.node(), m.is_backend_state());
        let mut data = Value::Object(m.data);
        strip_server_paths_in(&mut data);
    }
    let stripped = strip_server_paths(&text);
    assert!(stripped.len() <= text.len());
}
