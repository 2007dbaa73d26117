//! Message sequences and HTTP quirks, checked against the captures in tests/fixtures/comfyui/traces.

use crate::helpers::*;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::Duration;

fn queue_remaining(v: &Value) -> u64 {
    v["data"]["status"]["exec_info"]["queue_remaining"]
        .as_u64()
        .unwrap()
}

#[tokio::test]
async fn owner_socket_sees_the_trace_sequence_for_nomodel() {
    let t = quick_sim().await;
    let mut ws = t.ws(Some("ownerA")).await;
    // Byte for byte what ComfyUI (json.dumps) sent in the capture.
    let raw = ws.next_text().await;
    let trace = std::fs::read_to_string(shared_file("traces/ws_owner.txt")).unwrap();
    assert_eq!(
        raw,
        trace.lines().next().unwrap().split_once(' ').unwrap().1
    );
    let hello: Value = serde_json::from_str(&raw).unwrap();

    let id = t.queue_ok(&workflow("nomodel.json"), Some("ownerA")).await;
    let mut frames = vec![crate::helpers::Frame::Json(hello)];
    frames.extend(ws.until_done(&id).await);
    assert_eq!(types(&frames), trace_types("ws_owner.txt"));

    let msgs: Vec<&Value> = frames.iter().filter_map(|f| f.json()).collect();
    let expected = trace_messages("ws_owner.txt");
    for (got, want) in msgs.iter().zip(&expected) {
        // Same shape as the capture apart from ids, timestamps and file counters.
        match want["type"].as_str().unwrap() {
            "status" => assert_eq!(queue_remaining(got), queue_remaining(want)),
            "progress_state" => {
                let g = got["data"]["nodes"].as_object().unwrap();
                let w = want["data"]["nodes"].as_object().unwrap();
                assert_eq!(g.keys().collect::<Vec<_>>(), w.keys().collect::<Vec<_>>());
                for (k, node) in w {
                    assert_eq!(g[k]["state"], node["state"]);
                    assert_eq!(g[k]["value"], node["value"]);
                    assert_eq!(g[k]["node_id"], node["node_id"]);
                    assert_eq!(g[k]["prompt_id"], id.as_str());
                }
            }
            "executing" => {
                assert_eq!(got["data"]["node"], want["data"]["node"]);
                assert_eq!(got["data"]["prompt_id"], id.as_str());
            }
            "executed" => {
                assert_eq!(got["data"]["node"], "3");
                assert_eq!(
                    got["data"]["output"],
                    json!({"images": [{"filename": "nomodel_00001_.png", "subfolder": "", "type": "output"}]})
                );
            }
            "execution_cached" => assert_eq!(got["data"]["nodes"], json!([])),
            _ => assert!(got["data"]["timestamp"].as_u64().unwrap() > 1_700_000_000_000),
        }
    }

    let h = t.wait_history(&id).await;
    assert_eq!(h["status"]["status_str"], "success");
    assert_eq!(h["status"]["completed"], true);
    let events: Vec<&str> = h["status"]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m[0].as_str().unwrap())
        .collect();
    assert_eq!(
        events,
        ["execution_start", "execution_cached", "execution_success"]
    );
    assert_eq!(
        h["outputs"],
        json!({"3": {"images": [{"filename": "nomodel_00001_.png", "subfolder": "", "type": "output"}]}})
    );
    assert_eq!(
        h["meta"]["3"],
        json!({"node_id": "3", "display_node": "3", "parent_node": null, "real_node_id": "3"})
    );
    assert_eq!(h["prompt"][0], 0);
    assert_eq!(h["prompt"][1], id.as_str());
    assert_eq!(h["prompt"][3]["client_id"], "ownerA");
    assert_eq!(h["prompt"][4], json!(["3"]));

    // The file is real: red 64x64 inverted is cyan.
    let r = t
        .get("/view?filename=nomodel_00001_.png&subfolder=&type=output")
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "image/png");
    assert_eq!(
        r.headers()["content-disposition"],
        "filename=\"nomodel_00001_.png\""
    );
    let img = image::load_from_memory(&r.bytes().await.unwrap())
        .unwrap()
        .to_rgb8();
    assert_eq!(img.dimensions(), (64, 64));
    assert_eq!(img.get_pixel(10, 10).0, [0, 255, 255]);
    t.sim.shutdown().await;
}

#[tokio::test]
async fn observer_socket_sees_only_status() {
    let t = quick_sim().await;
    let mut owner = t.ws(Some("ownerA")).await;
    let mut observer = t.ws(Some("observerB")).await;
    owner.next_json().await;
    let id = t.queue_ok(&workflow("nomodel.json"), Some("ownerA")).await;
    owner.until_done(&id).await;
    let mut seen = vec![observer.next().await];
    seen.extend(observer.drain(Duration::from_millis(200)).await);
    assert_eq!(types(&seen), trace_types("ws_observer.txt"));
    assert_eq!(seen[0].json().unwrap()["data"]["sid"], "observerB");
    let remaining: Vec<u64> = seen
        .iter()
        .map(|f| queue_remaining(f.json().unwrap()))
        .collect();
    assert_eq!(remaining, [0, 1, 1, 0]);
    t.sim.shutdown().await;
}

#[tokio::test]
async fn without_client_id_others_get_status_and_progress_state_only() {
    let t = quick_sim().await;
    let mut observer = t.ws(Some("observer01")).await;
    observer.next_json().await;
    let id = t.queue_ok(&workflow("nomodel.json"), None).await;
    t.wait_history(&id).await;
    let mut seen = observer.drain(Duration::from_millis(200)).await;
    seen.insert(0, crate::helpers::Frame::Json(json!({"type": "status"})));
    assert_eq!(types(&seen), trace_types("ws_no_client_id.txt"));
    // A socket without clientId gets a generated sid (uuid4 hex).
    let mut anon = t.ws(None).await;
    let hello = anon.next_json().await;
    let sid = hello["data"]["sid"].as_str().unwrap();
    assert_eq!(sid.len(), 32);
    assert!(sid.chars().all(|c| c.is_ascii_hexdigit()));
    t.sim.shutdown().await;
}

#[tokio::test]
async fn interrupt_sequence_matches_the_queue_interrupt_trace() {
    let t = spawn_sim(comfyume_sim::SimConfig {
        step_ms: 40,
        ..Default::default()
    })
    .await;
    let mut ws = t.ws(Some("queuetest01")).await;
    let mut frames = vec![ws.next().await];
    // Like slow_blur.json, on a small image: ImageBlur takes blur_radius steps.
    let mut slow = workflow("slow_blur.json");
    slow["1"]["inputs"]["width"] = json!(64);
    slow["1"]["inputs"]["height"] = json!(64);
    let a = t.queue_ok(&slow, Some("queuetest01")).await;
    t.wait_node(&a, "2").await;
    let b = t
        .queue_ok(&workflow("nomodel.json"), Some("queuetest01"))
        .await;
    let c = t
        .queue_ok(&workflow("nomodel.json"), Some("queuetest01"))
        .await;
    assert_eq!(
        t.post_json("/queue", &json!({"delete": [c]}))
            .await
            .status(),
        StatusCode::OK
    );
    // Interrupting a prompt that is not running does nothing.
    let r = t.post_json("/interrupt", &json!({"prompt_id": b})).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.bytes().await.unwrap().is_empty());
    let r = t.post_json("/interrupt", &json!({"prompt_id": a})).await;
    assert_eq!(r.status(), StatusCode::OK);
    frames.extend(ws.until_done(&a).await);

    let without_status =
        |v: Vec<String>| -> Vec<String> { v.into_iter().filter(|t| t != "status").collect() };
    assert_eq!(
        without_status(types(&frames)),
        without_status(trace_types("ws_queue_interrupt.txt"))
    );
    let statuses: Vec<u64> = frames
        .iter()
        .filter_map(|f| f.json())
        .filter(|v| v["type"] == "status")
        .map(queue_remaining)
        .collect();
    assert_eq!(statuses, [0, 1, 1, 2, 3, 2, 1]);
    let tail: Vec<&Value> = frames
        .iter()
        .rev()
        .take(3)
        .filter_map(|f| f.json())
        .collect();
    assert_eq!(tail[2]["type"], "execution_interrupted");
    let data = &tail[2]["data"];
    assert_eq!(data["node_id"], "3");
    assert_eq!(data["node_type"], "ImageInvert");
    assert_eq!(data["executed"], json!(["2", "1"]));
    assert_eq!(tail[1]["type"], "status");
    assert_eq!(tail[0]["data"], json!({"node": null, "prompt_id": a}));

    let h = t.wait_history(&a).await;
    assert_eq!(h["status"]["status_str"], "error");
    assert_eq!(h["status"]["completed"], false);
    assert_eq!(h["status"]["messages"][2][0], "execution_interrupted");
    // B was untouched by the interrupt aimed at A and runs next; C was deleted.
    assert_eq!(t.wait_history(&b).await["status"]["status_str"], "success");
    assert!(t.history_entry(&c).await.is_none());
    t.sim.shutdown().await;
}

#[tokio::test]
async fn runtime_error_gives_execution_error_then_status_then_executing_null() {
    let t = quick_sim().await;
    let mut ws = t.ws(Some("err")).await;
    ws.next().await;
    let (status, body) = t
        .queue_prompt(&workflow("runtime_error.json"), Some("err"))
        .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "validation passes; the failure is at run time"
    );
    let id = body["prompt_id"].as_str().unwrap().to_string();
    let frames = ws.until_done(&id).await;
    assert_eq!(
        types(&frames),
        [
            "status",
            "status",
            "execution_start",
            "execution_cached",
            "progress_state",
            "executing",
            "progress_state",
            "progress_state",
            "executing",
            "execution_error",
            "status",
            "executing"
        ]
    );
    let err = frames[9].json().unwrap()["data"].clone();
    let keys: Vec<&String> = err.as_object().unwrap().keys().collect();
    assert_eq!(
        keys,
        [
            "prompt_id",
            "node_id",
            "node_type",
            "executed",
            "exception_message",
            "exception_type",
            "traceback",
            "current_inputs",
            "current_outputs",
            "timestamp"
        ]
    );
    assert_eq!(err["node_id"], "2");
    assert_eq!(err["node_type"], "ImageScaleBy");
    assert_eq!(err["executed"], json!(["1"]));
    assert_eq!(err["exception_type"], "RuntimeError");
    let msg = err["exception_message"].as_str().unwrap();
    assert!(
        msg.starts_with("Input and output sizes should be greater than 0, ") && msg.ends_with('\n'),
        "{msg}"
    );
    assert_eq!(err["current_inputs"]["upscale_method"], json!(["bilinear"]));
    assert_eq!(err["current_inputs"]["scale_by"], json!([0.01]));
    assert!(err["current_inputs"]["image"][0].is_string());
    assert!(
        err["traceback"]
            .as_array()
            .unwrap()
            .iter()
            .all(Value::is_string)
    );
    let mut outs: Vec<&str> = err["current_outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    outs.sort();
    assert_eq!(outs, ["1", "2", "3"]);

    let h = t.wait_history(&id).await;
    assert_eq!(h["status"]["status_str"], "error");
    assert_eq!(h["status"]["completed"], false);
    assert_eq!(h["status"]["messages"][2][0], "execution_error");
    assert_eq!(h["outputs"], json!({}));
    t.sim.shutdown().await;
}

#[tokio::test]
async fn preview_frames_are_type_4_only_after_first_message_feature_flags() {
    let t = quick_sim().await;
    let mut modern = t.ws(Some("modern")).await;
    modern.next().await;
    modern.send_feature_flags().await;
    let flags = modern.next_json().await;
    assert_eq!(flags["type"], "feature_flags");
    assert_eq!(flags["data"], t.get_json("/features").await);

    let mut legacy = t.ws(Some("legacy")).await;
    legacy.next().await;
    // Feature flags count only as the first message.
    legacy.send_text(r#"{"type": "hello"}"#).await;
    legacy.send_feature_flags().await;
    assert!(matches!(
        legacy.next_within(Duration::from_millis(200)).await,
        Err(WsEnd::Timeout)
    ));

    let id = t.queue_ok(&flux_workflow(3, 42, 64), Some("modern")).await;
    let frames = modern.until_done(&id).await;
    let binaries: Vec<&Vec<u8>> = frames
        .iter()
        .filter_map(|f| match f {
            Frame::Binary(b) => Some(b),
            _ => None,
        })
        .collect();
    assert_eq!(binaries.len(), 3);
    for b in &binaries {
        assert_eq!(&b[0..4], &4u32.to_be_bytes());
        let len = u32::from_be_bytes([b[4], b[5], b[6], b[7]]) as usize;
        let meta: Value = serde_json::from_slice(&b[8..8 + len]).unwrap();
        assert_eq!(meta["node_id"], "11");
        assert_eq!(meta["prompt_id"], id.as_str());
        assert_eq!(meta["image_type"], "image/jpeg");
        assert_eq!(&b[8 + len..8 + len + 2], &[0xFF, 0xD8]);
    }
    // Per step: progress_state, preview, progress.
    let t_seq = types(&frames);
    let first = t_seq.iter().position(|x| x == "binary:4").unwrap();
    assert_eq!(t_seq[first - 1], "progress_state");
    assert_eq!(t_seq[first + 1], "progress");
    let progress: Vec<(u64, u64)> = frames
        .iter()
        .filter_map(|f| f.json())
        .filter(|v| v["type"] == "progress")
        .map(|v| {
            (
                v["data"]["value"].as_u64().unwrap(),
                v["data"]["max"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(progress, [(1, 3), (2, 3), (3, 3)]);

    let id2 = t.queue_ok(&flux_workflow(2, 43, 64), Some("legacy")).await;
    let frames = legacy.until_done(&id2).await;
    let legacy_types = types(&frames);
    assert_eq!(legacy_types.iter().filter(|x| *x == "binary:1").count(), 2);
    assert!(!legacy_types.iter().any(|x| x == "binary:4"));
    let b = frames
        .iter()
        .find_map(|f| match f {
            Frame::Binary(b) => Some(b),
            _ => None,
        })
        .unwrap();
    assert_eq!(&b[4..8], &1u32.to_be_bytes(), "image format 1 = JPEG");
    assert_eq!(&b[8..10], &[0xFF, 0xD8]);
    // The sampler's progress_state ends with integer step counts.
    let last_state = frames
        .iter()
        .rev()
        .filter_map(|f| f.json())
        .find(|v| v["type"] == "progress_state")
        .unwrap();
    assert_eq!(last_state["data"]["nodes"]["11"]["value"], json!(2));
    assert_eq!(last_state["data"]["nodes"]["11"]["max"], json!(2));
    t.sim.shutdown().await;
}

#[tokio::test]
async fn cached_rerun_sends_cached_executed_only() {
    let t = quick_sim().await;
    let mut ws = t.ws(Some("c")).await;
    ws.next().await;
    let first = t.queue_ok(&workflow("nomodel.json"), Some("c")).await;
    ws.until_done(&first).await;
    let second = t.queue_ok(&workflow("nomodel.json"), Some("c")).await;
    let frames = ws.until_done(&second).await;
    assert_eq!(
        types(&frames),
        [
            "status",
            "status",
            "execution_start",
            "execution_cached",
            "executed",
            "progress_state",
            "execution_success",
            "status",
            "executing"
        ]
    );
    assert_eq!(
        frames[3].json().unwrap()["data"]["nodes"],
        json!(["1", "2", "3"])
    );
    let state = &frames[5].json().unwrap()["data"]["nodes"]["3"];
    assert_eq!(
        (state["value"].clone(), state["max"].clone()),
        (json!(1), json!(1))
    );
    let h = t.wait_history(&second).await;
    assert_eq!(
        h["outputs"]["3"]["images"][0]["filename"],
        "nomodel_00001_.png"
    );
    assert!(!t.sim.output_dir().join("nomodel_00002_.png").exists());
    // A changed prefix re-runs only the SaveImage node.
    let mut changed = workflow("nomodel.json");
    changed["3"]["inputs"]["filename_prefix"] = json!("other");
    let third = t.queue_ok(&changed, Some("c")).await;
    let frames = ws.until_done(&third).await;
    let executing: Vec<Value> = frames
        .iter()
        .filter_map(|f| f.json())
        .filter(|v| v["type"] == "executing")
        .map(|v| v["data"]["node"].clone())
        .collect();
    assert_eq!(executing, [json!("3"), Value::Null]);
    assert_eq!(
        frames[3].json().unwrap()["data"]["nodes"],
        json!(["1", "2"])
    );
    t.sim.shutdown().await;
}

/// One job the way the dispatcher's `comfyui` backend runs it: its own socket
/// `comfyume-<job>`, our `prompt_id`, `extra_data`; returns the socket's frames and the history.
async fn dispatcher_job(t: &TestSim, prompt: &Value, job: &str) -> (Vec<Frame>, Value) {
    let client = format!("comfyume-{job}");
    let mut ws = t.ws(Some(&client)).await;
    ws.send_feature_flags().await;
    let (status, body) = t
        .submit(&json!({
            "prompt": prompt, "client_id": client, "prompt_id": job,
            "extra_data": {"client_id": client, "extra_pnginfo": {"workflow": {"nodes": []}}},
        }))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["prompt_id"], job);
    let frames = ws.until_done(job).await;
    (frames, t.wait_history(job).await)
}

/// The same sampled prompt twice, as the dispatcher sends it: the rerun is served from the
/// classic cache and its history points at the first run's file, which `/view` still serves.
#[tokio::test]
async fn identical_rerun_from_a_new_client_is_fully_cached() {
    let t = quick_sim().await;
    let prompt = default_graph(7);
    let (first_frames, first) = dispatcher_job(&t, &prompt, "job-1").await;
    assert_eq!(first["status"]["status_str"], "success");
    assert_eq!(
        first_frames.iter().filter(|f| f.ty() == "progress").count(),
        20
    );
    let (frames, second) = dispatcher_job(&t, &prompt, "job-2").await;
    let own: Vec<&Value> = frames
        .iter()
        .filter_map(Frame::json)
        .filter(|v| v["data"]["prompt_id"] == "job-2")
        .collect();
    let own_types: Vec<&str> = own.iter().map(|v| v["type"].as_str().unwrap()).collect();
    assert_eq!(
        own_types,
        [
            "execution_start",
            "execution_cached",
            "executed",
            "progress_state",
            "execution_success",
            "executing"
        ]
    );
    assert_eq!(
        own[1]["data"]["nodes"],
        json!(["3", "4", "5", "6", "7", "8", "9"])
    );
    assert!(
        frames.iter().all(|f| matches!(f, Frame::Json(_))),
        "no previews"
    );
    let file =
        json!({"images": [{"filename": "ComfyUI_00001_.png", "subfolder": "", "type": "output"}]});
    assert_eq!(own[2]["data"]["node"], "9");
    assert_eq!(own[2]["data"]["output"], file);
    assert_eq!(second["status"]["status_str"], "success");
    assert_eq!(second["status"]["completed"], true);
    assert_eq!(second["outputs"], json!({"9": file}));
    assert_eq!(second["outputs"], first["outputs"]);
    assert_eq!(second["prompt"][1], "job-2");
    let r = t.get("/view?filename=ComfyUI_00001_.png&type=output").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(image::load_from_memory(&r.bytes().await.unwrap()).is_ok());
    assert!(!t.sim.output_dir().join("ComfyUI_00002_.png").exists());
    let s = t.sim.state();
    assert_eq!((s.jobs_run, s.jobs_succeeded), (2, 2));
    t.sim.shutdown().await;
}

#[tokio::test]
async fn http_quirks() {
    let t = quick_sim().await;
    // unknown ids and classes answer 200 {}
    assert_eq!(
        t.get_json("/history/00000000-0000-0000-0000-000000000000")
            .await,
        json!({})
    );
    assert_eq!(t.get_json("/object_info/NoSuchNode").await, json!({}));
    assert_eq!(
        t.get_json("/api/object_info/EmptyImage").await["EmptyImage"]["input"]["required"]["width"],
        json!(["INT", {"default": 512, "min": 1, "max": 16384, "step": 1}])
    );
    // empty bodies
    for (path, body) in [
        ("/queue", json!({"clear": true})),
        ("/history", json!({"clear": true})),
        ("/interrupt", json!({})),
        ("/free", json!({"unload_models": true, "free_memory": true})),
        ("/api/queue", json!({"delete": ["nope"]})),
    ] {
        let r = t.post_json(path, &body).await;
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        assert!(r.bytes().await.unwrap().is_empty(), "{path}");
    }
    let r = t
        .http
        .post(t.url("/interrupt"))
        .body("")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // bad JSON on /prompt
    let r = t
        .http
        .post(t.url("/prompt"))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(r.headers()["content-type"], "text/plain; charset=utf-8");
    assert_eq!(
        r.text().await.unwrap(),
        "500 Internal Server Error\n\nServer got itself in trouble"
    );
    // the counter advances for rejected prompts too
    let (s, body) = t
        .queue_prompt(
            &json!({"1": {"class_type": "NoSuchNode", "inputs": {}}}),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(
        body,
        json!({"error": {"type": "invalid_prompt", "message": "Cannot execute because node NoSuchNode does not exist.", "details": "Node ID '#1'", "extra_info": {}}, "node_errors": {}})
    );
    let (s, body) = t.queue_prompt(&json!({"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}}}), None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["type"], "prompt_no_outputs");
    let (s, body) = t.submit(&json!({"client_id": "x"})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["type"], "no_prompt");
    let (s, body) = t.queue_prompt(&workflow("nomodel.json"), None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(body["number"], 3);
    assert_eq!(body["node_errors"], json!({}));
    let (_, body) = t
        .submit(&json!({"prompt": workflow("nomodel.json"), "front": true}))
        .await;
    assert_eq!(body["number"], -4);
    let raw = t.http.post(t.url("/prompt")).json(&json!({"prompt": workflow("nomodel.json"), "number": 7.5, "prompt_id": "my-own-id-123"})).send().await.unwrap().text().await.unwrap();
    assert_eq!(
        raw,
        r#"{"prompt_id": "my-own-id-123", "number": 7.5, "node_errors": {}}"#
    );
    // GET /prompt
    let q = t.get_json("/api/prompt").await;
    assert!(q["exec_info"]["queue_remaining"].is_u64());
    // system stats say what this is
    let stats = t.get_json("/system_stats").await;
    assert_eq!(stats["system"]["comfyui_version"], "0.11.0");
    assert_eq!(
        stats["devices"][0]["name"],
        "comfyume-sim (simulated, no GPU)"
    );
    assert_eq!(
        t.get_json("/api/features").await,
        json!({"supports_preview_metadata": true, "max_upload_size": 104857600, "extension": {"manager": {"supports_v4": true}}})
    );
    // origin check
    let r = t
        .http
        .post(t.url("/prompt"))
        .header("Origin", "http://evil.example")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = t
        .http
        .request(reqwest::Method::OPTIONS, t.url("/prompt"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // history paging: the last N items
    let id = "my-own-id-123";
    t.wait_history(id).await;
    let last = t.get_json("/history?max_items=1").await;
    assert_eq!(last.as_object().unwrap().keys().collect::<Vec<_>>(), [id]);
    assert_eq!(
        t.post_json("/history", &json!({"delete": [id]}))
            .await
            .status(),
        StatusCode::OK
    );
    assert_eq!(t.get_json(&format!("/history/{id}")).await, json!({}));
    t.sim.shutdown().await;
}

#[tokio::test]
async fn queue_runs_in_number_order_and_front_goes_first() {
    let t = spawn_sim(comfyume_sim::SimConfig {
        step_ms: 20,
        ..Default::default()
    })
    .await;
    let mut ws = t.ws(Some("q")).await;
    ws.next().await;
    let a = t.queue_ok(&flux_workflow(50, 1, 32), Some("q")).await;
    t.wait_running(&a).await;
    let b = t.queue_ok(&flux_workflow(1, 2, 32), Some("q")).await;
    let (_, body) = t
        .submit(&json!({"prompt": flux_workflow(1, 3, 32), "client_id": "q", "front": true}))
        .await;
    let c = body["prompt_id"].as_str().unwrap().to_string();
    let queue = t.get_json("/queue").await;
    assert_eq!(queue["queue_running"][0][1], a.as_str());
    assert_eq!(queue["queue_pending"].as_array().unwrap().len(), 2);
    assert_eq!(queue["queue_pending"][0][1], c.as_str());
    assert_eq!(queue["queue_pending"][0][0], -2);
    let mut starts = Vec::new();
    while starts.len() < 3 {
        let v = ws.next().await;
        if let Some(v) = v.json().filter(|v| v["type"] == "execution_start") {
            starts.push(v["data"]["prompt_id"].as_str().unwrap().to_string());
        }
    }
    ws.until_done(&b).await;
    assert_eq!(starts, [a, c, b]);
    t.sim.shutdown().await;
}

#[tokio::test]
async fn reconnecting_executing_client_is_told_the_current_node() {
    let t = spawn_sim(comfyume_sim::SimConfig {
        step_ms: 20,
        ..Default::default()
    })
    .await;
    let id = t.queue_ok(&flux_workflow(60, 1, 32), Some("back")).await;
    t.wait_node(&id, "11").await;
    let mut ws = t.ws(Some("back")).await;
    assert_eq!(queue_remaining(&ws.next_json().await), 1);
    assert_eq!(
        ws.next_json().await,
        json!({"type": "executing", "data": {"node": "11"}})
    );
    t.post_json("/interrupt", &json!({})).await;
    ws.until_done(&id).await;
    t.sim.shutdown().await;
}
