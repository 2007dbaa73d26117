//! `/api/jobs` and `/api/jobs/{id}`, in the shapes of the captures (api/jobs_after.json,
//! api/job_entry.json) and with ComfyUI's quirks: also under `/api/api/jobs`, 400
//! `{"error"}` for bad parameters, 404 `{"error": "Job not found"}`.

use crate::helpers::*;
use comfyume_sim::SimConfig;
use reqwest::StatusCode;
use serde_json::{Value, json};

fn capture(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(shared_file(&format!("api/{name}"))).unwrap())
        .unwrap()
}

fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
    k.sort();
    k
}

#[tokio::test]
async fn jobs_api_lists_running_pending_and_finished_jobs_as_comfyui_does() {
    let t = spawn_sim(SimConfig {
        step_ms: 100,
        ..SimConfig::default()
    })
    .await;
    // One job runs for a while (30 steps), one waits behind it.
    let long = t.queue_ok(&flux_workflow(30, 7, 64), None).await;
    t.wait_running(&long).await;
    let short = t.queue_ok(&workflow("nomodel.json"), None).await;

    let all = t.get_json("/api/jobs").await;
    let status_of = |list: &Value, id: &str| {
        list["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["id"] == id)
            .map(|j| j["status"].clone())
    };
    assert_eq!(status_of(&all, &long), Some(json!("in_progress")), "{all}");
    assert_eq!(status_of(&all, &short), Some(json!("pending")), "{all}");
    assert_eq!(all["pagination"]["total"], 2);
    let pending = t.get_json("/api/jobs?status=pending").await;
    assert_eq!(pending["jobs"].as_array().unwrap().len(), 1);
    assert_eq!(pending["jobs"][0]["id"], short.as_str());
    assert_eq!(
        t.get_json(&format!("/api/jobs/{short}")).await["status"],
        "pending"
    );

    t.wait_history(&long).await;
    t.wait_history(&short).await;
    // Newest first by default; the finished no-model job as in the capture.
    let done = t.get_json("/api/jobs").await;
    let listed = done["jobs"].as_array().unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0]["id"], short.as_str());
    let want = capture("jobs_after.json");
    assert_eq!(keys(&listed[0]), keys(&want["jobs"][0]));
    assert_eq!(listed[0]["status"], "completed");
    assert_eq!(
        listed[0]["preview_output"],
        json!({"filename": listed[0]["preview_output"]["filename"], "subfolder": "", "type": "output", "nodeId": "3", "mediaType": "images"})
    );
    assert_eq!(keys(&done["pagination"]), keys(&want["pagination"]));
    let page = t
        .get_json("/api/jobs?limit=1&offset=1&sort_order=asc")
        .await;
    assert_eq!(page["jobs"][0]["id"], short.as_str());
    assert_eq!(page["pagination"]["has_more"], false);

    let one = t.get_json(&format!("/api/jobs/{short}")).await;
    let want = capture("job_entry.json");
    assert_eq!(keys(&one), keys(&want));
    assert_eq!(one["workflow"]["prompt"], workflow("nomodel.json"));
    assert_eq!(one["execution_status"]["status_str"], "success");
    assert_eq!(one["outputs"]["3"]["images"][0]["type"], "output");

    // ComfyUI declares the routes with their prefix: they exist under /api/api too.
    assert_eq!(t.get("/api/api/jobs").await.status(), StatusCode::OK);
    assert_eq!(t.get("/jobs").await.status(), StatusCode::NOT_FOUND);
    let bad = t.get("/api/jobs?sort_order=up").await;
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        bad.json::<Value>().await.unwrap(),
        json!({"error": "sort_order must be 'asc' or 'desc'"})
    );
    let unknown = t.get("/api/jobs/no-such-job").await;
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        unknown.json::<Value>().await.unwrap(),
        json!({"error": "Job not found"})
    );
    t.sim.shutdown().await;
}
