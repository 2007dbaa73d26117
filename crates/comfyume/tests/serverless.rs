//! `INFERENCE_MODE=serverless` end to end, with real processes: `comfyume serve` in
//! front of the provider emulator (`comfyume-provider`), which starts `comfyume-worker`
//! replicas, each in front of its own `comfyume-sim`; participants talk to serve over
//! HTTP and WebSocket as the frontend does.

use crate::helpers;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use futures_util::StreamExt;
use helpers::PASSWORD;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const ADMIN: &str = "teacher";

use crate::workspace_bin;
use workspace_bin::workspace_bin;

/// Kills a process group (the emulator and the replicas it started).
fn kill_group(pid: u32) {
    let _ = std::process::Command::new("kill")
        .args(["-KILL", "--", &format!("-{pid}")])
        .stderr(Stdio::null())
        .status();
}

struct Provider {
    child: std::process::Child,
    url: String,
    _data: tempfile::TempDir,
}

impl Drop for Provider {
    fn drop(&mut self) {
        kill_group(self.child.id());
        let _ = self.child.wait();
    }
}

fn provider(args: &[&str]) -> Provider {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    let data = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new(workspace_bin(
        "comfyume-provider-emulator",
        "comfyume-provider",
        &["provider-emulator", "wire"],
    ));
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
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0);
    let mut child = cmd.spawn().unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines
        .next()
        .expect("the emulator prints its address")
        .unwrap();
    let url = first
        .strip_prefix("comfyume-provider listening on ")
        .unwrap()
        .to_owned();
    std::thread::spawn(move || for _ in lines {});
    Provider {
        child,
        url,
        _data: data,
    }
}

fn client() -> reqwest::Client {
    helpers::TestApp::client()
}

/// A data directory with `n` participants (user001…), an instructor, and the
/// simulator's node definitions (serve never asks a serverless endpoint for them).
async fn prepare(dir: &Path, n: usize) {
    use comfyume_store::{MetaStore, Role, UserStore};
    std::fs::create_dir_all(dir).unwrap();
    let store = comfyume_store::sqlite::SqliteStore::open(&dir.join("comfyume.db"))
        .await
        .unwrap();
    let hash = bcrypt::hash(PASSWORD, 4).unwrap();
    for i in 1..=n {
        store
            .import_bcrypt(&format!("user{i:03}"), &hash, Role::Participant)
            .await
            .unwrap();
    }
    store
        .import_bcrypt(ADMIN, &hash, Role::Admin)
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim = comfyume_sim::spawn(Default::default(), listener).await;
    let info: Value = client()
        .get(format!("{}/object_info", sim.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    store
        .put_meta(comfyume_gateway::OBJECT_INFO_KEY, &info.to_string(), "test")
        .await
        .unwrap();
}

/// `comfyume serve` as a process.
struct Serve {
    child: std::process::Child,
    addr: String,
    data: PathBuf,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(tmp: &Path, env: &[(&str, String)]) -> Serve {
    let data = tmp.join("data");
    let frontend = tmp.join("frontend");
    if !frontend.exists() {
        helpers::fake_frontend(&frontend);
    }
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_comfyume"));
    cmd.args(helpers::serve_args(&data, &frontend))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("INFERENCE_MODE", "serverless")
        .env("RUST_LOG", "warn,comfyume_serverless=info")
        .stderr(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let (child, url) = helpers::spawn_serve(cmd);
    Serve {
        child,
        addr: url.trim_start_matches("http://").to_owned(),
        data,
    }
}

/// The serve settings for an emulator with deployments `h200-spot` (active) and
/// `h200-on-demand` (failover), its management API polled every second.
fn emulator_env(p: &Provider) -> Vec<(&'static str, String)> {
    vec![
        (
            "SERVERLESS_ENDPOINT_H200_SPOT",
            format!("{}/h200-spot", p.url),
        ),
        (
            "SERVERLESS_ENDPOINT_H200_ON_DEMAND",
            format!("{}/h200-on-demand", p.url),
        ),
        ("SERVERLESS_ACTIVE", "h200-spot".into()),
        ("SERVERLESS_FAILOVER", "h200-on-demand".into()),
        ("VERDA_API_URL", format!("{}/v1", p.url)),
        ("VERDA_CLIENT_ID", "emulator-client".into()),
        ("VERDA_CLIENT_SECRET", "emulator-secret".into()),
        ("SERVERLESS_POLL_SECS", "1".into()),
        ("SERVERLESS_COLD_START_AFTER_SECS", "1".into()),
    ]
}

impl Serve {
    async fn req(
        &self,
        user: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut rb = client()
            .request(method, format!("http://{}{path}", self.addr))
            .basic_auth(user, Some(PASSWORD));
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let r = rb.send().await.unwrap();
        let status = r.status().as_u16();
        let bytes = r.bytes().await.unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    async fn get(&self, user: &str, path: &str) -> Value {
        let (status, v) = self.req(user, reqwest::Method::GET, path, None).await;
        assert_eq!(status, 200, "GET {path}: {v}");
        v
    }

    async fn submit(&self, user: &str, client_id: &str, prompt: &Value) -> String {
        let (status, v) = self
            .req(
                user,
                reqwest::Method::POST,
                "/api/prompt",
                Some(json!({"client_id": client_id, "prompt": prompt})),
            )
            .await;
        assert_eq!(status, 200, "POST /api/prompt: {v}");
        v["prompt_id"].as_str().unwrap().to_owned()
    }

    async fn ws(&self, user: &str, client_id: &str) -> Ws {
        use base64::Engine;
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut req = format!("ws://{}/ws?clientId={client_id}", self.addr)
            .into_client_request()
            .unwrap();
        let cred = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{PASSWORD}"));
        req.headers_mut()
            .insert("authorization", format!("Basic {cred}").parse().unwrap());
        tokio_tungstenite::connect_async(req).await.unwrap().0
    }

    /// The job's status in `/api/jobs/{id}`, once it is one of `states`.
    async fn wait_job(&self, user: &str, id: &str, states: &[&str], secs: u64) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let v = self.get(user, &format!("/api/jobs/{id}")).await;
            if states.contains(&v["status"].as_str().unwrap_or("")) {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "job {id} still {} after {secs} s",
                v["status"]
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn outputs(&self, user: &str) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.data.join("outputs").join(user))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}

/// Text messages until the end-of-job marker of `id` (included), within `secs`.
async fn until_end(ws: &mut Ws, id: &str, secs: u64) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut out = Vec::new();
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|_| panic!("job {id} did not end within {secs} s; saw {out:#?}"))
            .expect("socket open")
            .expect("no socket error");
        if let Message::Text(t) = msg {
            let v: Value = serde_json::from_str(&t).unwrap();
            let end = v["type"] == "executing"
                && v["data"]["node"].is_null()
                && v["data"]["prompt_id"] == id;
            out.push(v);
            if end {
                return out;
            }
        }
    }
}

fn of_type<'a>(msgs: &'a [Value], kind: &str, id: &str) -> Vec<&'a Value> {
    msgs.iter()
        .filter(|m| m["type"] == kind && m["data"]["prompt_id"] == id)
        .collect()
}

fn notices(msgs: &[Value]) -> Vec<String> {
    msgs.iter()
        .filter(|m| m["type"] == "comfyume")
        .filter_map(|m| m["data"]["message"].as_str().map(str::to_owned))
        .collect()
}

fn sampler(steps: u32, seed: u64) -> Value {
    json!({
        "3": {"class_type": "KSampler", "inputs": {"seed": seed, "steps": steps, "cfg": 8, "sampler_name": "euler", "scheduler": "normal", "denoise": 1, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly-fp16.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a glass bottle", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "text, watermark", "clip": ["4", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}}
    })
}

/// What a successful job's socket showed: ComfyUI's events live (progress, the
/// output node's `executed` naming the participant's own file), each once.
fn assert_ran_once(msgs: &[Value], id: &str, outputs: &[String]) {
    assert!(
        !of_type(msgs, "progress", id).is_empty(),
        "progress relayed live: {msgs:#?}"
    );
    assert_eq!(of_type(msgs, "execution_start", id).len(), 1, "{msgs:#?}");
    assert_eq!(of_type(msgs, "execution_success", id).len(), 1, "{msgs:#?}");
    let executed = of_type(msgs, "executed", id);
    assert_eq!(executed.len(), 1, "{msgs:#?}");
    let file = executed[0]["data"]["output"]["images"][0]["filename"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(outputs, [file], "exactly one output, the one announced");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_participants_through_a_cold_start_each_job_once() {
    let p = provider(&[
        "--deployment",
        "h200-spot:spot=true,max_replicas=3,cold_start_ms=2500",
        "--deployment",
        "h200-on-demand:max_replicas=1",
        "--step-ms",
        "20",
    ]);
    let tmp = tempfile::tempdir().unwrap();
    prepare(&tmp.path().join("data"), 20).await;
    let s = serve(tmp.path(), &emulator_env(&p));
    let users: Vec<String> = (1..=20).map(|i| format!("user{i:03}")).collect();
    let mut sockets = Vec::new();
    for u in &users {
        sockets.push(s.ws(u, &format!("tab-{u}")).await);
    }
    // Everyone presses Run at once, on a GPU scaled to zero.
    let ids = futures_util::future::join_all(users.iter().enumerate().map(|(i, u)| {
        let s = &s;
        async move {
            s.submit(u, &format!("tab-{u}"), &sampler(8, i as u64))
                .await
        }
    }))
    .await;
    // While the GPU starts, the banner says so.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let b = s.get("user020", "/api/comfyume/gpu").await;
        if let Some(text) = b["gpu"].as_str() {
            assert!(text.starts_with("GPU starting"), "{b}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no cold start shown: {b}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let all = futures_util::future::join_all(
        sockets
            .iter_mut()
            .zip(&ids)
            .map(|(ws, id)| until_end(ws, id, 120)),
    )
    .await;
    for ((u, id), msgs) in users.iter().zip(&ids).zip(&all) {
        let job = s.wait_job(u, id, &["completed"], 30).await;
        assert_eq!(job["status"], "completed", "{job}");
        assert_ran_once(msgs, id, &s.outputs(u));
        let told = notices(msgs);
        assert!(
            told.iter().any(|n| n.starts_with("GPU starting")),
            "{u} waited on a cold GPU and was told so: {told:?}"
        );
    }
    // The instructor sees the cold start learnt, the GPU time, the replicas.
    let st = s.get(ADMIN, "/admin/api/serverless").await;
    let spot = &st["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "h200-spot")
        .unwrap()
        .clone();
    assert_eq!(spot["jobs"], 20, "{spot}");
    // The dashboard's GPU view lists the same endpoints behind the serverless backend.
    let gpus = s.get(ADMIN, "/admin/api/gpus").await.to_string();
    assert!(
        gpus.contains("\"h200-spot\"") && gpus.contains("\"h200-on-demand\""),
        "{gpus}"
    );
    assert!(spot["gpu_seconds"].as_f64().unwrap() > 0.0, "{spot}");
    let learnt = spot["cold_start_secs"].as_array().unwrap();
    assert_eq!(learnt.len(), 1, "one cold start measured: {spot}");
    assert!(spot["replica_intervals"].as_u64().unwrap() >= 1, "{spot}");
    assert!(!spot["url"].as_str().unwrap().contains('@'));
    let costs = s.get(ADMIN, "/admin/api/costs").await;
    assert_eq!(costs["participants_today"].as_array().unwrap().len(), 20);
    // The banner's GPU line for a participant.
    let banner = s.get("user001", "/api/comfyume/gpu").await;
    assert!(
        banner["gpu_time_text"]
            .as_str()
            .unwrap()
            .starts_with("your GPU time today"),
        "{banner}"
    );
    assert_eq!(
        s.req(
            "user001",
            reqwest::Method::GET,
            "/admin/api/serverless",
            None
        )
        .await
        .0,
        403
    );
}

/// The admin API's state of one endpoint.
async fn endpoint(s: &Serve, name: &str) -> Value {
    let st = s.get(ADMIN, "/admin/api/serverless").await;
    st["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .unwrap()
        .clone()
}

/// Waits until the participant's socket shows progress of job `id`.
async fn until_progress(ws: &mut Ws, id: &str) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(60), ws.next())
            .await
            .expect("progress within 60 s")
            .unwrap()
            .unwrap();
        if let Message::Text(t) = msg {
            let v: Value = serde_json::from_str(&t).unwrap();
            let done = v["type"] == "progress" && v["data"]["prompt_id"] == id;
            seen.push(v);
            if done {
                return seen;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spot_eviction_and_scale_down_mid_job_fail_over_and_run_once() {
    let p = provider(&[
        "--deployment",
        "h200-spot:spot=true,max_replicas=1,cold_start_ms=0",
        "--deployment",
        "h200-on-demand:max_replicas=1,cold_start_ms=0",
        "--step-ms",
        "50",
        "--replica-env",
        "WORKER_ABORT_AFTER_SECS=1",
    ]);
    let tmp = tempfile::tempdir().unwrap();
    prepare(&tmp.path().join("data"), 2).await;
    let s = serve(tmp.path(), &emulator_env(&p));
    let c = client();

    for (user, how) in [("user001", "evict"), ("user002", "scale-down")] {
        let mut ws = s.ws(user, "tab").await;
        let id = s.submit(user, "tab", &sampler(60, 1)).await;
        let mut msgs = until_progress(&mut ws, &id).await;
        // Mid-job: a spot eviction (no notice), or a scale-down (SIGTERM, then the
        // worker's `aborted` within its grace).
        let r = c
            .post(format!("{}/_emulator/{how}", p.url))
            .json(&json!({"deployment": "h200-spot"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{how}");
        msgs.extend(until_end(&mut ws, &id, 120).await);
        let job = s.wait_job(user, &id, &["completed", "failed"], 30).await;
        assert_eq!(job["status"], "completed", "{how}: {job}");
        let told = notices(&msgs);
        assert!(
            told.iter().any(|n| n.contains("Retrying on another GPU")),
            "{how}: the participant saw the retry: {told:?}"
        );
        // Once: one success, one output, and the output the socket announced.
        assert_eq!(of_type(&msgs, "execution_success", &id).len(), 1, "{how}");
        let executed = of_type(&msgs, "executed", &id);
        let file = executed.last().unwrap()["data"]["output"]["images"][0]["filename"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(s.outputs(user), [file], "{how}");
    }
    let spot = endpoint(&s, "h200-spot").await;
    let od = endpoint(&s, "h200-on-demand").await;
    assert_eq!(
        od["jobs"], 2,
        "both jobs finished on the failover endpoint: {od}"
    );
    assert_eq!(spot["jobs"], 0, "{spot}");
    assert_eq!(spot["recent_errors"].as_array().unwrap().len(), 2, "{spot}");
    assert_eq!(od["role"], "failover 1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_ttl_expiry_fails_the_job_with_a_clear_reason() {
    let p = provider(&[
        "--deployment",
        "h200-spot:spot=true,max_replicas=1,cold_start_ms=0,ttl_ms=2000",
        "--step-ms",
        "100",
    ]);
    let tmp = tempfile::tempdir().unwrap();
    prepare(&tmp.path().join("data"), 1).await;
    let mut env = emulator_env(&p);
    env.retain(|(k, _)| !k.contains("ON_DEMAND") && *k != "SERVERLESS_FAILOVER");
    let s = serve(tmp.path(), &env);
    // The management API says the TTL (polled every second).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while endpoint(&s, "h200-spot").await["request_ttl_secs"].is_null() {
        assert!(tokio::time::Instant::now() < deadline, "TTL never read");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut ws = s.ws("user001", "tab").await;
    // 60 steps of 100 ms: longer than the 2 s TTL.
    let id = s.submit("user001", "tab", &sampler(60, 1)).await;
    let msgs = until_end(&mut ws, &id, 60).await;
    let job = s.wait_job("user001", &id, &["failed"], 30).await;
    let errors = of_type(&msgs, "execution_error", &id);
    assert_eq!(errors.len(), 1, "{msgs:#?}");
    let why = errors[0]["data"]["exception_message"].as_str().unwrap();
    assert!(why.contains("request TTL (2 s)"), "{why}");
    assert!(
        !notices(&msgs).iter().any(|n| n.contains("Retrying")),
        "not retried: it would run out again"
    );
    assert_eq!(job["status"], "failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_mode_end_to_end_and_the_routing_switch_without_a_restart() {
    let p = provider(&[
        "--deployment",
        "h200-spot:spot=true,max_replicas=1,cold_start_ms=0",
        "--deployment",
        "b300-spot:spot=true,max_replicas=1,cold_start_ms=0",
        "--step-ms",
        "20",
    ]);
    let tmp = tempfile::tempdir().unwrap();
    prepare(&tmp.path().join("data"), 1).await;
    let mut env = emulator_env(&p);
    env.retain(|(k, _)| !k.contains("ON_DEMAND") && *k != "SERVERLESS_FAILOVER");
    env.push((
        "SERVERLESS_ENDPOINT_B300_SPOT",
        format!("{}/b300-spot", p.url),
    ));
    env.push(("SERVERLESS_ASYNC", "1".into()));
    let s = serve(tmp.path(), &env);
    let mut ws = s.ws("user001", "tab").await;

    // Async: 202, status polled, the result document; the outputs still arrive.
    let id = s.submit("user001", "tab", &sampler(5, 1)).await;
    let msgs = until_end(&mut ws, &id, 60).await;
    s.wait_job("user001", &id, &["completed"], 30).await;
    let executed = of_type(&msgs, "executed", &id);
    assert_eq!(executed.len(), 1, "{msgs:#?}");
    assert_eq!(s.outputs("user001").len(), 1);
    assert_eq!(endpoint(&s, "h200-spot").await["jobs"], 1);

    // The instructor switches to b300-spot: the next job goes there, no restart.
    let (status, v) = s
        .req(
            ADMIN,
            reqwest::Method::PUT,
            "/admin/api/serverless",
            Some(json!({"active": "b300-spot", "failover": ["h200-spot"]})),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["active"], "b300-spot");
    let (status, v) = s
        .req(
            ADMIN,
            reqwest::Method::PUT,
            "/admin/api/serverless",
            Some(json!({"active": "nowhere"})),
        )
        .await;
    assert_eq!(status, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("nowhere"));
    let (status, _) = s
        .req(
            "user001",
            reqwest::Method::PUT,
            "/admin/api/serverless",
            Some(json!({"active": "h200-spot"})),
        )
        .await;
    assert_eq!(status, 403);
    let id = s.submit("user001", "tab", &sampler(5, 2)).await;
    until_end(&mut ws, &id, 60).await;
    s.wait_job("user001", &id, &["completed"], 30).await;
    assert_eq!(endpoint(&s, "b300-spot").await["jobs"], 1);
    assert_eq!(endpoint(&s, "h200-spot").await["jobs"], 1);

    // A warm-up through the admin API: the worker's node definitions, no error.
    let (status, v) = s
        .req(
            ADMIN,
            reqwest::Method::POST,
            "/admin/api/serverless/warmup",
            Some(json!({"endpoint": "h200-spot"})),
        )
        .await;
    assert_eq!(status, 202, "{v}");
    assert_eq!(v["warming"], "h200-spot");
    let (status, _) = s
        .req(
            ADMIN,
            reqwest::Method::POST,
            "/admin/api/serverless/warmup",
            Some(json!({"endpoint": "nowhere"})),
        )
        .await;
    assert_eq!(status, 400);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let e = endpoint(&s, "h200-spot").await;
        if !e["warmed_up_at_ms"].is_null() {
            assert!(e["recent_errors"].as_array().unwrap().is_empty(), "{e}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "warm-up did not end: {e}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // It survives a restart of serve.
    drop(ws);
    let data = s.data.clone();
    drop(s);
    let s = serve(tmp.path(), &env);
    assert_eq!(s.data, data);
    let st = s.get(ADMIN, "/admin/api/serverless").await;
    assert_eq!(st["active"], "b300-spot", "{st}");
    assert_eq!(st["failover"], json!(["h200-spot"]));
}

struct Moto {
    child: std::process::Child,
    url: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn moto() -> Moto {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = std::process::Command::new("python3")
        .args([
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 -m moto.server (scripts/install-test-deps.sh installs moto)");
    let url = format!("http://127.0.0.1:{port}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while client().get(&url).send().await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "moto did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Moto { child, url }
}

/// A PNG of random pixels (does not compress: about 3 bytes a pixel).
fn noise_png(w: u32, h: u32) -> Vec<u8> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let img = image::RgbImage::from_fn(w, h, |_, _| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        image::Rgb([state as u8, (state >> 8) as u8, (state >> 16) as u8])
    });
    let mut out = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

/// VmHWM (peak resident memory) of a process, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_50_mb_input_and_output_go_through_the_object_store() {
    use std::io::BufRead;
    let s3 = moto().await;
    // The bucket, made through the S3 API (moto takes unsigned requests).
    let r = client()
        .put(format!("{}/outputs", s3.url))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let store_env = [
        ("OUTPUT_STORE_ENDPOINT", s3.url.clone()),
        ("OUTPUT_STORE_BUCKET", "outputs".to_owned()),
        ("OUTPUT_STORE_REGION", "us-east-1".to_owned()),
        ("OUTPUT_STORE_ACCESS_KEY_ID", "testing".to_owned()),
        ("OUTPUT_STORE_SECRET_ACCESS_KEY", "testing".to_owned()),
    ];

    // One worker reached directly (an endpoint may be a worker's own address), in
    // front of a simulator.
    let sim = comfyume_sim::spawn(
        comfyume_sim::SimConfig {
            step_ms: 5,
            ..Default::default()
        },
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
    )
    .await;
    let wdata = tempfile::tempdir().unwrap();
    let mut worker = std::process::Command::new(workspace_bin(
        "comfyume-worker",
        "comfyume-worker",
        &["worker", "comfyui", "wire"],
    ));
    worker
        .args(["--listen", "127.0.0.1:0"])
        .env_clear()
        .env("COMFYUI_URL", sim.url())
        .env("WORKER_DATA_DIR", wdata.path())
        .env("WORKER_TOKEN", "wt0ken")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    for (k, v) in &store_env {
        worker.env(k, v);
    }
    let mut worker = worker.spawn().unwrap();
    let mut lines = std::io::BufReader::new(worker.stdout.take().unwrap()).lines();
    let url = lines
        .next()
        .unwrap()
        .unwrap()
        .strip_prefix("comfyume-worker listening on ")
        .unwrap()
        .to_owned();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _worker = Kill(worker);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while client()
        .get(format!("{url}/health"))
        .send()
        .await
        .map(|r| r.status() != 200)
        .unwrap_or(true)
    {
        assert!(tokio::time::Instant::now() < deadline, "worker not ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let tmp = tempfile::tempdir().unwrap();
    prepare(&tmp.path().join("data"), 1).await;
    let mut env: Vec<(&str, String)> = vec![
        ("SERVERLESS_ENDPOINT_LAB", url.clone()),
        ("SERVERLESS_MAX_IN_FLIGHT", "1".into()),
        ("SERVERLESS_WORKER_TOKEN", "wt0ken".into()),
    ];
    env.extend(store_env.iter().cloned());
    let s = serve(tmp.path(), &env);

    // 4200x4200 noise: about 53 MB, as an input (too large to send inline) and, saved
    // again, as an output (too large for the worker to send inline).
    let big = noise_png(4200, 4200);
    assert!(big.len() > 50_000_000, "{}", big.len());
    let form = reqwest::multipart::Form::new().part(
        "image",
        reqwest::multipart::Part::bytes(big).file_name("big.png"),
    );
    let r = client()
        .post(format!("http://{}/upload/image", s.addr))
        .basic_auth("user001", Some(PASSWORD))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let before = peak_rss(s.child.id());
    let mut ws = s.ws("user001", "tab").await;
    let prompt = json!({
        "1": {"class_type": "LoadImage", "inputs": {"image": "big.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "big"}}
    });
    let id = s.submit("user001", "tab", &prompt).await;
    let msgs = until_end(&mut ws, &id, 300).await;
    let job = s
        .wait_job("user001", &id, &["completed", "failed"], 30)
        .await;
    assert_eq!(job["status"], "completed", "{job} {msgs:#?}");
    let peak = peak_rss(s.child.id());

    let outs = s.outputs("user001");
    assert_eq!(outs.len(), 1, "{outs:?}");
    let local = std::fs::read(s.data.join("outputs/user001").join(&outs[0])).unwrap();
    assert!(local.len() > 50_000_000, "{}", local.len());
    // The same bytes as the object the worker stored.
    let key = format!("outputs/{id}/{}", outs[0]);
    let stored = client()
        .get(format!("{}/outputs/{key}", s3.url))
        .send()
        .await
        .unwrap();
    assert_eq!(stored.status(), 200, "{key}");
    assert!(
        stored.bytes().await.unwrap() == local,
        "identical to the stored object"
    );
    // The input went through the store too.
    let r = client()
        .get(format!("{}/outputs/outputs/inputs/{id}/big.png", s3.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    eprintln!(
        "serve peak RSS before the job {} MiB, after {} MiB",
        before >> 20,
        peak >> 20
    );
    assert!(
        peak.saturating_sub(before) < 40 << 20,
        "serve streamed the 53 MB files rather than holding them: {} -> {} MiB",
        before >> 20,
        peak >> 20
    );
}
