//! The provider emulator as the app server meets it: the real `comfyume-provider`
//! binary in front of real `comfyume-worker` replicas (each with its `comfyume-sim`),
//! started and stopped as processes.

use std::process::Stdio;
use std::time::Duration;

use comfyume_wire::worker::SseParser;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

#[path = "../../../tests/support/workspace_bin.rs"]
mod workspace_bin;
use workspace_bin::workspace_bin;

/// The emulator process; it and every replica it started are killed when dropped (they
/// share its process group).
struct Provider {
    child: Child,
    url: String,
    _data: tempfile::TempDir,
}

impl Drop for Provider {
    fn drop(&mut self) {
        if let Some(pid) = self
            .child
            .id()
            .and_then(|p| rustix::process::Pid::from_raw(p as i32))
        {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
    }
}

async fn provider(args: &[&str]) -> Provider {
    let data = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_comfyume-provider"));
    cmd.args(["--listen", "127.0.0.1:0", "--health-interval-ms", "100"])
        .arg("--worker-bin")
        .arg(workspace_bin(
            "comfyume-worker",
            "comfyume-worker",
            &["worker", "comfyui", "wire"],
        ))
        .arg("--sim-bin")
        .arg(workspace_bin(
            "comfyume-sim",
            "comfyume-sim",
            &["sim", "wire"],
        ))
        .arg("--data-dir")
        .arg(data.path())
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("the emulator prints its address")
        .unwrap()
        .unwrap();
    let url = first
        .strip_prefix("comfyume-provider listening on ")
        .unwrap()
        .to_owned();
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Provider {
        child,
        url,
        _data: data,
    }
}

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().no_proxy().build().unwrap()
}

fn sampler(steps: u32) -> Value {
    json!({
        "3": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": steps, "cfg": 8, "sampler_name": "euler", "scheduler": "normal", "denoise": 1, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly-fp16.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a bottle", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}}
    })
}

fn job(id: &str, steps: u32) -> Value {
    json!({"job_id": id, "prompt": sampler(steps)})
}

async fn run(p: &Provider, dep: &str, body: &Value) -> reqwest::Response {
    client()
        .post(format!("{}/{dep}/run", p.url))
        .header("accept", "text/event-stream")
        .header("x-inference-id", body["job_id"].as_str().unwrap())
        .json(body)
        .send()
        .await
        .unwrap()
}

/// Reads a re-framed stream, checking that every event is `event:response` followed by
/// one `data:` line of JSON.
struct Reframed {
    resp: reqwest::Response,
    parser: SseParser,
    raw: Vec<u8>,
    pending: std::collections::VecDeque<Value>,
    /// The stream broke (as opposed to ending).
    pub broken: bool,
}

impl Reframed {
    fn new(resp: reqwest::Response) -> Self {
        assert_eq!(resp.status(), 200);
        Reframed {
            resp,
            parser: SseParser::new(64 << 20),
            raw: Vec::new(),
            pending: Default::default(),
            broken: false,
        }
    }

    fn check_framing(&mut self) {
        // Whole events only: `event:response\ndata:{...}\n\n`.
        while let Some(end) = find(&self.raw, b"\n\n") {
            let block: Vec<u8> = self.raw.drain(..end + 2).collect();
            let text = std::str::from_utf8(&block).unwrap();
            let mut lines = text.trim_end_matches('\n').split('\n');
            assert_eq!(lines.next(), Some("event:response"), "{text:.200}");
            let data = lines.next().unwrap().strip_prefix("data:").unwrap();
            assert!(serde_json::from_str::<Value>(data).unwrap().is_object());
            assert_eq!(lines.next(), None, "one data line per event");
        }
    }

    async fn next(&mut self) -> Option<Value> {
        loop {
            if let Some(v) = self.pending.pop_front() {
                if v["type"] == "keepalive" {
                    continue;
                }
                return Some(v);
            }
            let chunk = match self.resp.chunk().await {
                Ok(Some(c)) => c,
                Ok(None) => return None,
                Err(_) => {
                    self.broken = true;
                    return None;
                }
            };
            self.raw.extend_from_slice(&chunk);
            self.check_framing();
            for ev in self.parser.feed(&chunk).unwrap() {
                assert_eq!(ev.event.as_deref(), Some("response"));
                self.pending
                    .push_back(serde_json::from_str(&ev.data).unwrap());
            }
        }
    }

    async fn until(&mut self, kind: &str) -> Vec<Value> {
        let mut out = Vec::new();
        loop {
            let v = tokio::time::timeout(Duration::from_secs(60), self.next())
                .await
                .expect("an event in time")
                .unwrap_or_else(|| panic!("stream ended before {kind}: {out:?}"));
            let done = v["type"] == kind;
            out.push(v);
            if done {
                return out;
            }
        }
    }

    async fn rest(&mut self) -> Vec<Value> {
        let mut out = Vec::new();
        while let Some(v) = tokio::time::timeout(Duration::from_secs(60), self.next())
            .await
            .expect("the stream moves")
        {
            out.push(v);
        }
        out
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

async fn events(p: &Provider) -> Vec<Value> {
    client()
        .get(format!("{}/_emulator/events", p.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// `(replica, event)` pairs of the lifecycle log.
async fn lifecycle(p: &Provider) -> Vec<(String, String)> {
    events(p)
        .await
        .iter()
        .map(|e| {
            (
                e["replica"].as_str().unwrap().to_owned(),
                e["event"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

async fn wait_event(p: &Provider, replica: &str, event: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if lifecycle(p)
            .await
            .iter()
            .any(|(r, e)| r == replica && e == event)
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {event} for {replica}: {:?}",
            lifecycle(p).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn final_of(events: &[Value]) -> Option<&Value> {
    events
        .iter()
        .find(|e| matches!(e["type"].as_str(), Some("result" | "error" | "aborted")))
}

#[tokio::test]
async fn a_cold_start_from_zero_then_the_job_is_served_through_the_reframed_stream() {
    let p = provider(&[
        "--deployment",
        "h200-spot:spot=true,max_replicas=1,cold_start_ms=1500",
        "--step-ms",
        "20",
        "--inference-key",
        "inf-key",
        "--replica-env",
        "WORKER_TOKEN=worker-secret",
    ])
    .await;
    // Without the inference key: refused at the gateway.
    let r = client()
        .post(format!("{}/h200-spot/run", p.url))
        .json(&job("j0", 2))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(
        lifecycle(&p).await.is_empty(),
        "no replica for a refused request"
    );

    let r = client()
        .post(format!("{}/h200-spot/run", p.url))
        .bearer_auth("inf-key")
        // The gateway keeps the inference key; the worker's token travels on its own.
        .header("x-worker-token", "worker-secret")
        .header("accept", "text/event-stream")
        .json(&job("j1", 4))
        .send()
        .await
        .unwrap();
    let mut s = Reframed::new(r);
    let all = s.rest().await;
    assert!(!s.broken);
    let last = final_of(&all).unwrap();
    assert_eq!(last["type"], "result", "{last}");
    assert_eq!(all.last(), Some(last), "nothing after the final event");

    let log = events(&p).await;
    let replica = all[0]["worker"].as_str().unwrap();
    let t = |ev: &str| {
        log.iter()
            .find(|e| e["replica"] == replica && e["event"] == ev)
            .unwrap_or_else(|| panic!("no {ev} in {log:?}"))["t_ms"]
            .as_u64()
            .unwrap()
    };
    assert!(t("provisioning") + 1500 <= t("process_started"), "{log:?}");
    assert!(t("process_started") <= t("ready"));
}

#[tokio::test]
async fn two_requests_run_on_two_replicas() {
    let p = provider(&[
        "--deployment",
        "h200-on-demand:max_replicas=2,cold_start_ms=0",
        "--step-ms",
        "100",
    ])
    .await;
    let (ja, jb) = (job("a", 10), job("b", 10));
    let (a, b) = tokio::join!(
        run(&p, "h200-on-demand", &ja),
        run(&p, "h200-on-demand", &jb)
    );
    let (mut a, mut b) = (Reframed::new(a), Reframed::new(b));
    let (ea, eb) = tokio::join!(a.rest(), b.rest());
    assert_eq!(final_of(&ea).unwrap()["type"], "result");
    assert_eq!(final_of(&eb).unwrap()["type"], "result");
    assert_ne!(ea[0]["worker"], eb[0]["worker"], "one replica each");
    let started = lifecycle(&p)
        .await
        .iter()
        .filter(|(_, e)| e == "process_started")
        .count();
    assert_eq!(started, 2);
}

#[tokio::test]
async fn spot_eviction_mid_job_cuts_the_stream_without_a_final_event() {
    let p = provider(&[
        "--deployment",
        "h200-spot:spot=true,max_replicas=1,cold_start_ms=0",
        "--deployment",
        "h200-on-demand:max_replicas=1",
        "--step-ms",
        "100",
    ])
    .await;
    let mut s = Reframed::new(run(&p, "h200-spot", &job("ev-1", 200)).await);
    let seen = s.until("started").await;
    let replica = seen[0]["worker"].as_str().unwrap().to_owned();
    let state: Value = client()
        .get(format!("{}/_emulator/state", p.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let pid = state["deployments"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "h200-spot")
        .unwrap()["replicas"][0]["pid"]
        .as_u64()
        .unwrap();

    // Not on an on-demand deployment.
    let r = client()
        .post(format!("{}/_emulator/evict", p.url))
        .json(&json!({"deployment": "h200-on-demand"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let r = client()
        .post(format!("{}/_emulator/evict", p.url))
        .json(&json!({"deployment": "h200-spot"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["evicted"], replica.as_str());

    let rest = s.rest().await;
    assert!(final_of(&rest).is_none(), "no final event: {rest:?}");
    assert!(s.broken, "the stream broke rather than ended");
    wait_event(&p, &replica, "exited").await;
    let log = lifecycle(&p).await;
    assert!(
        !log.iter().any(|(_, e)| e == "sigterm"),
        "no notice: {log:?}"
    );
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .unwrap_or_default()
                .contains(") Z ")
    );
}

#[tokio::test]
async fn a_scale_down_mid_job_sends_sigterm_and_the_workers_aborted_reaches_the_caller() {
    let p = provider(&[
        "--deployment",
        "b300-on-demand:max_replicas=1,cold_start_ms=0,scale_down_delay_ms=500,grace_ms=30000",
        "--step-ms",
        "100",
        "--replica-env",
        "WORKER_ABORT_AFTER_SECS=1",
    ])
    .await;
    let mut s = Reframed::new(run(&p, "b300-on-demand", &job("sd-1", 300)).await);
    let seen = s.until("started").await;
    let replica = seen[0]["worker"].as_str().unwrap().to_owned();
    // The queue is empty: after the scale-down delay the busy replica gets SIGTERM.
    let rest = s.rest().await;
    let last = final_of(&rest).expect("a final event");
    assert_eq!(last["type"], "aborted", "{last}");
    assert_eq!(last["reason"], "sigterm");
    wait_event(&p, &replica, "exited").await;
    let log: Vec<String> = lifecycle(&p)
        .await
        .into_iter()
        .filter(|(r, _)| *r == replica)
        .map(|(_, e)| e)
        .collect();
    let pos = |e: &str| log.iter().position(|x| x == e).unwrap();
    assert!(pos("ready") < pos("scale_down"), "{log:?}");
    assert!(pos("scale_down") < pos("sigterm"));
    assert!(pos("sigterm") < pos("exited"));
    assert!(
        !log.contains(&"sigkill".to_owned()),
        "it exited within the grace"
    );
}

#[tokio::test]
async fn the_request_ttl_cuts_a_long_stream_and_expires_a_queued_request() {
    let p = provider(&[
        "--deployment",
        "h200-spot:spot=true,max_replicas=1,cold_start_ms=0,ttl_ms=3000",
        "--deployment",
        "h200-on-demand:max_replicas=1,cold_start_ms=60000,ttl_ms=500,ttl_expiry=status:504",
        "--deployment",
        "b300-spot:spot=true,max_replicas=1,cold_start_ms=60000,ttl_ms=500",
        "--step-ms",
        "100",
    ])
    .await;
    // Queued through a long cold start: the configured status.
    let r = run(&p, "h200-on-demand", &job("q-1", 2)).await;
    assert_eq!(r.status(), 504);
    // The same with the default: the caller gets no complete answer at all.
    let cut = client()
        .post(format!("{}/b300-spot/run", p.url))
        .json(&job("q-2", 2))
        .send()
        .await;
    match cut {
        Err(_) => {}
        Ok(r) => assert!(r.bytes().await.is_err(), "a cut answer"),
    }

    // Running past the TTL: the stream is cut, no final event.
    let mut s = Reframed::new(run(&p, "h200-spot", &job("t-1", 500)).await);
    s.until("started").await;
    let rest = s.rest().await;
    assert!(final_of(&rest).is_none(), "{rest:?}");
    assert!(s.broken);
}

#[tokio::test]
async fn async_mode_end_to_end() {
    let p = provider(&[
        "--deployment",
        "h200-spot:spot=true,max_replicas=1,cold_start_ms=500",
        "--step-ms",
        "20",
    ])
    .await;
    let c = client();
    let r = c
        .post(format!("{}/h200-spot/run", p.url))
        .header("prefer", "respond-async")
        .header("x-inference-id", "as-1")
        .json(&job("as-1", 5))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(r.headers()["x-inference-id"], "as-1");
    assert_eq!(r.headers()["location"], "/result/h200-spot");
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body,
        json!({"Id": "as-1", "StatusPath": "/status/h200-spot", "ResultPath": "/result/h200-spot"})
    );
    let mut statuses: Vec<String> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let s: Value = c
            .get(format!("{}/status/h200-spot", p.url))
            .header("x-inference-id", "as-1")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(s["Id"], "as-1");
        assert!(s["Error"].is_null(), "{s}");
        let st = s["Status"].as_str().unwrap().to_owned();
        if statuses.last() != Some(&st) {
            statuses.push(st.clone());
        }
        if st == "Completed" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{statuses:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(statuses.contains(&"Queue".to_owned()), "{statuses:?}");
    let r = c
        .get(format!("{}/result/h200-spot", p.url))
        .header("x-inference-id", "as-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    let doc: Value = r.json().await.unwrap();
    let events = doc["events"].as_array().unwrap();
    assert_eq!(events.last().unwrap()["type"], "result");
    assert!(events.iter().any(|e| e["type"] == "output_chunk"));
    // Unknown ids.
    let r = c
        .get(format!("{}/status/h200-spot", p.url))
        .header("x-inference-id", "nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn the_management_api_token_status_replicas_and_prices() {
    let p = provider(&[
        "--deployment",
        "h200-spot:spot=true,max_replicas=1,cold_start_ms=1500,scale_down_delay_ms=600000",
        "--client-id",
        "cid",
        "--client-secret",
        "csecret",
    ])
    .await;
    let c = client();
    let token_url = format!("{}/v1/oauth2/token", p.url);
    let r = c
        .post(&token_url)
        .json(&json!({"grant_type": "client_credentials", "client_id": "cid", "client_secret": "wrong"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let tok: Value = c
        .post(&token_url)
        .json(&json!({"grant_type": "client_credentials", "client_id": "cid", "client_secret": "csecret"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(tok["token_type"], "Bearer");
    assert_eq!(tok["scope"], "cloud-api-v1");
    let access = tok["access_token"].as_str().unwrap().to_owned();
    let get = |path: &str| {
        c.get(format!("{}/v1/container-deployments/{path}", p.url))
            .bearer_auth(&access)
            .send()
    };
    let r = c
        .get(format!(
            "{}/v1/container-deployments/h200-spot/status",
            p.url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "no token");

    // Scaled to zero: healthy, no replicas.
    let st: Value = get("h200-spot/status").await.unwrap().json().await.unwrap();
    assert_eq!(st["status"], "healthy");
    let reps: Value = get("h200-spot/replicas")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(reps["list"], json!([]));

    // A request: the deployment initializes (cold start), then serves.
    let pending = tokio::spawn({
        let url = p.url.clone();
        async move {
            client()
                .post(format!("{url}/h200-spot/run"))
                .json(&job("m-1", 2))
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap()
        }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let st: Value = get("h200-spot/status").await.unwrap().json().await.unwrap();
        if st["status"] == "initializing" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{st}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let body = pending.await.unwrap();
    assert!(String::from_utf8_lossy(&body).contains("\"type\":\"result\""));
    let st: Value = get("h200-spot/status").await.unwrap().json().await.unwrap();
    assert_eq!(st["status"], "healthy");
    let reps: Value = get("h200-spot/replicas")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let list = reps["list"].as_array().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["status"], "running");
    assert!(list[0]["id"].as_str().unwrap().starts_with("h200-spot-"));
    assert!(list[0]["started_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(get("nope/status").await.unwrap().status(), 404);

    let types: Value = c
        .get(format!("{}/v1/container-types?currency=eur", p.url))
        .bearer_auth(&access)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let h200 = types
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "H200")
        .unwrap();
    assert_eq!(h200["serverless_spot_price"], 0.97);
    assert_eq!(h200["serverless_price"], 2.8);

    // Refresh.
    let r = c
        .post(&token_url)
        .json(&json!({"grant_type": "refresh_token", "refresh_token": tok["refresh_token"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn a_replica_that_outlives_its_grace_is_killed_with_its_comfyui() {
    // The worker would wait 20 s before aborting; the grace here is 0.5 s.
    let p = provider(&[
        "--deployment",
        "h200-on-demand:max_replicas=1,cold_start_ms=0,scale_down_delay_ms=300,grace_ms=500",
        "--step-ms",
        "100",
    ])
    .await;
    let mut s = Reframed::new(run(&p, "h200-on-demand", &job("k-1", 300)).await);
    let seen = s.until("started").await;
    let replica = seen[0]["worker"].as_str().unwrap().to_owned();
    let state: Value = client()
        .get(format!("{}/_emulator/state", p.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let worker_pid = state["deployments"][0]["replicas"][0]["pid"]
        .as_u64()
        .unwrap();
    let children = std::fs::read_dir(format!("/proc/{worker_pid}/task"))
        .unwrap()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|c| {
            c.split_whitespace()
                .map(|p| p.parse::<u64>().unwrap())
                .collect::<Vec<_>>()
        })
        .collect::<Vec<_>>();
    assert_eq!(children.len(), 1, "the worker runs its ComfyUI");

    let rest = s.rest().await;
    assert!(final_of(&rest).is_none(), "SIGKILL leaves no final event");
    wait_event(&p, &replica, "exited").await;
    let log: Vec<String> = lifecycle(&p)
        .await
        .into_iter()
        .filter(|(r, _)| *r == replica)
        .map(|(_, e)| e)
        .collect();
    let pos = |e: &str| log.iter().position(|x| x == e).unwrap();
    assert!(
        pos("sigterm") < pos("sigkill") && pos("sigkill") < pos("exited"),
        "{log:?}"
    );
    // Nothing of the replica is left running.
    for pid in [worker_pid, children[0]] {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(stat.is_empty() || stat.contains(") Z "), "{pid} still runs");
    }
}
