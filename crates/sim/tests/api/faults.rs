//! Every fault, switched on through the handle or through POST /sim/fault.

use crate::helpers::*;
use comfyume_sim::{Fault, SimConfig};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

async fn sim_fault(t: &TestSim, body: Value) -> Value {
    let r = t.post_json("/sim/fault", &body).await;
    assert_eq!(r.status(), StatusCode::OK, "{body}");
    r.json().await.unwrap()
}

#[tokio::test]
async fn prompt_error_answers_500_until_cleared() {
    let t = spawn_sim(SimConfig {
        step_ms: 5,
        faults: vec![Fault::PromptError],
        ..SimConfig::default()
    })
    .await;
    let r = t
        .post_json("/prompt", &json!({"prompt": workflow("nomodel.json")}))
        .await;
    assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        r.text().await.unwrap(),
        "500 Internal Server Error\n\nServer got itself in trouble"
    );
    let state = sim_fault(&t, json!({"fault": "clear"})).await;
    assert_eq!(state["faults"]["prompt_error"], false);
    assert_eq!(state["prompts_received"], 1);
    let id = t.queue_ok(&workflow("nomodel.json"), None).await;
    t.wait_history(&id).await;
    let state = t.get_json("/sim/state").await;
    assert_eq!(state["simulator"], "comfyume-sim");
    assert_eq!(state["prompts_received"], 2);
    assert_eq!(state["prompts_accepted"], 1);
    assert_eq!(state["jobs_run"], 1);
    assert_eq!(state["current_job"], Value::Null);
    let r = t
        .post_json("/sim/fault", &json!({"fault": "explode"}))
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    t.sim.shutdown().await;
}

#[tokio::test]
async fn slow_view_delays_view() {
    let t = quick_sim().await;
    let id = t.queue_ok(&workflow("nomodel.json"), None).await;
    t.wait_history(&id).await;
    sim_fault(&t, json!({"fault": "slow_view", "ms": 1000})).await;
    let start = Instant::now();
    assert_eq!(
        t.get("/view?filename=nomodel_00001_.png").await.status(),
        StatusCode::OK
    );
    assert!(start.elapsed() >= Duration::from_millis(1000));
    t.sim.set_fault(Fault::SlowView { ms: 0 });
    let start = Instant::now();
    t.get("/view?filename=nomodel_00001_.png").await;
    assert!(start.elapsed() < Duration::from_millis(1000));
    t.sim.shutdown().await;
}

#[tokio::test]
async fn forget_history_acts_like_a_fresh_replica() {
    let t = spawn_sim(SimConfig {
        step_ms: 20,
        ..SimConfig::default()
    })
    .await;
    let done = t.queue_ok(&workflow("nomodel.json"), None).await;
    t.wait_history(&done).await;
    let running = t.queue_ok(&flux_workflow(60, 1, 32), None).await;
    t.wait_running(&running).await;
    let pending = t.queue_ok(&flux_workflow(2, 2, 32), None).await;
    let state = sim_fault(&t, json!({"fault": "forget_history"})).await;
    assert_eq!(state["queue_pending"], 0);
    assert_eq!(t.get_json("/history").await, json!({}));
    assert_eq!(t.get_json("/queue").await["queue_pending"], json!([]));
    // The running job still lands; the pending one is gone; numbering restarts.
    t.wait_history(&running).await;
    assert!(t.history_entry(&pending).await.is_none());
    assert!(t.history_entry(&done).await.is_none());
    let (_, body) = t.queue_prompt(&workflow("nomodel.json"), None).await;
    assert_eq!(body["number"], 0);
    t.sim.shutdown().await;
}

#[tokio::test]
async fn hang_accepts_but_never_answers_until_cleared() {
    let t = spawn_sim(SimConfig {
        step_ms: 10,
        ..SimConfig::default()
    })
    .await;
    let id = t.queue_ok(&flux_workflow(60, 5, 32), None).await;
    t.wait_node(&id, "11").await;
    t.sim.set_fault(Fault::Hang { for_ms: None });
    let r = t
        .http
        .get(t.url("/prompt"))
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(r.unwrap_err().is_timeout());
    // The job stops progressing while hung.
    let before = t.sim.state().current_job.unwrap().running_ms;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let s = t.sim.state();
    assert!(s.faults.hang);
    assert_eq!(s.current_job.as_ref().unwrap().prompt_id, id);
    assert!(s.jobs_succeeded == 0 && s.current_job.unwrap().running_ms > before);
    // /sim/state still answers, and clearing releases the waiting request.
    let pending = tokio::spawn({
        let http = t.http.clone();
        let url = t.url("/prompt");
        async move { http.get(url).send().await.unwrap().status() }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!pending.is_finished());
    sim_fault(&t, json!({"fault": "clear"})).await;
    assert_eq!(pending.await.unwrap(), StatusCode::OK);
    assert_eq!(t.wait_history(&id).await["status"]["status_str"], "success");
    // A timed hang clears itself.
    sim_fault(&t, json!({"fault": "hang", "for_ms": 150})).await;
    let start = Instant::now();
    assert_eq!(t.get("/prompt").await.status(), StatusCode::OK);
    assert!(start.elapsed() >= Duration::from_millis(100));
    t.sim.shutdown().await;
}

#[tokio::test]
async fn refuse_connections_closes_the_listener_and_reopens_it() {
    let t = quick_sim().await;
    let mut ws = t.ws(Some("r")).await;
    ws.next().await;
    t.sim.set_fault(Fault::RefuseConnections { for_ms: None });
    // The open socket is cut and new connections are refused.
    assert_eq!(ws.next_within(WAIT).await.unwrap_err(), WsEnd::Closed);
    let deadline = Instant::now() + WAIT;
    loop {
        match tokio::net::TcpStream::connect(t.sim.addr()).await {
            Err(e) => {
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
                break;
            }
            Ok(_) => {
                assert!(Instant::now() < deadline, "listener still accepting");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    let fresh = reqwest::Client::new();
    let err = fresh.get(t.url("/prompt")).send().await.unwrap_err();
    assert!(err.is_connect(), "{err}");
    assert!(t.sim.state().faults.refuse_connections);
    t.sim.clear_faults();
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(r) = fresh.get(t.url("/prompt")).send().await {
            assert_eq!(r.status(), StatusCode::OK);
            break;
        }
        assert!(Instant::now() < deadline, "listener never came back");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Timed refusal through the control endpoint.
    sim_fault(&t, json!({"fault": "refuse_connections", "for_ms": 200})).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(fresh.get(t.url("/prompt")).send().await.is_err());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        fresh.get(t.url("/prompt")).send().await.unwrap().status(),
        StatusCode::OK
    );
    t.sim.shutdown().await;
}

#[tokio::test]
async fn drop_websocket_cuts_sockets_mid_job_and_the_job_finishes() {
    let t = quick_sim().await;
    let mut ws = t.ws(Some("d")).await;
    ws.next().await;
    t.sim.set_fault(Fault::DropWebsocket);
    let id = t.queue_ok(&flux_workflow(5, 1, 32), Some("d")).await;
    let mut seen = Vec::new();
    let end = loop {
        match ws.next_within(WAIT).await {
            Ok(f) => seen.push(f.ty()),
            Err(e) => break e,
        }
    };
    assert_eq!(end, WsEnd::Closed);
    assert!(seen.contains(&"execution_start".to_string()), "{seen:?}");
    assert!(!seen.contains(&"execution_success".to_string()), "{seen:?}");
    // The job completes and is in history; the fault was one-shot.
    assert_eq!(t.wait_history(&id).await["status"]["status_str"], "success");
    assert!(!t.sim.state().faults.drop_websocket);
    let mut again = t.ws(Some("d")).await;
    assert_eq!(again.next_json().await["data"]["sid"], "d");
    t.sim.shutdown().await;
}

#[tokio::test]
async fn forget_next_history_drops_one_finished_job_from_the_history() {
    let t = quick_sim().await;
    let mut ws = t.ws(Some("f")).await;
    ws.next().await;
    t.sim.set_fault(Fault::ForgetNextHistory);
    assert!(t.sim.state().faults.forget_next_history);
    let id = t.queue_ok(&flux_workflow(5, 1, 32), Some("f")).await;
    let mut seen = Vec::new();
    loop {
        let f = ws.next_within(WAIT).await.unwrap();
        let end = f.ty() == "executing" && f.json().is_some_and(|v| v["data"]["node"].is_null());
        seen.push(f.ty());
        if end {
            break;
        }
    }
    // The socket told the whole run; the history does not have it; the fault was one-shot.
    assert!(seen.contains(&"executed".to_string()), "{seen:?}");
    assert!(seen.contains(&"execution_success".to_string()), "{seen:?}");
    let h: Value = reqwest::get(t.url(&format!("/history/{id}")))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(h, json!({}));
    assert!(!t.sim.state().faults.forget_next_history);
    let next = t.queue_ok(&flux_workflow(5, 2, 32), Some("f")).await;
    assert_eq!(
        t.wait_history(&next).await["status"]["status_str"],
        "success"
    );
    t.sim.shutdown().await;
}

#[tokio::test]
async fn die_mid_job_stops_the_server_abruptly() {
    let scratch = Scratch::new();
    let t = spawn_sim(SimConfig {
        step_ms: 10,
        data_dir: Some(scratch.0.clone()),
        ..SimConfig::default()
    })
    .await;
    let mut ws = t.ws(Some("x")).await;
    ws.next().await;
    sim_fault(&t, json!({"fault": "die_mid_job"})).await;
    let id = t.queue_ok(&flux_workflow(5, 1, 32), Some("x")).await;
    let end = loop {
        match ws.next_within(WAIT).await {
            Ok(f) => assert_ne!(f.ty(), "execution_success"),
            Err(e) => break e,
        }
    };
    assert_eq!(end, WsEnd::Closed);
    tokio::time::timeout(WAIT, t.sim.stopped()).await.unwrap();
    assert!(t.sim.is_dead());
    let fresh = reqwest::Client::new();
    assert!(
        fresh
            .get(t.url(&format!("/history/{id}")))
            .send()
            .await
            .unwrap_err()
            .is_connect()
    );
}

#[tokio::test]
async fn kill_cuts_everything_at_once() {
    let scratch = Scratch::new();
    let t = spawn_sim(SimConfig {
        step_ms: 20,
        data_dir: Some(scratch.0.clone()),
        ..SimConfig::default()
    })
    .await;
    let mut ws = t.ws(Some("k")).await;
    ws.next().await;
    let id = t.queue_ok(&flux_workflow(50, 1, 32), Some("k")).await;
    t.wait_running(&id).await;
    t.sim.kill();
    let end = loop {
        match ws.next_within(WAIT).await {
            Ok(_) => continue,
            Err(e) => break e,
        }
    };
    assert_eq!(end, WsEnd::Closed);
    assert!(
        reqwest::Client::new()
            .get(t.url("/prompt"))
            .send()
            .await
            .unwrap_err()
            .is_connect()
    );
}

#[tokio::test]
async fn control_listener_stays_reachable_while_refusing() {
    let t = quick_sim().await;
    let control = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let control_url = format!("http://{}", control.local_addr().unwrap());
    t.sim.serve_control(control);
    t.sim.set_fault(Fault::RefuseConnections { for_ms: None });
    let r = t
        .http
        .post(format!("{control_url}/sim/fault"))
        .json(&json!({"fault": "clear"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let state: Value = t
        .http
        .get(format!("{control_url}/sim/state"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(state["faults"]["refuse_connections"], false);
    t.sim.shutdown().await;
}

fn bin_with(args: &[&str]) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_comfyume-sim"))
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .env("RUST_LOG", "warn")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let url = loop {
        let line = lines.next().expect("binary printed its address").unwrap();
        if let Some(url) = line.strip_prefix("comfyume-sim: simulated ComfyUI (no GPU) at ") {
            break url.to_string();
        }
    };
    // Keep draining stderr so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (child, url)
}

fn wait_exit(child: &mut std::process::Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "binary did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn binary_dies_mid_job_and_stops_gracefully_on_sigterm() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::new();
    let scratch = Scratch::new();
    let data_dir = scratch.0.to_string_lossy().to_string();
    let (mut child, url) = bin_with(&[
        "--step-ms",
        "5",
        "--fault",
        "die-mid-job",
        "--data-dir",
        &data_dir,
    ]);
    let r = http
        .post(format!("{url}/prompt"))
        .json(&json!({"prompt": flux_workflow(5, 1, 32)}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(wait_exit(&mut child).code(), Some(137));

    let (mut child, url) = bin_with(&["--step-ms", "5"]);
    let stats: Value = http
        .get(format!("{url}/api/system_stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        stats["devices"][0]["name"],
        "comfyume-sim (simulated, no GPU)"
    );
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(wait_exit(&mut child).code(), Some(0));
}
