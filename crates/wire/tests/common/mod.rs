//! Shared fixtures: the captured object_info, traces and workflows.
#![allow(dead_code)]

use std::sync::OnceLock;

use comfyume_wire::ObjectInfo;
use serde_json::Value;

pub const SHARED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/comfyui");

pub fn read(rel: &str) -> String {
    std::fs::read_to_string(format!("{SHARED}/{rel}")).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

pub fn object_info_value() -> &'static Value {
    static V: OnceLock<Value> = OnceLock::new();
    V.get_or_init(|| serde_json::from_str(&read("api/object_info.json")).expect("object_info.json"))
}

pub fn object_info() -> &'static ObjectInfo {
    static I: OnceLock<ObjectInfo> = OnceLock::new();
    I.get_or_init(|| ObjectInfo::from_value(object_info_value().clone()).expect("object"))
}

/// `traces/prompt_errors.txt`: (title, body, status) per case.
pub fn prompt_error_traces() -> Vec<(String, String, u16)> {
    let text = read("traces/prompt_errors.txt");
    let mut out = Vec::new();
    let mut title = String::new();
    let mut body = String::new();
    for line in text.lines() {
        if let Some(t) = line.strip_prefix("## ") {
            title = t.to_owned();
            body.clear();
        } else if let Some(s) = line.trim().strip_prefix("-> HTTP ") {
            out.push((
                title.clone(),
                body.trim_end().to_owned(),
                s.parse().unwrap(),
            ));
        } else {
            body.push_str(line);
            body.push('\n');
        }
    }
    out
}

pub fn trace_body(title: &str) -> Value {
    let (_, body, status) = prompt_error_traces()
        .into_iter()
        .find(|(t, _, _)| t == title)
        .unwrap_or_else(|| panic!("no trace {title}"));
    assert!(status == 400 || status == 200, "{title}: {status}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{title}: {e}"))
}

/// Asserts the ComfyUI error body shape, field by field.
pub fn assert_error_shape(body: &Value) {
    let obj = body.as_object().expect("body object");
    assert_eq!(
        obj.keys().collect::<Vec<_>>(),
        ["error", "node_errors"],
        "{body}"
    );
    assert_reason(&body["error"]);
    for (id, ne) in body["node_errors"].as_object().expect("node_errors object") {
        let ne = ne
            .as_object()
            .unwrap_or_else(|| panic!("node_errors[{id}]"));
        assert_eq!(
            ne.keys().collect::<Vec<_>>(),
            ["errors", "dependent_outputs", "class_type"],
            "{body}"
        );
        let errors = ne["errors"].as_array().expect("errors array");
        assert!(!errors.is_empty(), "{body}");
        errors.iter().for_each(assert_reason);
        let deps = ne["dependent_outputs"]
            .as_array()
            .expect("dependent_outputs");
        assert!(
            !deps.is_empty() && deps.iter().all(Value::is_string),
            "{body}"
        );
        assert!(ne["class_type"].is_string(), "{body}");
    }
}

fn assert_reason(r: &Value) {
    let r = r.as_object().unwrap_or_else(|| panic!("reason {r}"));
    assert_eq!(
        r.keys().collect::<Vec<_>>(),
        ["type", "message", "details", "extra_info"]
    );
    assert!(r["type"].is_string() && r["message"].is_string() && r["details"].is_string());
    assert!(r["extra_info"].is_object());
}

/// Serialized comparison: equal values *and* equal key order.
pub fn same_json(ours: &Value, theirs: &Value) {
    assert_eq!(
        serde_json::to_string_pretty(ours).unwrap(),
        serde_json::to_string_pretty(theirs).unwrap()
    );
}
