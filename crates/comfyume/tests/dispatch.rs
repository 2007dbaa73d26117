//! Jobs on GPU servers (issue 4), against the ComfyUI simulator: the
//! participant's socket speaks ComfyUI's sequence (traces/ws_owner.txt), the
//! output lands in their own folder, interrupts touch only their own job, and
//! backend faults (dropped socket, 500, death, forgetting, slowness, our own
//! restart) never lose or duplicate a job or an output.

use crate::helpers;

use std::time::Duration;

use comfyume_sim::Fault;
use helpers::{
    AppOptions, TestApp, Ws, assert_silent, backend_for, decode, eventually, is_end_of,
    messages_until, next_json, shared, sim_backend_slots, spawn_full, spawn_process, test_timeouts,
    workflow,
};
use serde_json::{Value, json};

const U1: &str = "user001";
const U2: &str = "user002";

/// `workflows/slow_blur.json` at 64×64: the simulated time of ImageBlur is
/// `blur_radius × step_ms` whatever the size, and the pixels stay cheap.
fn slow_blur() -> Value {
    let mut p = workflow("slow_blur.json");
    p["1"]["inputs"]["width"] = json!(64);
    p["1"]["inputs"]["height"] = json!(64);
    p
}

fn nomodel(color: u32) -> Value {
    let mut p = workflow("nomodel.json");
    p["1"]["inputs"]["color"] = json!(color);
    p
}

fn with_backends(backends: Vec<std::sync::Arc<dyn comfyume_dispatch::Backend>>) -> AppOptions {
    AppOptions {
        backends,
        ..Default::default()
    }
}

/// A connected tab whose greeting `status` was read.
async fn tab(app: &TestApp, user: &str, client_id: &str) -> Ws {
    let mut ws = app.ws(user, &format!("/ws?clientId={client_id}")).await;
    let hello = next_json(&mut ws).await;
    assert_eq!(hello["type"], "status", "{hello}");
    assert_eq!(hello["data"]["sid"], client_id);
    ws
}

/// The job's messages up to its end marker, within `secs`.
async fn until_end(ws: &mut Ws, id: &str, secs: u64) -> Vec<Value> {
    messages_until(ws, secs, |v| is_end_of(v, id)).await
}

/// One no-model job of user001's on a 2-slot simulator, with `fault` set just before it is
/// submitted: the simulator, the app, the job's id, and what the tab saw until its end.
async fn one_job_under(
    fault: Fault,
    color: u32,
) -> (comfyume_sim::SimHandle, TestApp, String, Vec<Value>) {
    let (sim, backend) = sim_backend_slots("gpu-a", 5, 2).await;
    let app = spawn_full(with_backends(vec![backend])).await;
    let mut ws = tab(&app, U1, "tab").await;
    sim.set_fault(fault);
    let id = app.submit(U1, "tab", &nomodel(color)).await;
    let msgs = until_end(&mut ws, &id, 15).await;
    (sim, app, id, msgs)
}

/// user001's job `id` succeeded (its tab saw it), is completed, and its one output is in the
/// participant's folder under the name the tab was given.
async fn assert_completed_with_its_output(app: &TestApp, id: &str, msgs: &[Value]) {
    assert!(
        msgs.iter().any(|m| m["type"] == "execution_success"),
        "{msgs:#?}"
    );
    assert_eq!(app.job_status(U1, id).await, "completed");
    assert_eq!(app.output_files(U1), executed_files(msgs));
    assert_eq!(app.output_files(U1).len(), 1);
}

/// Our own notices (type `comfyume`, ignored by the stock frontend), in order.
fn notices(msgs: &[Value]) -> Vec<String> {
    msgs.iter()
        .filter(|m| m["type"] == "comfyume")
        .map(|m| {
            m["data"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

/// `type`, plus the node for `executing`, of every ComfyUI message.
fn shape(msgs: &[Value]) -> Vec<String> {
    msgs.iter()
        .filter(|m| m["type"] != "comfyume")
        .map(|m| match m["type"].as_str().unwrap() {
            "executing" => format!("executing:{}", m["data"]["node"]),
            t => t.to_string(),
        })
        .collect()
}

/// Every file named by the `executed` messages, sorted.
fn executed_files(msgs: &[Value]) -> Vec<String> {
    let mut v: Vec<String> = msgs
        .iter()
        .filter(|m| m["type"] == "executed")
        .flat_map(|m| {
            m["data"]["output"]["images"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .map(|i| i["filename"].as_str().unwrap().to_string())
        .collect();
    v.sort();
    v
}

/// The simulator's history ids, in the order its one worker ran them.
async fn sim_history_order(sim_url: &str) -> Vec<String> {
    let v: Value = TestApp::client()
        .get(format!("{sim_url}/history"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v.as_object().unwrap().keys().cloned().collect()
}

#[tokio::test]
async fn the_owner_sees_comfyuis_sequence_and_gets_the_image() {
    let (sim, backend) = sim_backend_slots("gpu-a", 5, 2).await;
    let app = spawn_full(with_backends(vec![backend])).await;
    let mut ws = app.ws(U1, "/ws?clientId=ownerA").await;
    let mut other = tab(&app, U2, "ownerA").await;
    let hello = next_json(&mut ws).await;
    let id = app.submit(U1, "ownerA", &workflow("nomodel.json")).await;
    let mut msgs = vec![hello];
    msgs.extend(until_end(&mut ws, &id, 15).await);

    // The capture, reduced to the same shape.
    let trace = std::fs::read_to_string(shared("traces/ws_owner.txt")).unwrap();
    let captured: Vec<Value> = trace
        .lines()
        .filter_map(|l| {
            l.split_once(' ')
                .map(|(_, j)| serde_json::from_str(j).unwrap())
        })
        .collect();
    assert_eq!(
        shape(&msgs),
        shape(&captured),
        "ComfyUI's message sequence; got {msgs:#?}"
    );
    assert_eq!(msgs[0]["data"]["sid"], "ownerA");
    let remaining: Vec<u64> = msgs
        .iter()
        .filter(|m| m["type"] == "status")
        .map(|m| {
            m["data"]["status"]["exec_info"]["queue_remaining"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(remaining, [0, 1, 1, 0], "status counts as in the capture");
    // Our banner's line follows the job's start, so the progress UI gets it first.
    let at = |pred: &dyn Fn(&Value) -> bool| msgs.iter().position(pred);
    let started = at(&|m| m["type"] == "execution_start").expect("execution_start");
    let running = at(&|m| {
        m["type"] == "comfyume"
            && m["data"]["message"]
                .as_str()
                .is_some_and(|t| t.starts_with("Running on"))
    })
    .expect("the Running notice");
    assert_eq!(running, started + 1, "{msgs:#?}");
    for m in msgs
        .iter()
        .filter(|m| m["type"] != "status" && m["type"] != "comfyume")
    {
        assert_eq!(m["data"]["prompt_id"], id.as_str(), "{m}");
    }
    let last_progress = msgs
        .iter()
        .rev()
        .find(|m| m["type"] == "progress_state")
        .unwrap();
    for n in ["1", "2", "3"] {
        assert_eq!(
            last_progress["data"]["nodes"][n]["state"], "finished",
            "{last_progress}"
        );
    }
    for n in ["execution_start", "execution_cached", "execution_success"] {
        let m = msgs.iter().find(|m| m["type"] == n).unwrap();
        assert!(m["data"]["timestamp"].is_u64(), "{m}");
    }

    // The image of `executed` is the participant's own file.
    let executed = msgs.iter().find(|m| m["type"] == "executed").unwrap();
    assert_eq!(executed["data"]["node"], "3");
    let image = &executed["data"]["output"]["images"][0];
    assert_eq!(image["type"], "output");
    assert_eq!(image["subfolder"], "");
    let file = image["filename"].as_str().unwrap().to_string();
    assert_eq!(app.output_files(U1), std::slice::from_ref(&file));
    let view = format!("/api/view?filename={file}&subfolder=&type=output");
    let r = app.get(U1, &view).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type").as_deref(), Some("image/png"));
    assert!(r.body.starts_with(b"\x89PNG\r\n\x1a\n"));
    let img = decode(&r.body);
    assert_eq!((img.width(), img.height()), (64, 64));
    let r = app.get(U2, &view).await;
    assert_eq!(r.status, 404, "user002 cannot fetch user001's output");
    assert!(app.output_files(U2).is_empty());

    let h = app.get(U1, &format!("/api/history/{id}")).await.json();
    let entry = &h[&id];
    assert_eq!(entry["status"]["status_str"], "success");
    assert_eq!(entry["status"]["completed"], true);
    assert_eq!(
        entry["outputs"],
        json!({"3": {"images": [{"filename": file, "subfolder": "", "type": "output"}]}})
    );
    let kinds: Vec<&str> = entry["status"]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m[0].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["execution_start", "execution_cached", "execution_success"]
    );
    let job = app.get(U1, &format!("/api/jobs/{id}")).await.json();
    assert_eq!(job["status"], "completed");
    assert_eq!(job["outputs_count"], 1);
    assert_eq!(job["preview_output"]["filename"], file.as_str());
    assert!(job["execution_start_time"].as_i64() <= job["execution_end_time"].as_i64());

    assert_silent(&mut other, 100).await;
    let st = sim.state();
    assert_eq!((st.prompts_received, st.jobs_run), (1, 1));
    sim.shutdown().await;
}

#[tokio::test]
async fn a_runtime_error_reaches_the_owner_and_is_not_retried() {
    let (sim, backend) = sim_backend_slots("gpu-a", 5, 2).await;
    let app = spawn_full(with_backends(vec![backend])).await;
    let mut ws = tab(&app, U1, "tab").await;
    let id = app.submit(U1, "tab", &workflow("runtime_error.json")).await;
    let msgs = until_end(&mut ws, &id, 15).await;
    let err = msgs
        .iter()
        .find(|m| m["type"] == "execution_error")
        .unwrap_or_else(|| panic!("an execution_error: {msgs:#?}"));
    let d = &err["data"];
    assert_eq!(d["prompt_id"], id.as_str());
    assert_eq!(d["node_id"], "2");
    assert_eq!(d["node_type"], "ImageScaleBy");
    assert_eq!(d["executed"], json!(["1"]));
    assert_eq!(d["exception_type"], "RuntimeError");
    assert!(
        d["exception_message"]
            .as_str()
            .unwrap()
            .contains("greater than 0"),
        "{d}"
    );
    assert!(
        d["traceback"].is_array()
            && d["current_inputs"].is_object()
            && d["current_outputs"].is_array(),
        "{d}"
    );
    assert!(d["timestamp"].is_u64());
    // Then, as ComfyUI: status and the end marker.
    let n = msgs.len();
    assert_eq!(msgs[n - 2]["type"], "status");
    assert_eq!(
        msgs[n - 2]["data"]["status"]["exec_info"]["queue_remaining"],
        0
    );
    assert!(
        notices(&msgs)
            .iter()
            .all(|m| !m.to_lowercase().contains("retry")),
        "{msgs:#?}"
    );

    let h = app.get(U1, &format!("/api/history/{id}")).await.json();
    assert_eq!(h[&id]["status"]["status_str"], "error");
    assert_eq!(h[&id]["status"]["completed"], false);
    let job = app.get(U1, &format!("/api/jobs/{id}")).await.json();
    assert_eq!(job["status"], "failed");
    assert_eq!(job["execution_error"]["node_type"], "ImageScaleBy", "{job}");
    let st = sim.state();
    assert_eq!(
        (st.prompts_received, st.jobs_run),
        (1, 1),
        "a workflow error is not retried"
    );
    assert!(app.output_files(U1).is_empty());
    sim.shutdown().await;
}

#[tokio::test]
async fn interrupts_stop_only_the_callers_own_job() {
    let (sim, backend) = sim_backend_slots("gpu-a", 25, 2).await;
    let app = spawn_full(with_backends(vec![backend])).await;
    let mut ws = tab(&app, U1, "tab").await;

    // user002 tries both kinds of interrupt while user001's blur runs.
    let first = app.submit(U1, "tab", &slow_blur()).await;
    messages_until(&mut ws, 10, |v| {
        v["type"] == "executing" && v["data"]["node"] == "2"
    })
    .await;
    for body in [
        Vec::new(),
        b"{}".to_vec(),
        serde_json::to_vec(&json!({"prompt_id": first})).unwrap(),
    ] {
        let r = app.post(U2, "/api/interrupt", body).await;
        assert_eq!(r.status, 200);
        assert!(r.body.is_empty());
    }
    let msgs = until_end(&mut ws, &first, 15).await;
    assert!(
        msgs.iter().any(|m| m["type"] == "execution_success"),
        "{msgs:#?}"
    );
    let saved = executed_files(&msgs);
    assert_eq!(saved.len(), 2, "slow_blur saves a batch of two");
    assert!(!msgs.iter().any(|m| m["type"] == "execution_interrupted"));
    assert_eq!(app.job_status(U1, &first).await, "completed");
    assert_eq!(sim.state().jobs_interrupted, 0);

    // The owner's interrupt by prompt id stops it at the next node.
    let second = app
        .submit(U1, "tab", &{
            let mut p = slow_blur();
            p["1"]["inputs"]["color"] = json!(7);
            p
        })
        .await;
    messages_until(&mut ws, 10, |v| {
        v["type"] == "executing" && v["data"]["node"] == "2"
    })
    .await;
    let r = app
        .post_json(U1, "/api/interrupt", &json!({"prompt_id": second}))
        .await;
    assert_eq!(r.status, 200);
    let msgs = until_end(&mut ws, &second, 15).await;
    let int = msgs
        .iter()
        .find(|m| m["type"] == "execution_interrupted")
        .unwrap_or_else(|| panic!("execution_interrupted: {msgs:#?}"));
    assert_eq!(int["data"]["prompt_id"], second.as_str());
    assert_eq!(int["data"]["node_id"], "3");
    assert_eq!(int["data"]["node_type"], "ImageInvert");
    assert!(
        !msgs
            .iter()
            .any(|m| m["type"] == "execution_error" || m["type"] == "execution_success")
    );
    assert_eq!(app.job_status(U1, &second).await, "cancelled");
    let h = app.get(U1, &format!("/api/history/{second}")).await.json();
    assert_eq!(h[&second]["status"]["status_str"], "error");
    assert_eq!(
        app.output_files(U1),
        saved,
        "only the first job saved images"
    );
    let st = sim.state();
    assert_eq!((st.jobs_interrupted, st.prompts_received), (1, 2));
    sim.shutdown().await;
}

#[tokio::test]
async fn a_job_waiting_on_the_gpu_can_be_stopped_by_its_owner_only() {
    let (sim, backend) = sim_backend_slots("gpu-a", 25, 2).await;
    let app = spawn_full(with_backends(vec![backend])).await;
    let mut ws1 = tab(&app, U1, "tab").await;
    let mut ws2 = tab(&app, U2, "tab").await;
    let running = app.submit(U1, "tab", &slow_blur()).await;
    messages_until(&mut ws1, 10, |v| {
        v["type"] == "executing" && v["data"]["node"] == "2"
    })
    .await;
    // Handed over in advance: queued on the GPU server behind user001's.
    let waiting = app.submit(U2, "tab", &nomodel(11)).await;
    assert!(eventually(5000, || sim.state().queue_pending == 1).await);
    let r = app.post(U2, "/api/interrupt", Vec::new()).await;
    assert_eq!(r.status, 200);
    let msgs = until_end(&mut ws2, &waiting, 10).await;
    let int = msgs
        .iter()
        .find(|m| m["type"] == "execution_interrupted")
        .unwrap_or_else(|| panic!("execution_interrupted: {msgs:#?}"));
    assert_eq!(int["data"]["prompt_id"], waiting.as_str());
    assert_eq!(app.job_status(U2, &waiting).await, "cancelled");
    assert_eq!(
        sim.state().queue_pending,
        0,
        "taken off the GPU server's queue"
    );
    // user001's job, running meanwhile, is untouched.
    let msgs = until_end(&mut ws1, &running, 15).await;
    assert!(
        msgs.iter().any(|m| m["type"] == "execution_success"),
        "{msgs:#?}"
    );
    assert_eq!(app.job_status(U1, &running).await, "completed");
    let st = sim.state();
    assert_eq!((st.jobs_run, st.jobs_interrupted), (1, 0));
    assert!(app.output_files(U2).is_empty());
    sim.shutdown().await;
}

#[tokio::test]
async fn a_dropped_backend_socket_does_not_lose_the_job() {
    let (sim, app, id, msgs) = one_job_under(Fault::DropWebsocket, 1).await;
    assert!(!sim.state().faults.drop_websocket, "the fault fired");
    assert!(
        msgs.iter().any(|m| m["type"] == "executed"),
        "the output still reached the tab: {msgs:#?}"
    );
    assert_completed_with_its_output(&app, &id, &msgs).await;
    assert_eq!(
        sim.state().prompts_received,
        1,
        "followed up, not resubmitted"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn a_500_from_prompt_is_retried_and_the_participant_is_told() {
    let (sim, backend) = sim_backend_slots("gpu-a", 5, 2).await;
    let app = spawn_full(with_backends(vec![backend])).await;
    let mut ws = tab(&app, U1, "tab").await;
    sim.set_fault(Fault::PromptError);
    let id = app.submit(U1, "tab", &nomodel(2)).await;
    assert!(eventually(5000, || sim.state().prompts_received >= 1).await);
    sim.clear_faults();
    let msgs = until_end(&mut ws, &id, 15).await;
    let told = notices(&msgs);
    assert!(
        told.iter().any(|m| m.to_lowercase().contains("retrying")),
        "a retry notice: {told:?}"
    );
    assert!(
        msgs.iter().any(|m| m["type"] == "execution_success"),
        "{msgs:#?}"
    );
    assert_eq!(app.job_status(U1, &id).await, "completed");
    assert_eq!(app.output_files(U1).len(), 1);
    assert_eq!(sim.state().prompts_accepted, 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_dead_backend_hands_the_job_to_a_healthy_one() {
    let (dying, b1) = sim_backend_slots("gpu-a", 5, 1).await;
    let (healthy, b2) = sim_backend_slots("gpu-b", 5, 1).await;
    let app = spawn_full(with_backends(vec![b1, b2])).await;
    let mut ws = tab(&app, U1, "tab").await;
    // The first job goes to the first idle backend, which dies inside it.
    dying.set_fault(Fault::DieMidJob);
    let id = app.submit(U1, "tab", &nomodel(3)).await;
    let msgs = until_end(&mut ws, &id, 20).await;
    assert!(dying.is_dead());
    assert!(
        msgs.iter().any(|m| m["type"] == "execution_success"),
        "{msgs:#?}"
    );
    assert!(
        notices(&msgs)
            .iter()
            .any(|m| m.to_lowercase().contains("retrying")),
        "{msgs:#?}"
    );
    assert_eq!(app.job_status(U1, &id).await, "completed");
    assert_eq!(healthy.state().jobs_succeeded, 1);
    assert_eq!(app.output_files(U1).len(), 1);
    // And the next job does not go to the dead one either.
    let next = app.submit(U1, "tab", &nomodel(4)).await;
    let msgs = until_end(&mut ws, &next, 20).await;
    assert!(
        notices(&msgs)
            .iter()
            .all(|m| !m.to_lowercase().contains("retrying")),
        "{msgs:#?}"
    );
    assert_eq!(healthy.state().jobs_succeeded, 2);
    assert_eq!(app.job_status(U1, &next).await, "completed");
    assert_eq!(app.output_files(U1).len(), 2);
    healthy.shutdown().await;
}

#[tokio::test]
async fn a_job_failing_on_every_attempt_fails_with_a_readable_reason() {
    let (sim, backend) = sim_backend_slots("gpu-a", 5, 2).await;
    let dispatch = comfyume_dispatch::DispatchConfig {
        max_attempts: 2,
        ..Default::default()
    };
    let app = spawn_full(AppOptions {
        backends: vec![backend],
        dispatch,
        ..Default::default()
    })
    .await;
    let mut ws = tab(&app, U1, "tab").await;
    sim.set_fault(Fault::PromptError);
    let id = app.submit(U1, "tab", &nomodel(5)).await;
    let msgs = until_end(&mut ws, &id, 20).await;
    let err = msgs
        .iter()
        .find(|m| m["type"] == "execution_error")
        .unwrap_or_else(|| panic!("execution_error: {msgs:#?}"));
    let text = err["data"]["exception_message"].as_str().unwrap();
    assert!(
        text.contains("2 attempts") && text.contains("500"),
        "readable: {text}"
    );
    assert_eq!(err["data"]["prompt_id"], id.as_str());
    assert_eq!(
        notices(&msgs)
            .iter()
            .filter(|m| m.to_lowercase().contains("retrying"))
            .count(),
        1
    );
    assert_eq!(app.job_status(U1, &id).await, "failed");
    let job = app.get(U1, &format!("/api/jobs/{id}")).await.json();
    assert!(
        job["execution_error"]["exception_message"]
            .as_str()
            .unwrap()
            .contains("2 attempts"),
        "{job}"
    );
    assert_eq!(
        sim.state().prompts_received,
        2,
        "exactly MAX_ATTEMPTS tries"
    );
    assert!(app.output_files(U1).is_empty());
    sim.shutdown().await;
}

#[tokio::test]
async fn a_backend_that_forgets_a_waiting_job_gets_it_again() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim = comfyume_sim::spawn(
        comfyume_sim::SimConfig {
            step_ms: 25,
            ..Default::default()
        },
        listener,
    )
    .await;
    let mut t = test_timeouts();
    t.silence = Duration::from_millis(800);
    let app = spawn_full(with_backends(vec![backend_for(&sim, "gpu-a", 2, t)])).await;
    let mut ws1 = tab(&app, U1, "tab").await;
    let mut ws2 = tab(&app, U2, "tab").await;
    let running = app.submit(U1, "tab", &slow_blur()).await;
    messages_until(&mut ws1, 10, |v| {
        v["type"] == "executing" && v["data"]["node"] == "2"
    })
    .await;
    let waiting = app.submit(U2, "tab", &nomodel(6)).await;
    assert!(
        eventually(5000, || sim.state().queue_pending == 1).await,
        "handed over in advance"
    );
    sim.set_fault(Fault::ForgetHistory);
    let msgs = until_end(&mut ws2, &waiting, 20).await;
    assert!(
        notices(&msgs)
            .iter()
            .any(|m| m.to_lowercase().contains("retrying")),
        "{msgs:#?}"
    );
    assert!(
        msgs.iter().any(|m| m["type"] == "execution_success"),
        "{msgs:#?}"
    );
    let first = until_end(&mut ws1, &running, 20).await;
    assert_eq!(app.job_status(U1, &running).await, "completed");
    assert_eq!(app.job_status(U2, &waiting).await, "completed");
    assert_eq!(app.output_files(U1), executed_files(&first));
    assert_eq!(app.output_files(U2), executed_files(&msgs));
    assert_eq!(app.output_files(U2).len(), 1);
    assert_eq!(sim.state().prompts_accepted, 3);
    sim.shutdown().await;
}

/// The GPU server ends the job and then loses its history (a restart right after it): the
/// participant's job is done with its output, and not run a second time elsewhere.
#[tokio::test]
async fn a_job_whose_history_the_gpu_server_lost_after_it_ended_is_not_run_again() {
    let (sim, app, id, msgs) = one_job_under(Fault::ForgetNextHistory, 8).await;
    assert_completed_with_its_output(&app, &id, &msgs).await;
    assert_eq!(sim.state().prompts_accepted, 1, "run once");
    sim.shutdown().await;
}

#[tokio::test]
async fn slow_downloads_still_deliver_the_output() {
    let (sim, app, id, msgs) = one_job_under(Fault::SlowView { ms: 400 }, 8).await;
    let file = msgs.iter().find(|m| m["type"] == "executed").unwrap()["data"]["output"]["images"]
        [0]["filename"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(app.output_files(U1), std::slice::from_ref(&file));
    let r = app.get(U1, &format!("/api/view?filename={file}")).await;
    assert_eq!(r.status, 200);
    decode(&r.body);
    assert_eq!(app.job_status(U1, &id).await, "completed");
    sim.shutdown().await;
}

/// user001's no-model job on a simulator whose `/view` answers after 1.5 s, followed until
/// its result is announced: the simulator, the app, the tab, the job's id and the file named.
async fn announced_while_copying(
    color: u32,
) -> (comfyume_sim::SimHandle, TestApp, Ws, String, String) {
    let (sim, backend) = sim_backend_slots("gpu-a", 5, 2).await;
    let app = spawn_full(with_backends(vec![backend])).await;
    let mut ws = tab(&app, U1, "tab").await;
    sim.set_fault(Fault::SlowView { ms: 1500 });
    let id = app.submit(U1, "tab", &nomodel(color)).await;
    let seen = messages_until(&mut ws, 15, |v| v["type"] == "executed").await;
    let file = executed_files(&seen).remove(0);
    (sim, app, ws, id, file)
}

/// The participant hears of a result as soon as the GPU server names it, while its copy
/// into their folder is still under way: `/view` asked meanwhile waits for the copy and
/// answers the complete image, never a 404 or a partial file.
#[tokio::test]
async fn a_result_is_announced_before_its_copy_and_view_waits_for_it() {
    let (sim, app, mut ws, id, file) = announced_while_copying(31).await;
    // The copy waits on the GPU server's slow answer: not in the folder yet.
    assert!(
        app.output_files(U1).is_empty(),
        "{:?}",
        app.output_files(U1)
    );
    let r = app
        .get(
            U1,
            &format!("/api/view?filename={file}&type=output&subfolder="),
        )
        .await;
    assert_eq!(r.status, 200);
    decode(&r.body);
    assert_eq!(app.output_files(U1), std::slice::from_ref(&file));
    let rest = until_end(&mut ws, &id, 15).await;
    assert!(
        rest.iter().any(|m| m["type"] == "execution_success"),
        "{rest:#?}"
    );
    assert_eq!(app.job_status(U1, &id).await, "completed");
    // Another participant never gets it.
    let r = app
        .get(U2, &format!("/api/view?filename={file}&type=output"))
        .await;
    assert_eq!(r.status, 404);
    sim.shutdown().await;
}

/// A copy that fails after the result was announced: `/view` of the announced name
/// answers 404 (it does not wait out its limit), and nothing half-written is left.
#[tokio::test]
async fn a_result_whose_copy_fails_is_a_404_and_leaves_no_file() {
    let (sim, app, _ws, _id, file) = announced_while_copying(32).await;
    // The GPU server goes away mid-copy.
    sim.set_fault(Fault::RefuseConnections { for_ms: None });
    let r = tokio::time::timeout(
        Duration::from_secs(30),
        app.get(
            U1,
            &format!("/api/view?filename={file}&type=output&subfolder="),
        ),
    )
    .await
    .expect("answered without waiting out the limit");
    assert_eq!(r.status, 404);
    assert!(
        app.output_files(U1).is_empty(),
        "{:?}",
        app.output_files(U1)
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn two_participants_at_once_never_mix_events_or_files() {
    let (sim_a, a) = sim_backend_slots("gpu-a", 10, 1).await;
    let (sim_b, b) = sim_backend_slots("gpu-b", 10, 1).await;
    let app = spawn_full(with_backends(vec![a, b])).await;
    // Both tabs use the same client id: routing must still go by participant.
    let mut ws1 = tab(&app, U1, "tab").await;
    let mut ws2 = tab(&app, U2, "tab").await;
    let mut p = slow_blur();
    p["2"]["inputs"]["blur_radius"] = json!(15);
    let (id1, id2) = tokio::join!(app.submit(U1, "tab", &p), app.submit(U2, "tab", &p));
    let (m1, m2) = tokio::join!(until_end(&mut ws1, &id1, 15), until_end(&mut ws2, &id2, 15));
    for (msgs, mine, theirs) in [(&m1, &id1, &id2), (&m2, &id2, &id1)] {
        for m in msgs.iter() {
            assert!(
                !m.to_string().contains(theirs.as_str()),
                "another participant's event: {m}"
            );
            if let Some(p) = m["data"]["prompt_id"].as_str() {
                assert_eq!(p, mine.as_str(), "{m}");
            }
        }
        assert!(msgs.iter().any(|m| m["type"] == "execution_success"));
    }
    // Ran side by side, one per GPU, and each image went to its owner only.
    assert_eq!((sim_a.state().jobs_run, sim_b.state().jobs_run), (1, 1));
    let f1 = app.output_files(U1);
    let f2 = app.output_files(U2);
    assert_eq!((f1.len(), f2.len()), (2, 2), "{f1:?} {f2:?}");
    assert_eq!(f1, executed_files(&m1));
    assert_eq!(f2, executed_files(&m2));
    assert_silent(&mut ws1, 100).await;
    assert_silent(&mut ws2, 50).await;
    sim_a.shutdown().await;
    sim_b.shutdown().await;
}

#[tokio::test]
async fn round_robin_lets_a_second_participant_in_early() {
    let (sim, backend) = sim_backend_slots("gpu-a", 20, 1).await;
    let mut queue = helpers::queue_cfg();
    queue.policy = comfyume_scheduler::Policy::RoundRobin;
    let app = spawn_full(AppOptions {
        backends: vec![backend],
        queue,
        ..Default::default()
    })
    .await;
    // user001's first job is slow, so the burst is queued behind it.
    let mut first = slow_blur();
    first["2"]["inputs"]["blur_radius"] = json!(15);
    let mut mine = vec![app.submit(U1, "tab", &first).await];
    for n in 1..6 {
        mine.push(app.submit(U1, "tab", &nomodel(n)).await);
    }
    let theirs = app.submit(U2, "tab", &nomodel(100)).await;
    for id in &mine {
        app.wait_job(U1, id, &["completed"], 20).await;
    }
    app.wait_job(U2, &theirs, &["completed"], 20).await;
    // One slot: the simulator ran them in the order the scheduler handed them over.
    let order = sim_history_order(&sim.url()).await;
    assert_eq!(order.len(), 7);
    let pos = |id: &str| order.iter().position(|x| x == id).unwrap();
    assert!(
        pos(&theirs) < pos(&mine[2]),
        "user002's job must start before user001's third: {order:?} (user002: {theirs})"
    );
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_running_when_the_server_dies_is_reattached_and_completes_once() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim = comfyume_sim::spawn(
        comfyume_sim::SimConfig {
            step_ms: 40,
            ..Default::default()
        },
        listener,
    )
    .await;
    let server = spawn_process(with_backends(vec![backend_for(
        &sim,
        "gpu-a",
        1,
        test_timeouts(),
    )]));
    let mut ws = tab(server.app(), U1, "tab").await;
    let id = server.app().submit(U1, "tab", &slow_blur()).await;
    messages_until(&mut ws, 10, |v| {
        v["type"] == "executing" && v["data"]["node"] == "2"
    })
    .await;
    let dir = server.kill();
    assert!(
        sim.state().current_job.is_some(),
        "the GPU is still working on it"
    );

    let app = spawn_full(AppOptions {
        reuse: Some(dir),
        ..with_backends(vec![backend_for(&sim, "gpu-a", 1, test_timeouts())])
    })
    .await;
    assert!(
        sim.state().current_job.is_some(),
        "still running when the new server took it back (else this tests collection only)"
    );
    app.wait_job(U1, &id, &["completed", "failed", "cancelled"], 20)
        .await;
    assert_eq!(app.job_status(U1, &id).await, "completed");
    let st = sim.state();
    assert_eq!(
        (st.prompts_received, st.jobs_run),
        (1, 1),
        "re-attached, never submitted again"
    );
    let files = app.output_files(U1);
    assert_eq!(files.len(), 2, "one batch of two, fetched once: {files:?}");
    let h = app.get(U1, &format!("/api/history/{id}")).await.json();
    let mut listed: Vec<String> = h[&id]["outputs"]["4"]["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["filename"].as_str().unwrap().to_string())
        .collect();
    listed.sort();
    assert_eq!(listed, files);
    sim.shutdown().await;
}
