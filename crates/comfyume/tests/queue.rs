//! The Run button and the participant's queue views (issue 3): `POST /prompt`
//! validated against the real node definitions exactly as ComfyUI answers
//! (traces/prompt_errors.txt), durable submission, per-participant caps, and
//! `/queue`, `/prompt`, `/history`, `/api/jobs` showing only the caller's jobs.

use crate::helpers;

use std::collections::HashMap;

use helpers::{
    AppOptions, assert_silent, messages_until, next_json, png, shared, sim_backend_slots,
    spawn_app, spawn_full, workflow,
};
use serde_json::{Value, json};

const U1: &str = "user001";
const U2: &str = "user002";

/// The captured error bodies of traces/prompt_errors.txt, by section title.
fn captured_errors() -> HashMap<String, Value> {
    let text = std::fs::read_to_string(shared("traces/prompt_errors.txt")).unwrap();
    let mut out = HashMap::new();
    let mut title = None;
    for line in text.lines() {
        if let Some(t) = line.strip_prefix("## ") {
            title = Some(t.trim().to_string());
        } else if line.starts_with('{')
            && let Some(t) = title.take()
        {
            out.insert(t, serde_json::from_str(line).unwrap());
        }
    }
    out
}

fn empty_image(width: Value) -> Value {
    json!({"class_type": "EmptyImage", "inputs": {"width": width, "height": 64, "batch_size": 1, "color": 0}})
}

fn save(from: &str) -> Value {
    json!({"class_type": "SaveImage", "inputs": {"images": [from, 0], "filename_prefix": "t"}})
}

/// A small valid prompt; `color` varies it.
fn small(color: u32) -> Value {
    let mut p = workflow("nomodel.json");
    p["1"]["inputs"]["color"] = json!(color);
    p
}

#[tokio::test]
async fn every_captured_validation_error_comes_back_field_by_field() {
    let app = spawn_app().await;
    let want = captured_errors();
    let cases: Vec<(&str, Value)> = vec![
        (
            "unknown class_type",
            json!({"prompt": {"1": {"class_type": "NoSuchNode", "inputs": {}}}}),
        ),
        (
            "missing class_type",
            json!({"prompt": {"1": {"inputs": {}}}}),
        ),
        (
            "no outputs",
            json!({"prompt": {"1": empty_image(json!(64))}}),
        ),
        ("no prompt key", json!({"client_id": "tab"})),
        (
            "missing required input + out of range",
            json!({"prompt": {
                "1": {"class_type": "EmptyImage", "inputs": {"width": 0, "height": 64, "batch_size": 1}},
                "2": save("1")}}),
        ),
        (
            "value not in list",
            json!({"prompt": {
                "1": empty_image(json!(64)),
                "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "bogus",
                      "width": 32, "height": 32, "crop": "disabled"}},
                "3": save("2")}}),
        ),
        (
            "invalid input type",
            json!({"prompt": {"1": empty_image(json!("abc")), "2": save("1")}}),
        ),
        (
            "bad link",
            json!({"prompt": {"1": empty_image(json!(64)),
                   "2": {"class_type": "SaveImage", "inputs": {"images": ["1"], "filename_prefix": "t"}}}}),
        ),
        (
            "return type mismatch",
            json!({"prompt": {
                "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
                "2": save("1")}}),
        ),
        (
            "LoadImage nonexistent",
            json!({"prompt": {"1": {"class_type": "LoadImage", "inputs": {"image": "nope.png"}}, "2": save("1")}}),
        ),
    ];
    for (name, body) in cases {
        let expected = want
            .get(name)
            .unwrap_or_else(|| panic!("no capture named {name:?}"));
        let r = app.post_json(U1, "/api/prompt", &body).await;
        assert_eq!(r.status, 400, "{name}: {}", r.text());
        assert_eq!(&r.json(), expected, "{name}: the body ComfyUI answered");
    }
    // Nothing of that reached the queue.
    assert_eq!(
        app.get(U1, "/api/prompt").await.json(),
        json!({"exec_info": {"queue_remaining": 0}})
    );
}

#[tokio::test]
async fn a_body_that_is_not_json_gets_a_clear_400() {
    let app = spawn_app().await;
    for body in [&b"{\"prompt\": "[..], b"not json at all", b""] {
        let r = app.post(U1, "/api/prompt", body.to_vec()).await;
        assert_eq!(
            r.status,
            400,
            "{:?}: {}",
            String::from_utf8_lossy(body),
            r.text()
        );
        let v = r.json();
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains("JSON"),
            "the message says what is wrong: {msg}"
        );
        assert!(
            v["error"]["type"].is_string() && v["node_errors"] == json!({}),
            "{v}"
        );
    }
}

#[tokio::test]
async fn loadimage_sees_only_the_participants_own_uploads() {
    let app = spawn_app().await;
    let load = |name: &str| json!({"prompt": {"1": {"class_type": "LoadImage", "inputs": {"image": name}}, "2": save("1")}});
    // user002 has a cat.png; user001 has none yet.
    let r = app
        .upload(
            U2,
            "/api/upload/image",
            "cat.png",
            png(4, 4, [9, 9, 9, 255]),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = app.post_json(U1, "/api/prompt", &load("cat.png")).await;
    assert_eq!(
        r.status,
        400,
        "another participant's file must not validate: {}",
        r.text()
    );
    let v = r.json();
    assert_eq!(
        v["node_errors"]["1"]["errors"][0]["type"],
        "custom_validation_failed"
    );
    assert_eq!(
        v["node_errors"]["1"]["errors"][0]["details"],
        "image - Invalid image file: cat.png"
    );
    // Their own upload of the same name makes it valid.
    let r = app
        .upload(
            U1,
            "/api/upload/image",
            "cat.png",
            png(4, 4, [1, 2, 3, 255]),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["name"], "cat.png");
    let r = app.post_json(U1, "/api/prompt", &load("cat.png")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    // And user002's own still works for user002.
    let r = app.post_json(U2, "/api/prompt", &load("cat.png")).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

#[tokio::test]
async fn submission_answers_like_comfyui() {
    let app = spawn_app().await;
    let r = app.queue_prompt(U1, "tab", &small(1)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["prompt_id", "number", "node_errors"], "{v}");
    assert_eq!(v["node_errors"], json!({}));
    let first = v["number"]
        .as_i64()
        .expect("an integer number from the counter");
    let id = v["prompt_id"].as_str().unwrap();
    assert_eq!(id.len(), 36, "a uuid4: {id}");

    // The counter moves on every submission without a number, rejected ones included.
    let r = app
        .post_json(
            U1,
            "/api/prompt",
            &json!({"prompt": {"1": {"class_type": "NoSuchNode", "inputs": {}}}}),
        )
        .await;
    assert_eq!(r.status, 400);
    let r = app.queue_prompt(U1, "tab", &small(2)).await;
    assert_eq!(
        r.json()["number"],
        first + 2,
        "the rejected prompt took a number too"
    );
    // Another participant shares ComfyUI's counter.
    let r = app.queue_prompt(U2, "tab", &small(3)).await;
    assert_eq!(r.json()["number"], first + 3);

    // A client-chosen id and number are echoed as given.
    let body = json!({"prompt": small(4), "prompt_id": "0f8fad5b-d9cb-469f-a165-70867728950e", "number": 7.5, "client_id": "tab"});
    let r = app.post_json(U1, "/api/prompt", &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json(),
        json!({"prompt_id": "0f8fad5b-d9cb-469f-a165-70867728950e", "number": 7.5, "node_errors": {}})
    );
    // The same id again is refused (unique per participant; ComfyUI would run it twice).
    let r = app.post_json(U1, "/api/prompt", &body).await;
    assert_eq!(r.status, 400, "{}", r.text());
    let v = r.json();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("already exists"),
        "{v}"
    );
    assert_eq!(v["node_errors"], json!({}));
    // Another participant may choose it too: accepted, and told nothing of the first.
    let r = app.post_json(U2, "/api/prompt", &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json()["prompt_id"],
        "0f8fad5b-d9cb-469f-a165-70867728950e"
    );
    // `front` without a number: the counter, negated.
    let r = app
        .post_json(
            U1,
            "/api/prompt",
            &json!({"prompt": small(5), "front": true}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["number"], -(first + 4));

    // Each pending item carries its number (ComfyUI lists them in heap order).
    let q = app.get(U1, "/api/queue").await.json();
    let mut numbers: Vec<f64> = q["queue_pending"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i[0].as_f64().unwrap())
        .collect();
    numbers.sort_by(f64::total_cmp);
    assert_eq!(
        numbers,
        [-(first + 4) as f64, first as f64, (first + 2) as f64, 7.5],
        "{q}"
    );
}

#[tokio::test]
async fn comfy_org_credentials_are_never_shown_nor_stored() {
    let (sim, backend) = sim_backend_slots("gpu-a", 20, 1).await;
    let app = spawn_full(AppOptions {
        backends: vec![backend],
        ..Default::default()
    })
    .await;
    const TOKEN: &str = "SECRET-TOKEN-1f2e3d";
    const KEY: &str = "SECRET-KEY-9a8b7c";
    let mut prompt = workflow("slow_blur.json");
    prompt["1"]["inputs"]["width"] = json!(64);
    prompt["1"]["inputs"]["height"] = json!(64);
    prompt["2"]["inputs"]["blur_radius"] = json!(20);
    let body = json!({
        "client_id": "tab",
        "prompt": prompt,
        "extra_data": {"auth_token_comfy_org": TOKEN, "api_key_comfy_org": KEY,
                       "extra_pnginfo": {"workflow": {"nodes": []}}},
    });
    let mut ws = app.ws(U1, "/ws?clientId=tab").await;
    let r = app.post_json(U1, "/api/prompt", &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let id = r.json()["prompt_id"].as_str().unwrap().to_string();
    // Hold the job on the simulated GPU while we look (nothing of ours calls
    // the simulator while a job runs, so the hang only stops the job).
    messages_until(&mut ws, 10, |v| {
        v["type"] == "executing" && v["data"]["node"] == "2"
    })
    .await;
    sim.set_fault(comfyume_sim::Fault::Hang { for_ms: None });
    let leaks = |what: &str, text: &str| {
        assert!(
            !text.contains(TOKEN) && !text.contains(KEY),
            "{what} shows a credential: {text}"
        );
    };

    let q = app.get(U1, "/api/queue").await;
    leaks("/api/queue", &q.text());
    let q = q.json();
    let item = q["queue_running"]
        .as_array()
        .unwrap()
        .iter()
        .chain(q["queue_pending"].as_array().unwrap())
        .find(|i| i[1] == id.as_str())
        .unwrap_or_else(|| panic!("the job is in the queue: {q}"))
        .clone();
    assert_eq!(
        item[3]["extra_pnginfo"],
        json!({"workflow": {"nodes": []}}),
        "the rest of extra_data is kept"
    );
    assert_eq!(item[3]["client_id"], "tab");
    leaks(
        "/api/jobs/{id} (running)",
        &app.get(U1, &format!("/api/jobs/{id}")).await.text(),
    );
    sim.clear_faults();

    app.wait_job(U1, &id, &["completed"], 20).await;
    for path in [
        "/api/history".to_string(),
        format!("/api/history/{id}"),
        format!("/api/jobs/{id}"),
        "/api/jobs".into(),
        "/api/queue".into(),
    ] {
        let r = app.get(U1, &path).await;
        assert_eq!(r.status, 200, "{path}");
        leaks(&path, &r.text());
    }
    let h = app.get(U1, &format!("/api/history/{id}")).await.json();
    assert_eq!(
        h[&id]["prompt"][3]["extra_pnginfo"],
        json!({"workflow": {"nodes": []}})
    );

    // Nowhere on disk either: the database (and its journal) and every file written.
    fn scan(dir: &std::path::Path, hits: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                scan(&p, hits);
            } else if let Ok(bytes) = std::fs::read(&p) {
                for secret in [TOKEN, KEY] {
                    if bytes.windows(secret.len()).any(|w| w == secret.as_bytes()) {
                        hits.push(p.display().to_string());
                    }
                }
            }
        }
    }
    let mut hits = Vec::new();
    scan(&app.data_dir, &mut hits);
    assert!(
        std::fs::read_dir(&app.data_dir)
            .unwrap()
            .flatten()
            .any(|e| e.file_name() == "comfyume.db")
    );
    assert!(hits.is_empty(), "credentials written to {hits:?}");
    sim.shutdown().await;
}

#[tokio::test]
async fn per_participant_and_workshop_caps_answer_with_a_reason() {
    let mut queue = helpers::queue_cfg();
    queue.max_queued_per_user = 2;
    queue.max_queue_depth = 3;
    let app = spawn_full(AppOptions {
        queue,
        ..Default::default()
    })
    .await;
    let a = app.submit(U1, "tab", &small(1)).await;
    app.submit(U1, "tab", &small(2)).await;
    let r = app.queue_prompt(U1, "tab", &small(3)).await;
    assert_eq!(r.status, 400, "{}", r.text());
    let v = r.json();
    assert_eq!(v["node_errors"], json!({}), "{v}");
    assert_eq!(v["error"]["extra_info"], json!({}), "{v}");
    assert!(
        v["error"]["type"].is_string() && v["error"]["details"].is_string(),
        "{v}"
    );
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains('2') && msg.contains("waiting"),
        "says why: {msg}"
    );

    // The workshop is full at 3 waiting jobs, whoever asks.
    app.submit(U2, "tab", &small(4)).await;
    let r = app.queue_prompt(U2, "tab", &small(5)).await;
    assert_eq!(r.status, 400, "{}", r.text());
    let v = r.json();
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("full") && msg.contains('3'), "says why: {msg}");
    assert_eq!(v["node_errors"], json!({}));

    // Refused jobs were not queued; a freed place can be used again.
    assert_eq!(
        app.get(U1, "/api/prompt").await.json()["exec_info"]["queue_remaining"],
        2
    );
    assert_eq!(
        app.get(U2, "/api/prompt").await.json()["exec_info"]["queue_remaining"],
        1
    );
    let r = app
        .post_json(U1, "/api/queue", &json!({"delete": [a]}))
        .await;
    assert_eq!(r.status, 200);
    app.submit(U1, "tab", &small(6)).await;
}

async fn status_of(ws: &mut helpers::Ws) -> u64 {
    let v = next_json(ws).await;
    assert_eq!(v["type"], "status", "{v}");
    v["data"]["status"]["exec_info"]["queue_remaining"]
        .as_u64()
        .unwrap()
}

#[tokio::test]
async fn queue_views_and_edits_touch_only_the_callers_jobs() {
    let app = spawn_app().await;
    let mut tab1 = app.ws(U1, "/ws?clientId=tab1").await;
    let mut tab2 = app.ws(U1, "/api/ws?clientId=tab2").await;
    let mut other = app.ws(U2, "/ws?clientId=tab1").await;
    for (ws, sid) in [
        (&mut tab1, "tab1"),
        (&mut tab2, "tab2"),
        (&mut other, "tab1"),
    ] {
        let v = next_json(ws).await;
        assert_eq!(
            v,
            json!({"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": sid}})
        );
    }
    let prompts: Vec<Value> = (0..3).map(small).collect();
    let mut ids = Vec::new();
    for (n, p) in prompts.iter().enumerate() {
        ids.push(app.submit(U1, "tab1", p).await);
        // Every open tab of the participant hears the new count.
        assert_eq!(status_of(&mut tab1).await, n as u64 + 1);
        assert_eq!(status_of(&mut tab2).await, n as u64 + 1);
    }
    let theirs = app.submit(U2, "tab1", &small(9)).await;
    assert_eq!(status_of(&mut other).await, 1);

    // GET /queue: own pending items as ComfyUI's 5-tuples.
    let q = app.get(U1, "/api/queue").await.json();
    assert_eq!(q["queue_running"], json!([]));
    let pending = q["queue_pending"].as_array().unwrap();
    assert_eq!(pending.len(), 3, "{q}");
    for ((item, id), prompt) in pending.iter().zip(&ids).zip(&prompts) {
        let t = item.as_array().unwrap();
        assert_eq!(
            t.len(),
            5,
            "[number, prompt_id, prompt, extra_data, outputs_to_execute]: {item}"
        );
        assert!(t[0].is_number());
        assert_eq!(&t[1], id);
        assert_eq!(&t[2], prompt);
        assert_eq!(t[3]["client_id"], "tab1");
        assert!(
            t[3]["create_time"].is_u64(),
            "create_time is stamped: {item}"
        );
        assert_eq!(t[4], json!(["3"]));
    }
    let q2 = app.get(U2, "/queue").await.json();
    assert_eq!(q2["queue_pending"].as_array().unwrap().len(), 1);
    assert_eq!(q2["queue_pending"][0][1], theirs.as_str());
    assert_eq!(
        app.get(U1, "/api/prompt").await.json(),
        json!({"exec_info": {"queue_remaining": 3}})
    );
    assert_eq!(
        app.get(U2, "/prompt").await.json(),
        json!({"exec_info": {"queue_remaining": 1}})
    );

    // user002 cannot delete or clear user001's jobs.
    let r = app
        .post_json(U2, "/api/queue", &json!({"delete": [ids[0]]}))
        .await;
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty(), "ComfyUI answers an empty 200");
    let r = app
        .post_json(U2, "/api/queue", &json!({"clear": true}))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(status_of(&mut other).await, 0);
    assert_eq!(
        app.get(U1, "/api/prompt").await.json()["exec_info"]["queue_remaining"],
        3
    );
    assert_eq!(
        app.get(U2, "/api/queue").await.json()["queue_pending"],
        json!([])
    );
    assert_eq!(
        app.get(U2, &format!("/api/jobs/{theirs}")).await.status,
        404,
        "a cleared job is gone"
    );

    // The owner's own delete and clear work, and both tabs follow.
    let r = app
        .post_json(U1, "/api/queue", &json!({"delete": [ids[1]]}))
        .await;
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());
    assert_eq!(status_of(&mut tab1).await, 2);
    assert_eq!(status_of(&mut tab2).await, 2);
    let left: Vec<Value> = app.get(U1, "/api/queue").await.json()["queue_pending"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i[1].clone())
        .collect();
    assert_eq!(left, [json!(ids[0]), json!(ids[2])]);
    let r = app.post_json(U1, "/queue", &json!({"clear": true})).await;
    assert_eq!(r.status, 200);
    assert_eq!(status_of(&mut tab1).await, 0);
    assert_eq!(status_of(&mut tab2).await, 0);
    assert_eq!(
        app.get(U1, "/api/queue").await.json(),
        json!({"queue_running": [], "queue_pending": []})
    );

    // Nobody heard anything about anyone else.
    assert_silent(&mut other, 200).await;
    assert_silent(&mut tab1, 50).await;
    assert_silent(&mut tab2, 50).await;
}

#[tokio::test]
async fn history_and_jobs_page_and_filter_the_callers_own_jobs() {
    let (sim, backend) = sim_backend_slots("gpu-a", 10, 1).await;
    let app = spawn_full(AppOptions {
        backends: vec![backend],
        ..Default::default()
    })
    .await;
    let mut done = Vec::new();
    for n in 0..5 {
        let id = app.submit(U1, "tab", &small(n)).await;
        app.wait_job(U1, &id, &["completed"], 20).await;
        done.push(id);
    }
    let theirs = app.submit(U2, "tab", &small(77)).await;
    app.wait_job(U2, &theirs, &["completed"], 20).await;

    let keys = |v: Value| -> Vec<String> { v.as_object().unwrap().keys().cloned().collect() };
    let h = app.get(U1, "/api/history").await.json();
    assert_eq!(keys(h.clone()), done, "own history, oldest first");
    let one = &h[&done[0]];
    assert_eq!(one["status"]["status_str"], "success");
    assert_eq!(one["status"]["completed"], true);
    assert_eq!(one["prompt"][1], done[0].as_str());
    assert_eq!(
        keys(app.get(U1, "/api/history?max_items=2").await.json()),
        done[3..5],
        "the last N"
    );
    assert_eq!(
        keys(app.get(U1, "/history?max_items=2&offset=1").await.json()),
        done[1..3]
    );
    assert_eq!(
        keys(app.get(U1, "/api/history?offset=3").await.json()),
        done[3..5]
    );
    assert_eq!(
        app.get(U1, "/api/history?offset=10").await.json(),
        json!({})
    );
    assert_eq!(
        keys(app.get(U2, "/api/history").await.json()),
        std::slice::from_ref(&theirs)
    );

    let r = app.get(U1, &format!("/api/history/{}", done[2])).await;
    assert_eq!(keys(r.json()), [done[2].clone()]);
    for (user, id) in [
        (U1, "no-such-id"),
        (U2, done[2].as_str()),
        (U1, theirs.as_str()),
    ] {
        let r = app.get(user, &format!("/api/history/{id}")).await;
        assert_eq!(r.status, 200, "{user} {id}");
        assert_eq!(
            r.json(),
            json!({}),
            "{user} asking for {id}: ComfyUI's answer to an unknown id"
        );
    }

    // One job running (slow) and one waiting behind it.
    let mut slow = workflow("slow_blur.json");
    slow["1"]["inputs"]["width"] = json!(64);
    slow["1"]["inputs"]["height"] = json!(64);
    slow["2"]["inputs"]["blur_radius"] = json!(31);
    let mut ws = app.ws(U1, "/ws?clientId=tab").await;
    let running = app.submit(U1, "tab", &slow).await;
    messages_until(&mut ws, 10, |v| {
        v["type"] == "executing" && v["data"]["node"] == "2"
    })
    .await;
    // Hold the simulated GPU still while we look (nothing of ours calls it meanwhile).
    sim.set_fault(comfyume_sim::Fault::Hang { for_ms: None });
    let waiting = app.submit(U1, "tab", &small(99)).await;

    let jobs = |q: &str| {
        let app = &app;
        let q = q.to_string();
        async move {
            let r = app.get(U1, &format!("/api/jobs{q}")).await;
            assert_eq!(r.status, 200, "{q}: {}", r.text());
            r.json()
        }
    };
    let ids = |v: &Value| -> Vec<String> {
        v["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["id"].as_str().unwrap().to_string())
            .collect()
    };
    let all = jobs("").await;
    let mut newest_first: Vec<String> = done.iter().rev().cloned().collect();
    newest_first.insert(0, running.clone());
    newest_first.insert(0, waiting.clone());
    assert_eq!(
        ids(&all),
        newest_first,
        "created_at, newest first by default; only own jobs"
    );
    assert_eq!(
        all["pagination"],
        json!({"offset": 0, "limit": null, "total": 7, "has_more": false})
    );
    assert_eq!(
        ids(&jobs("?status=pending").await),
        std::slice::from_ref(&waiting)
    );
    assert_eq!(
        ids(&jobs("?status=in_progress").await),
        std::slice::from_ref(&running)
    );
    assert_eq!(jobs("?status=completed").await["pagination"]["total"], 5);
    assert_eq!(
        ids(&jobs("?status=pending,in_progress").await),
        [waiting.clone(), running.clone()]
    );
    assert_eq!(
        ids(&jobs("?status=failed,cancelled").await),
        Vec::<String>::new()
    );
    let page = jobs("?status=completed&sort_order=asc&limit=2&offset=1").await;
    assert_eq!(ids(&page), done[1..3]);
    assert_eq!(
        page["pagination"],
        json!({"offset": 1, "limit": 2, "total": 5, "has_more": true})
    );
    let by_duration = jobs("?status=completed&sort_by=execution_duration").await;
    assert_eq!(ids(&by_duration).len(), 5);
    for j in all["jobs"].as_array().unwrap() {
        let s = j["status"].as_str().unwrap();
        let want = if j["id"] == waiting.as_str() {
            "pending"
        } else if j["id"] == running.as_str() {
            "in_progress"
        } else {
            "completed"
        };
        assert_eq!(s, want, "{j}");
    }

    for (q, msg) in [
        (
            "status=bogus",
            "Invalid status value(s): bogus. Valid values: pending, in_progress, completed, failed, cancelled",
        ),
        (
            "sort_by=name",
            "sort_by must be 'created_at' or 'execution_duration'",
        ),
        ("sort_order=up", "sort_order must be 'asc' or 'desc'"),
        ("limit=0", "limit must be a positive integer"),
        ("limit=abc", "limit must be an integer"),
        ("offset=x", "offset must be an integer"),
    ] {
        let r = app.get(U1, &format!("/api/jobs?{q}")).await;
        assert_eq!(r.status, 400, "{q}");
        assert_eq!(r.json(), json!({"error": msg}), "{q}");
    }

    let detail = app.get(U1, &format!("/api/jobs/{}", done[0])).await.json();
    assert_eq!(detail["id"], done[0].as_str());
    assert_eq!(detail["status"], "completed");
    assert!(detail["workflow"]["prompt"].is_object(), "{detail}");
    for (user, id) in [
        (U2, done[0].as_str()),
        (U2, running.as_str()),
        (U1, "no-such-id"),
        (U1, theirs.as_str()),
    ] {
        let r = app.get(user, &format!("/api/jobs/{id}")).await;
        assert_eq!(r.status, 404, "{user} {id}");
        assert_eq!(r.json(), json!({"error": "Job not found"}));
    }
    sim.clear_faults();
    app.wait_job(U1, &waiting, &["completed"], 20).await;
    assert_eq!(app.job_status(U1, &running).await, "completed");
    sim.shutdown().await;
}

#[tokio::test]
async fn queued_jobs_survive_a_restart_in_order_exactly_once() {
    let app = spawn_app().await;
    // Rejected prompts move ComfyUI's counter too.
    for _ in 0..3 {
        let r = app
            .queue_prompt(
                U1,
                "tab",
                &json!({"1": {"class_type": "NoSuchNode", "inputs": {}}}),
            )
            .await;
        assert_eq!(r.status, 400);
    }
    let mut ids = Vec::new();
    for n in 0..4 {
        ids.push(app.submit(U1, "tab", &small(n)).await);
    }
    let theirs = app.submit(U2, "tab", &small(50)).await;
    let before = app.get(U1, "/api/queue").await.json();
    let numbers = |q: &Value| -> Vec<f64> {
        q["queue_pending"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i[0].as_f64().unwrap())
            .collect()
    };
    let highest = numbers(&before).into_iter().fold(f64::MIN, f64::max);
    let dir = app.stop();

    let app = spawn_full(AppOptions {
        reuse: Some(dir),
        ..Default::default()
    })
    .await;
    let after = app.get(U1, "/api/queue").await.json();
    assert_eq!(after, before, "the same items, same order, same contents");
    let listed: Vec<&str> = after["queue_pending"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i[1].as_str().unwrap())
        .collect();
    assert_eq!(listed, ids.iter().map(String::as_str).collect::<Vec<_>>());
    for id in &ids {
        assert_eq!(app.job_status(U1, id).await, "pending");
    }
    assert_eq!(
        app.get(U1, "/api/prompt").await.json()["exec_info"]["queue_remaining"],
        4
    );
    assert_eq!(
        app.get(U1, "/api/jobs").await.json()["pagination"]["total"],
        4
    );
    let q2 = app.get(U2, "/api/queue").await.json();
    assert_eq!(q2["queue_pending"].as_array().unwrap().len(), 1);
    assert_eq!(q2["queue_pending"][0][1], theirs.as_str());
    // The restarted queue keeps taking jobs, behind the waiting ones (a
    // participant's jobs run in `number` order), and `front` still goes first.
    let r = app.queue_prompt(U1, "tab", &small(9)).await;
    let next = r.json();
    assert!(!ids.contains(&next["prompt_id"].as_str().unwrap().to_string()));
    assert!(
        next["number"].as_f64().unwrap() > highest,
        "new job {next} must queue after the restored ones ({highest})"
    );
    let r = app
        .post_json(
            U1,
            "/api/prompt",
            &json!({"prompt": small(10), "front": true}),
        )
        .await;
    let front = r.json()["number"].as_f64().unwrap();
    assert!(
        numbers(&after).iter().all(|n| front < *n),
        "front ({front}) goes before {after}"
    );
    assert_eq!(
        app.get(U1, "/api/prompt").await.json()["exec_info"]["queue_remaining"],
        6
    );
}
