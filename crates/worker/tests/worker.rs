//! The worker in front of the ComfyUI simulator, as the app server (or the provider's
//! gateway) talks to it: health, the event stream, outputs, idempotency, busy answers,
//! ComfyUI dying, SIGTERM.

use crate::helpers;

use std::time::Duration;

use comfyume_sim::Fault;
use helpers::*;
use serde_json::{Value, json};

#[tokio::test]
async fn health_is_ready_only_after_the_warm_up_ran() {
    // 40 steps x 50 ms: the warm-up takes about 2 s of simulated GPU time.
    let sim = sim(50).await;
    let dir = tempfile::tempdir().unwrap();
    let warmup = dir.path().join("warmup.json");
    std::fs::write(&warmup, json!({"prompt": sampler(40, 1)}).to_string()).unwrap();
    let mut a = args(&sim.url());
    a.warmup_workflow = Some(warmup);
    let w = start_worker(a).await;

    let seen = wait_health(&w.url, "ready", Duration::from_secs(60)).await;
    // It said it was warming up, and it was ready only once the warm-up had run.
    assert!(seen.contains(&"warming_up".to_owned()), "{seen:?}");
    assert!(!seen[..seen.len() - 1].contains(&"ready".to_owned()));
    let state = sim.state();
    assert_eq!(state.jobs_succeeded, 1, "the warm-up ran to its end first");
    assert!(state.current_job.is_none());

    // The node definitions are served from the worker's cache.
    let r = client()
        .get(format!("{}/object_info", w.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let info: Value = r.json().await.unwrap();
    assert!(info.get("KSampler").is_some());
}

#[tokio::test]
async fn a_warm_up_that_fails_keeps_the_worker_unhealthy() {
    let sim = sim(5).await;
    let dir = tempfile::tempdir().unwrap();
    let warmup = dir.path().join("warmup.json");
    // ImageScaleBy to 0 px: a runtime error in the simulator as in ComfyUI.
    let broken = json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 1, "height": 1, "batch_size": 1, "color": 0}},
        "2": {"class_type": "ImageScaleBy", "inputs": {"image": ["1", 0], "upscale_method": "bilinear", "scale_by": 0.01}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "err"}}
    });
    std::fs::write(&warmup, broken.to_string()).unwrap();
    let mut a = args(&sim.url());
    a.warmup_workflow = Some(warmup);
    let w = start_worker(a).await;
    wait_health(&w.url, "unhealthy", Duration::from_secs(30)).await;
    let r = client()
        .get(format!("{}/health", w.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["reason"].as_str().unwrap().contains("warm-up failed"),
        "{body}"
    );
    // No job is taken meanwhile.
    let r = post_run(&w.url, &run_body("j1", nomodel("x"))).await;
    assert_eq!(r.status(), 503);
    assert!(r.headers().get("retry-after").is_some());
}

#[tokio::test]
async fn a_job_streams_its_events_and_outputs_then_one_result() {
    let sim = sim(10).await;
    let w = start_worker(args(&sim.url())).await;
    wait_health(&w.url, "ready", Duration::from_secs(30)).await;

    let resp = post_run(&w.url, &run_body("job-1", sampler(6, 3))).await;
    assert_eq!(resp.headers()["x-inference-id"], "job-1");
    let mut events = Events::new(resp);
    let all = events.rest().await;
    let t = types(&all);
    assert_eq!(t[0], "accepted");
    assert_eq!(all[0]["replay"], false);
    assert_eq!(all[0]["protocol"], 1);
    let pos = |name: &str| t.iter().position(|x| x == name).unwrap();
    assert!(pos("accepted") < pos("submitted") && pos("submitted") < pos("started"));
    // ComfyUI's own messages come through, wrapped.
    let kinds: Vec<&str> = all
        .iter()
        .filter(|e| e["type"] == "comfyui")
        .map(|e| e["message"]["type"].as_str().unwrap())
        .collect();
    for k in [
        "execution_start",
        "executing",
        "progress",
        "progress_state",
        "executed",
    ] {
        assert!(kinds.contains(&k), "no {k} in {kinds:?}");
    }
    // No `executing: null` (the final event says it ended) and no status messages.
    assert!(!kinds.contains(&"status"));
    assert!(all.iter().all(|e| !(e["type"] == "comfyui"
        && e["message"]["type"] == "executing"
        && e["message"]["data"]["node"].is_null())));
    // Previews: rate-limited, base64 of a binary frame of type 4.
    let previews: Vec<&Value> = all.iter().filter(|e| e["type"] == "preview").collect();
    assert!(!previews.is_empty(), "no preview in {t:?}");
    assert!(previews.len() < 6, "previews are rate-limited");

    // The file arrives before the `executed` naming it; then exactly one final event.
    let executed = all
        .iter()
        .position(|e| e["type"] == "comfyui" && e["message"]["type"] == "executed")
        .unwrap();
    assert!(pos("output_end") < executed);
    assert_eq!(t.last().unwrap(), "result");
    assert_eq!(t.iter().filter(|x| *x == "result").count(), 1);
    let files = inline_files(&all);
    let result = all.last().unwrap();
    let name = result["outputs"]["9"]["images"][0]["filename"]
        .as_str()
        .unwrap();
    let png = &files[name];
    assert!(png.starts_with(b"\x89PNG"));
    assert_eq!(result["files"][0]["delivery"], "inline");
    assert_eq!(result["files"][0]["size"], png.len() as u64);
    assert_eq!(result["status"]["status_str"], "success");
    assert!(result["timing"]["execution_ms"].as_u64().is_some());
    // Every data line was one event (a keep-alive has its comment and its data line).
    assert_eq!(events.data_lines, all.len() + events.keepalive_comments);
    assert_eq!(sim.state().jobs_run, 1);
    assert_eq!(health(&w.url).await, (200, "ready".into()));
}

#[tokio::test]
async fn a_runtime_error_is_passed_through_and_not_retryable() {
    let sim = sim(5).await;
    let w = start_worker(args(&sim.url())).await;
    wait_health(&w.url, "ready", Duration::from_secs(30)).await;
    let broken = json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 1, "height": 1, "batch_size": 1, "color": 0}},
        "2": {"class_type": "ImageScaleBy", "inputs": {"image": ["1", 0], "upscale_method": "bilinear", "scale_by": 0.01}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "err"}}
    });
    let all = Events::new(post_run(&w.url, &run_body("bad-1", broken)).await)
        .rest()
        .await;
    let last = all.last().unwrap();
    assert_eq!(last["type"], "error");
    assert_eq!(last["kind"], "execution_error");
    assert_eq!(last["data"]["node_type"], "ImageScaleBy");
    assert_eq!(last["data"]["prompt_id"], "bad-1");
    assert!(last["data"]["exception_message"].is_string());

    // A prompt ComfyUI refuses: its 400 body comes back as `rejected`.
    let invalid = json!({"1": {"class_type": "NoSuchNode", "inputs": {}}});
    let all = Events::new(post_run(&w.url, &run_body("bad-2", invalid)).await)
        .rest()
        .await;
    let last = all.last().unwrap();
    assert_eq!(last["kind"], "rejected", "{last}");
    assert_eq!(last["data"]["error"]["type"], "invalid_prompt");
}

#[tokio::test]
async fn busy_while_a_job_runs_429_for_another_409_for_the_same() {
    let sim = sim(100).await;
    let w = start_worker(args(&sim.url())).await;
    wait_health(&w.url, "ready", Duration::from_secs(30)).await;

    let mut first = Events::new(post_run(&w.url, &run_body("long-1", sampler(30, 1))).await);
    first.until("started").await;
    assert_eq!(health(&w.url).await, (200, "busy".into()));

    let r = post_run(&w.url, &run_body("other-2", nomodel("o"))).await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "5");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "busy");

    let r = post_run(&w.url, &run_body("long-1", sampler(30, 1))).await;
    assert_eq!(r.status(), 409);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "job_running");

    let rest = first.rest().await;
    assert_eq!(rest.last().unwrap()["type"], "result");
    wait_health(&w.url, "ready", Duration::from_secs(5)).await;
    assert_eq!(
        sim.state().prompts_received,
        1,
        "the refused jobs never reached ComfyUI"
    );
}

#[tokio::test]
async fn a_finished_job_id_is_answered_again_not_run_twice() {
    let sim = sim(5).await;
    let w = start_worker(args(&sim.url())).await;
    wait_health(&w.url, "ready", Duration::from_secs(30)).await;

    let first = Events::new(post_run(&w.url, &run_body("dup-1", nomodel("d"))).await)
        .rest()
        .await;
    assert_eq!(first.last().unwrap()["type"], "result");
    let again = Events::new(post_run(&w.url, &run_body("dup-1", nomodel("d"))).await)
        .rest()
        .await;
    assert_eq!(again[0]["type"], "accepted");
    assert_eq!(again[0]["replay"], true);
    assert_eq!(again.last(), first.last(), "the same final event");
    assert_eq!(inline_files(&again), inline_files(&first), "the same files");
    assert!(!types(&again).contains(&"comfyui".to_owned()));
    assert_eq!(sim.state().prompts_received, 1, "ran once");

    // In async mode too: one JSON document with the same final event.
    let r = client()
        .post(format!("{}/run", w.url))
        .header("prefer", "respond-async")
        .json(&run_body("dup-1", nomodel("d")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], "application/json");
    let doc: Value = r.json().await.unwrap();
    assert_eq!(doc["job_id"], "dup-1");
    assert_eq!(doc["events"].as_array().unwrap().last(), first.last());
    assert_eq!(sim.state().prompts_received, 1);
}

#[tokio::test]
async fn async_mode_answers_one_json_document_with_the_same_events() {
    let sim = sim(10).await;
    let w = start_worker(args(&sim.url())).await;
    wait_health(&w.url, "ready", Duration::from_secs(30)).await;
    let r = client()
        .post(format!("{}/run", w.url))
        .header("prefer", "respond-async")
        .json(&run_body("async-1", sampler(4, 2)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let doc: Value = r.json().await.unwrap();
    let events = doc["events"].as_array().unwrap();
    let t = types(events);
    assert_eq!(t[0], "accepted");
    assert_eq!(t.last().unwrap(), "result");
    assert!(t.contains(&"output_chunk".to_owned()));
    assert!(
        !t.contains(&"preview".to_owned()),
        "no previews in async mode"
    );
    assert!(!t.contains(&"keepalive".to_owned()));
    let files = inline_files(events);
    assert_eq!(files.len(), 1);
}

#[tokio::test]
async fn a_large_output_arrives_in_chunks() {
    let sim = sim(5).await;
    // 700x700 noise: about 1.4 MB, 8 chunks of 192 KiB.
    std::fs::write(sim.input_dir().join("noise.png"), noise_png(700, 700)).unwrap();
    let w = start_worker(args(&sim.url())).await;
    wait_health(&w.url, "ready", Duration::from_secs(30)).await;
    let mut events =
        Events::new(post_run(&w.url, &run_body("big-1", resave("noise.png", "big"))).await);
    let all = events.rest().await;
    let chunks: Vec<&Value> = all.iter().filter(|e| e["type"] == "output_chunk").collect();
    let head = all.iter().find(|e| e["type"] == "output_file").unwrap();
    assert_eq!(head["chunks"].as_u64().unwrap(), chunks.len() as u64);
    assert!(chunks.len() >= 7, "{}", chunks.len());
    for c in &chunks {
        // Each data line at most 256 KiB of base64 plus the envelope.
        assert!(c["data"].as_str().unwrap().len() <= 256 * 1024);
    }
    let files = inline_files(&all);
    let (_, data) = files.iter().next().unwrap();
    let decoded = image::load_from_memory(data).unwrap();
    assert_eq!((decoded.width(), decoded.height()), (700, 700));
    assert_eq!(all.last().unwrap()["type"], "result");
}

#[tokio::test]
async fn outputs_beyond_the_inline_limit_without_a_store_are_a_clear_error() {
    let sim = sim(5).await;
    std::fs::write(sim.input_dir().join("noise.png"), noise_png(300, 300)).unwrap();
    let mut a = args(&sim.url());
    a.inline_max_bytes = 50_000;
    let w = start_worker(a).await;
    wait_health(&w.url, "ready", Duration::from_secs(30)).await;
    let all = Events::new(post_run(&w.url, &run_body("toobig", resave("noise.png", "t"))).await)
        .rest()
        .await;
    let last = all.last().unwrap();
    assert_eq!(last["type"], "error");
    assert_eq!(last["kind"], "worker");
    assert_eq!(last["reason"], "output_too_large");
    assert!(!types(&all).contains(&"output_chunk".to_owned()));
}

#[tokio::test]
async fn inline_inputs_reach_comfyui() {
    let sim = sim(5).await;
    let w = start_worker(args(&sim.url())).await;
    wait_health(&w.url, "ready", Duration::from_secs(30)).await;
    use base64::Engine;
    let png = noise_png(40, 30);
    let mut body = run_body("in-1", resave("cats/cat.png", "in"));
    body["inputs"] = json!([{
        "name": "cats/cat.png",
        "data_base64": base64::engine::general_purpose::STANDARD.encode(&png),
    }]);
    let all = Events::new(post_run(&w.url, &body).await).rest().await;
    assert_eq!(all.last().unwrap()["type"], "result", "{:?}", all.last());
    let files = inline_files(&all);
    let out = image::load_from_memory(files.values().next().unwrap()).unwrap();
    assert_eq!((out.width(), out.height()), (40, 30));
}

#[tokio::test]
async fn hostile_requests_get_clear_errors() {
    let sim = sim(5).await;
    let mut a = args(&sim.url());
    a.token = Some(comfyume_worker::config::Secret::new("tok-123"));
    a.max_request_bytes = 64 * 1024;
    let w = start_worker(a).await;
    wait_health(&w.url, "ready", Duration::from_secs(30)).await;
    let c = client();
    let url = format!("{}/run", w.url);
    let send = |req: reqwest::RequestBuilder| async move {
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        (
            status,
            body["error"]["type"].as_str().unwrap_or("").to_owned(),
        )
    };
    let good = run_body("h-1", nomodel("h"));
    assert_eq!(
        send(c.post(&url).json(&good)).await,
        (401, "unauthorized".into())
    );
    assert_eq!(
        send(c.post(&url).bearer_auth("wrong").json(&good)).await,
        (401, "unauthorized".into())
    );
    assert_eq!(send(c.get(format!("{}/object_info", w.url))).await.0, 401);
    let authed = |r: reqwest::RequestBuilder| r.header("x-worker-token", "tok-123");
    assert_eq!(
        send(authed(c.post(&url)).body("{not json")).await,
        (400, "invalid_request".into())
    );
    assert_eq!(
        send(authed(c.post(&url)).json(&json!({"job_id": "../etc", "prompt": {"1": {}}}))).await,
        (400, "invalid_request".into())
    );
    let mut bad_b64 = good.clone();
    bad_b64["inputs"] = json!([{"name": "a.png", "data_base64": "!!notbase64"}]);
    assert_eq!(
        send(authed(c.post(&url)).json(&bad_b64)).await,
        (400, "invalid_request".into())
    );
    let mut by_key = good.clone();
    by_key["inputs"] = json!([{"name": "a.png", "store_key": "k"}]);
    assert_eq!(
        send(authed(c.post(&url)).json(&by_key)).await,
        (400, "invalid_request".into()),
        "store_key without a store"
    );
    let mut huge = good.clone();
    huge["extra_data"] = json!({"pad": "x".repeat(100 * 1024)});
    assert_eq!(
        send(authed(c.post(&url)).json(&huge)).await,
        (413, "too_large".into())
    );
    assert_eq!(send(c.get(format!("{}/nope", w.url))).await.0, 404);
    // Nothing reached ComfyUI; the good request with the token runs.
    assert_eq!(sim.state().prompts_received, 0);
    let r = c
        .post(&url)
        .bearer_auth("tok-123")
        .json(&good)
        .send()
        .await
        .unwrap();
    let all = Events::new(r).rest().await;
    assert_eq!(all.last().unwrap()["type"], "result");
}

#[tokio::test]
async fn health_turns_503_when_comfyui_dies_and_a_running_job_is_aborted() {
    let sim = sim(100).await;
    let w = start_worker(args(&sim.url())).await;
    wait_health(&w.url, "ready", Duration::from_secs(30)).await;
    let mut events = Events::new(post_run(&w.url, &run_body("die-1", sampler(40, 1))).await);
    events.until("started").await;
    sim.kill();
    let rest = events.rest().await;
    let last = rest.last().unwrap();
    assert_eq!(last["type"], "aborted", "{last}");
    assert!(
        last["reason"].as_str().unwrap().starts_with("comfyui_"),
        "{last}"
    );
    // Health stopped saying ready before the job's `aborted` went out.
    let (code, status) = health(&w.url).await;
    assert_eq!((code, status.as_str()), (503, "unhealthy"));
    // The job was not kept: the same id would run again elsewhere or here.
    assert_eq!(rest.iter().filter(|e| e["type"] == "aborted").count(), 1);
}

#[tokio::test]
async fn a_client_that_goes_away_interrupts_its_job() {
    let sim = sim(100).await;
    let w = start_worker(args(&sim.url())).await;
    wait_health(&w.url, "ready", Duration::from_secs(30)).await;
    let mut events = Events::new(post_run(&w.url, &run_body("gone-1", sampler(200, 1))).await);
    events.until("started").await;
    drop(events);
    // The GPU is free again soon (keep-alive or the next event notices the closed stream).
    wait_health(&w.url, "ready", Duration::from_secs(30)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while sim.state().jobs_interrupted == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "ComfyUI job not interrupted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Not kept: the same id runs again.
    let all = Events::new(post_run(&w.url, &run_body("gone-1", nomodel("g"))).await)
        .rest()
        .await;
    assert_eq!(all[0]["replay"], false);
    assert_eq!(all.last().unwrap()["type"], "result");
    // A rerun's events still carry the job id.
    assert!(
        all.iter()
            .filter(|e| e["type"] == "comfyui")
            .all(|e| e["message"]["data"]["prompt_id"].is_null()
                || e["message"]["data"]["prompt_id"] == "gone-1")
    );
}

#[tokio::test(start_paused = true)]
async fn sigterm_mid_job_aborts_it_within_the_production_grace() {
    // One sampler step takes a simulated minute: the job cannot finish in the grace.
    let sim = sim(60_000).await;
    let a = args(&sim.url());
    assert_eq!(a.abort_after_secs, 20, "the production default");
    let mut w = start_worker(a).await;
    wait_health(&w.url, "ready", Duration::from_secs(60)).await;
    let mut events = Events::new(post_run(&w.url, &run_body("term-1", sampler(50, 1))).await);
    events.until("started").await;

    let sigterm_at = tokio::time::Instant::now();
    w.sigterm();
    // Health says stopping at once; new jobs are refused.
    wait_health(&w.url, "stopping", Duration::from_secs(1)).await;
    let r = post_run(&w.url, &run_body("late", nomodel("l"))).await;
    assert_eq!(r.status(), 503);

    let rest = events.rest().await;
    let elapsed = sigterm_at.elapsed();
    let last = rest.last().unwrap();
    assert_eq!(last["type"], "aborted", "{rest:?}");
    assert_eq!(last["reason"], "sigterm");
    // Aborted after the worker's grace and well before the provider's SIGKILL at 30 s.
    assert!(elapsed >= Duration::from_secs(20), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(30), "{elapsed:?}");
    // Then the worker exits.
    tokio::time::timeout(Duration::from_secs(30), w.stopped())
        .await
        .expect("worker exits")
        .unwrap();
}

#[tokio::test]
async fn sigterm_lets_a_short_job_finish() {
    let sim = sim(20).await;
    let mut w = start_worker(args(&sim.url())).await;
    wait_health(&w.url, "ready", Duration::from_secs(30)).await;
    let mut events = Events::new(post_run(&w.url, &run_body("fin-1", sampler(20, 1))).await);
    events.until("started").await;
    w.sigterm();
    let rest = events.rest().await;
    assert_eq!(rest.last().unwrap()["type"], "result");
    tokio::time::timeout(Duration::from_secs(30), w.stopped())
        .await
        .expect("worker exits")
        .unwrap();
}

#[tokio::test]
async fn a_dropped_comfyui_websocket_does_not_lose_the_job() {
    let sim = sim(30).await;
    let w = start_worker(args(&sim.url())).await;
    wait_health(&w.url, "ready", Duration::from_secs(30)).await;
    sim.set_fault(Fault::DropWebsocket);
    let all = Events::new(post_run(&w.url, &run_body("ws-1", sampler(10, 1))).await)
        .rest()
        .await;
    assert_eq!(all.last().unwrap()["type"], "result", "{:?}", all.last());
    assert_eq!(inline_files(&all).len(), 1);
}

#[tokio::test]
async fn a_client_leaving_after_comfyui_finished_still_gets_the_result_on_retry() {
    let sim = sim(5).await;
    // 2600x2600 noise: about 20 MB inline, far more than the socket buffers hold.
    std::fs::write(sim.input_dir().join("n.png"), noise_png(2600, 2600)).unwrap();
    let w = start_worker(args(&sim.url())).await;
    wait_health(&w.url, "ready", Duration::from_secs(30)).await;
    let body = run_body("late-1", resave("n.png", "late"));
    let mut events = Events::new(post_run(&w.url, &body).await);
    events.until("output_chunk").await;
    // ComfyUI is done with it (the output exists); the reader goes away mid-delivery.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while sim.state().jobs_succeeded == 0 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(events);
    wait_health(&w.url, "ready", Duration::from_secs(30)).await;

    // The retry is answered from what the worker kept; ComfyUI did not run it again.
    let again = Events::new(post_run(&w.url, &body).await).rest().await;
    assert_eq!(again[0]["replay"], true, "{:?}", again[0]);
    assert_eq!(again.last().unwrap()["type"], "result");
    let files = inline_files(&again);
    assert!(files.values().next().unwrap().len() > 15_000_000);
    assert_eq!(sim.state().prompts_received, 1);
}
