//! `extra_data` keys ComfyUI keeps out of `/queue`, `/history` and `/api/jobs`.

use serde_json::{Map, Value};

/// ComfyUI's `SENSITIVE_EXTRA_DATA_KEYS`: moved into a hidden 6th queue-tuple slot.
pub const SENSITIVE_EXTRA_DATA_KEYS: [&str; 2] = ["auth_token_comfy_org", "api_key_comfy_org"];

/// Removes the sensitive keys from `extra` (an `extra_data` object) and returns them.
/// A non-object `extra` is left alone and yields an empty map.
pub fn split_sensitive(extra: &mut Value) -> Map<String, Value> {
    let mut out = Map::new();
    if let Value::Object(m) = extra {
        for key in SENSITIVE_EXTRA_DATA_KEYS {
            if let Some(v) = m.shift_remove(key) {
                out.insert(key.to_owned(), v);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn splits_only_the_sensitive_keys_and_keeps_order() {
        let mut extra = json!({
            "auth_token_comfy_org": "tok",
            "extra_pnginfo": {"workflow": {}},
            "api_key_comfy_org": "key",
            "client_id": "c"
        });
        let hidden = split_sensitive(&mut extra);
        assert_eq!(
            serde_json::to_string(&extra).unwrap(),
            r#"{"extra_pnginfo":{"workflow":{}},"client_id":"c"}"#
        );
        assert_eq!(
            Value::Object(hidden),
            json!({"auth_token_comfy_org": "tok", "api_key_comfy_org": "key"})
        );
        let mut not_obj = json!([1]);
        assert!(split_sensitive(&mut not_obj).is_empty());
        assert_eq!(not_obj, json!([1]));
    }
}
