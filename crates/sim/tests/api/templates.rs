//! The workshop templates (crates/templates/workflows, UI format) run on the simulator once the
//! frontend's graph-to-prompt conversion has turned them into API prompts.

use crate::helpers::*;
use comfyume_sim::SimConfig;
use serde_json::{Map, Value, json};

const TEMPLATES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../templates/workflows");

fn is_widget(spec: &Value) -> bool {
    match spec.get(0) {
        Some(Value::Array(_)) => true,
        Some(Value::String(t)) => {
            matches!(t.as_str(), "INT" | "FLOAT" | "STRING" | "BOOLEAN" | "COMBO")
        }
        _ => false,
    }
}

/// Widgets followed by a "control after generate" value in `widgets_values`.
fn has_control(name: &str, spec: &Value) -> bool {
    spec[1]["control_after_generate"].as_bool().unwrap_or(false)
        || (spec[0] == "INT" && matches!(name, "seed" | "noise_seed"))
}

/// What the stock frontend's `graphToPrompt` sends for a UI-format workflow.
fn to_api(workflow: &Value, object_info: &Value) -> Value {
    let links: Map<String, Value> = workflow["links"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| (l[0].to_string(), l.clone()))
        .collect();
    let mut prompt = Map::new();
    for node in workflow["nodes"].as_array().unwrap() {
        let class = node["type"].as_str().unwrap();
        if matches!(class, "MarkdownNote" | "Note") || node["mode"] == 2 || node["mode"] == 4 {
            continue;
        }
        let info = &object_info[class];
        assert!(
            info.is_object(),
            "{class} missing from the simulator's object_info"
        );
        let mut inputs = Map::new();
        let values = node["widgets_values"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let mut vi = 0;
        for cat in ["required", "optional"] {
            for name in info["input_order"][cat].as_array().into_iter().flatten() {
                let name = name.as_str().unwrap();
                let spec = &info["input"][cat][name];
                if !is_widget(spec) {
                    continue;
                }
                if let Some(v) = values.get(vi) {
                    inputs.insert(name.to_string(), v.clone());
                }
                vi += 1 + usize::from(has_control(name, spec));
            }
        }
        for input in node["inputs"].as_array().into_iter().flatten() {
            let Some(link) = input["link"].as_u64() else {
                continue;
            };
            let l = &links[&link.to_string()];
            let name = input["widget"]["name"]
                .as_str()
                .or(input["name"].as_str())
                .unwrap();
            inputs.insert(name.to_string(), json!([l[1].to_string(), l[2]]));
        }
        prompt.insert(
            node["id"].to_string(),
            json!({"class_type": class, "inputs": inputs}),
        );
    }
    Value::Object(prompt)
}

#[tokio::test]
async fn workshop_templates_validate_and_run() {
    let t = spawn_sim(SimConfig {
        step_ms: 1,
        ..SimConfig::default()
    })
    .await;
    let object_info = t.get_json("/object_info").await;
    let mut files: Vec<_> = std::fs::read_dir(TEMPLATES)
        .unwrap_or_else(|e| panic!("cannot read {TEMPLATES}: {e}"))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    let mut ran = 0;
    for path in files {
        let workflow: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let prompt = to_api(&workflow, &object_info);
        if prompt.as_object().unwrap().is_empty() {
            continue; // notes only ("Start here")
        }
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let (status, body) = t
            .submit(&json!({"prompt": prompt, "client_id": "tpl"}))
            .await;
        assert_eq!(status, reqwest::StatusCode::OK, "{name}: {body}");
        let id = body["prompt_id"].as_str().unwrap();
        let h = t.wait_history(id).await;
        assert_eq!(
            h["status"]["status_str"], "success",
            "{name}: {}",
            h["status"]
        );
        let outputs = h["outputs"].as_object().unwrap();
        assert_eq!(outputs.len(), 1, "{name}");
        let ui = outputs.values().next().unwrap();
        let file = &ui["images"][0];
        let url = format!(
            "/view?filename={}&subfolder={}&type={}",
            file["filename"].as_str().unwrap(),
            file["subfolder"].as_str().unwrap(),
            file["type"].as_str().unwrap()
        );
        let r = t.get(&url).await;
        assert_eq!(r.status(), reqwest::StatusCode::OK, "{name}");
        let bytes = r.bytes().await.unwrap();
        if name.starts_with("LTX") {
            // SaveVideo: an H.264 MP4 in the prefix's subfolder ("video/ltx2...").
            assert_eq!(ui["animated"], json!([true]), "{name}");
            assert_eq!(file["subfolder"], "video", "{name}");
            let mp4 = Mp4::parse(&bytes);
            assert_eq!(mp4.codec, "avc1", "{name}");
            assert_eq!(mp4.samples, 97, "{name}: the template's 97 frames");
            assert_eq!(mp4.duration_ms, 3880, "{name}: 97 frames at 25 fps");
        } else {
            assert!(image::load_from_memory(&bytes).is_ok(), "{name}");
        }
        ran += 1;
    }
    assert_eq!(ran, 4, "the four generating templates");
    t.sim.shutdown().await;
}
