//! The `comfyui` backend against the ComfyUI simulator: one participant's job
//! from socket to downloaded output, and each fault the simulator can inject.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use comfyume_dispatch::ComfyUiBackend;
use comfyume_dispatch::backend::{
    BackendError, BackendEvent, InputFile, JobSpec, Outcome, OutcomeKind, Timeouts,
};
use comfyume_dispatch::comfyui::model_files;
use comfyume_sim::{Fault, SimConfig, SimHandle};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

const SHARED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/comfyui/");

fn workflow(name: &str) -> Value {
    let path = format!("{SHARED}workflows/{name}");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// slow_blur.json with a small picture: the simulator blurs real pixels, and
/// 2048x2048x2 takes far longer unoptimised than the simulated 31 steps.
fn slow_blur() -> Value {
    let mut w = workflow("slow_blur.json");
    w["1"]["inputs"]["width"] = json!(64);
    w["1"]["inputs"]["height"] = json!(64);
    w["1"]["inputs"]["batch_size"] = json!(1);
    w
}

fn small_timeouts() -> Timeouts {
    Timeouts {
        request: Duration::from_millis(1000),
        transfer: Duration::from_millis(3000),
        silence: Duration::from_millis(1000),
    }
}

async fn sim_with(config: SimConfig) -> SimHandle {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    comfyume_sim::spawn(config, listener).await
}

async fn sim(step_ms: u64) -> SimHandle {
    sim_with(SimConfig {
        step_ms,
        ..SimConfig::default()
    })
    .await
}

fn backend(sim: &SimHandle) -> ComfyUiBackend {
    ComfyUiBackend::new("sim-gpu", sim.url(), 2, small_timeouts()).unwrap()
}

/// A participant's data folders.
struct Folders {
    _root: tempfile::TempDir,
    outputs: PathBuf,
    temp: PathBuf,
    inputs: PathBuf,
}

fn folders() -> Folders {
    let root = tempfile::tempdir().unwrap();
    let f = Folders {
        outputs: root.path().join("outputs"),
        temp: root.path().join("temp"),
        inputs: root.path().join("inputs"),
        _root: root,
    };
    std::fs::create_dir_all(&f.inputs).unwrap();
    f
}

fn job(id: &str, user: &str, prompt: Value, outputs: &[&str], f: &Folders) -> JobSpec {
    JobSpec {
        id: id.into(),
        user: user.into(),
        prompt,
        extra_data: json!({"extra_pnginfo": {"workflow": {"nodes": []}}, "client_id": "browser-tab-1"}),
        outputs_to_execute: outputs.iter().map(|s| s.to_string()).collect(),
        inputs: vec![],
        output_dir: f.outputs.clone(),
        temp_dir: f.temp.clone(),
        attempt: 1,
        reattach: false,
    }
}

/// A job running in its own task; its events arrive on `events`.
struct Running {
    events: mpsc::Receiver<BackendEvent>,
    interrupt: watch::Sender<bool>,
    task: JoinHandle<Result<Outcome, BackendError>>,
    seen: Vec<BackendEvent>,
}

fn start(backend: &std::sync::Arc<ComfyUiBackend>, spec: JobSpec) -> Running {
    let (tx, rx) = mpsc::channel(4096);
    let (itx, irx) = watch::channel(false);
    let b = backend.clone();
    let task = tokio::spawn(async move { b.run(spec, tx, irx).await });
    Running {
        events: rx,
        interrupt: itx,
        task,
        seen: Vec::new(),
    }
}

impl Running {
    /// Waits (bounded) for an event matching `pred`.
    async fn until(&mut self, pred: impl Fn(&BackendEvent) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let ev = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .expect("event in time")
                .expect("job still sending events");
            let hit = pred(&ev);
            self.seen.push(ev);
            if hit {
                return;
            }
        }
    }

    async fn finish(mut self) -> (Result<Outcome, BackendError>, Vec<BackendEvent>) {
        let res = tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("job ends in time")
            .expect("job task did not panic");
        while let Ok(ev) = self.events.try_recv() {
            self.seen.push(ev);
        }
        (res, self.seen)
    }
}

async fn run(
    backend: &std::sync::Arc<ComfyUiBackend>,
    spec: JobSpec,
) -> (Result<Outcome, BackendError>, Vec<BackendEvent>) {
    start(backend, spec).finish().await
}

/// `nomodel.json` (its output node "3") as user001's job `id`.
fn nomodel_job(id: &str, f: &Folders) -> JobSpec {
    job(id, "user001", workflow("nomodel.json"), &["3"], f)
}

/// The kinds of an outcome's status messages, in order.
fn message_kinds(outcome: &Outcome) -> Vec<&str> {
    outcome
        .messages
        .iter()
        .map(|m| m[0].as_str().unwrap())
        .collect()
}

fn messages(events: &[BackendEvent]) -> Vec<&Value> {
    events
        .iter()
        .filter_map(|e| match e {
            BackendEvent::Message(v) => Some(v),
            _ => None,
        })
        .collect()
}

fn types(events: &[BackendEvent]) -> Vec<String> {
    messages(events)
        .iter()
        .map(|m| m["type"].as_str().unwrap().to_string())
        .collect()
}

fn is_message(ev: &BackendEvent, kind: &str, node: Option<&str>) -> bool {
    matches!(ev, BackendEvent::Message(v) if v["type"] == kind
        && node.is_none_or(|n| v["data"]["node"] == n))
}

fn is_started(ev: &BackendEvent) -> bool {
    matches!(ev, BackendEvent::Started)
}

fn arc(b: ComfyUiBackend) -> std::sync::Arc<ComfyUiBackend> {
    std::sync::Arc::new(b)
}

fn read(p: impl AsRef<Path>) -> Vec<u8> {
    std::fs::read(p.as_ref()).unwrap_or_else(|e| panic!("{}: {e}", p.as_ref().display()))
}

#[tokio::test]
async fn nomodel_job_relays_the_trace_downloads_and_confirms_in_history() {
    let sim = sim(0).await;
    let b = arc(backend(&sim));
    let f = folders();
    let (res, events) = run(&b, nomodel_job("job-nomodel-1", &f)).await;
    let outcome = res.unwrap();

    // ws_owner.txt minus `status` and the final `executing: null`.
    let trace = std::fs::read_to_string(format!("{SHARED}traces/ws_owner.txt")).unwrap();
    let expected: Vec<String> = trace
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(_, j)| serde_json::from_str::<Value>(j).unwrap())
        .filter(|m| {
            m["type"] != "status" && !(m["type"] == "executing" && m["data"]["node"].is_null())
        })
        .map(|m| m["type"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(types(&events), expected);
    assert!(matches!(events[0], BackendEvent::Submitted));
    assert!(
        matches!(events[1], BackendEvent::Started),
        "Started before execution_start is relayed"
    );
    for m in messages(&events) {
        assert_eq!(m["data"]["prompt_id"], "job-nomodel-1", "{m}");
    }

    // The executed message points at the participant's own copy.
    let executed = messages(&events)
        .into_iter()
        .find(|m| m["type"] == "executed")
        .unwrap()
        .clone();
    let local = json!({"filename": "nomodel_00001_.png", "subfolder": "", "type": "output"});
    assert_eq!(executed["data"]["output"]["images"][0], local);
    let ours = read(f.outputs.join("nomodel_00001_.png"));
    assert_eq!(ours, read(sim.output_dir().join("nomodel_00001_.png")));
    assert_eq!(&ours[..4], b"\x89PNG");
    // Nothing half-written is left behind.
    let names: Vec<String> = std::fs::read_dir(&f.outputs)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["nomodel_00001_.png"]);

    assert_eq!(outcome.kind, OutcomeKind::Success);
    assert_eq!(outcome.outputs["3"]["images"][0], local);
    assert_eq!(
        message_kinds(&outcome),
        ["execution_start", "execution_cached", "execution_success"]
    );
    assert_eq!(outcome.meta["3"]["display_node"], "3");
    assert_eq!(sim.state().prompts_received, 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn same_backend_file_name_never_overwrites_a_local_file() {
    let (red, blue) = (sim(0).await, sim(0).await);
    let f = folders();
    let mut first = workflow("nomodel.json");
    first["1"]["inputs"]["color"] = json!(0xff0000);
    let mut second = workflow("nomodel.json");
    second["1"]["inputs"]["color"] = json!(0x0000ff);

    let (a, _) = run(
        &arc(backend(&red)),
        job("aaaaaaaa-1111", "user001", first, &["3"], &f),
    )
    .await;
    let original = read(f.outputs.join("nomodel_00001_.png"));
    let (b, _) = run(
        &arc(backend(&blue)),
        job("bbbbbbbb-2222", "user001", second.clone(), &["3"], &f),
    )
    .await;
    let (c, _) = run(
        &arc(backend(&blue)),
        job("bbbbbbbb-3333", "user001", second, &["3"], &f),
    )
    .await;

    assert_eq!(
        a.unwrap().outputs["3"]["images"][0]["filename"],
        "nomodel_00001_.png"
    );
    assert_eq!(
        b.unwrap().outputs["3"]["images"][0]["filename"],
        "nomodel_00001__bbbbbbbb.png"
    );
    // A cached rerun names the same backend file again; same job-id prefix too.
    assert_eq!(
        c.unwrap().outputs["3"]["images"][0]["filename"],
        "nomodel_00001__bbbbbbbb_2.png"
    );
    assert_eq!(
        read(f.outputs.join("nomodel_00001_.png")),
        original,
        "first output untouched"
    );
    assert_ne!(
        read(f.outputs.join("nomodel_00001__bbbbbbbb.png")),
        original
    );
    assert_eq!(
        read(f.outputs.join("nomodel_00001__bbbbbbbb.png")),
        read(blue.output_dir().join("nomodel_00001_.png"))
    );
    red.shutdown().await;
    blue.shutdown().await;
}

#[tokio::test]
async fn uploaded_inputs_land_in_per_participant_subfolders() {
    let sim = sim(0).await;
    let b = arc(backend(&sim));
    let (alice, bob) = (folders(), folders());
    // Two different pictures, both called up.png by their owners.
    for (f, color, id) in [(&alice, 0xff0000, "make-a"), (&bob, 0x00ff00, "make-b")] {
        let mut p = workflow("nomodel.json");
        p["1"]["inputs"]["color"] = json!(color);
        run(&b, job(id, "maker", p, &["3"], f)).await.0.unwrap();
        let made = std::fs::read_dir(&f.outputs)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        std::fs::copy(made, f.inputs.join("up.png")).unwrap();
    }
    for (f, user, id) in [(&alice, "user001", "load-a"), (&bob, "user002", "load-b")] {
        let prompt = json!({
            "1": {"class_type": "LoadImage", "inputs": {"image": "up.png"}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "loaded"}}
        });
        let mut spec = job(id, user, prompt, &["2"], f);
        spec.inputs = vec![InputFile {
            local: f.inputs.join("up.png"),
            name: "up.png".into(),
        }];
        let outcome = run(&b, spec).await.0.unwrap();
        assert_eq!(outcome.kind, OutcomeKind::Success);
        let on_backend = sim.input_dir().join("comfyume").join(user).join("up.png");
        assert_eq!(
            read(&on_backend),
            read(f.inputs.join("up.png")),
            "{user}'s own file on the backend"
        );
        let out = outcome.outputs["2"]["images"][0]["filename"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(f.outputs.join(&out).is_file());
    }
    assert_ne!(
        read(alice.inputs.join("up.png")),
        read(bob.inputs.join("up.png"))
    );
    // The backend was told the per-participant path.
    let history: Value = reqwest::get(format!("{}/history/load-b", sim.url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        history["load-b"]["prompt"][2]["1"]["inputs"]["image"],
        "comfyume/user002/up.png"
    );
    // Every job goes out under the backend's one shared socket's client id.
    let first: Value = reqwest::get(format!("{}/history/load-a", sim.url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let client = history["load-b"]["prompt"][3]["client_id"]
        .as_str()
        .unwrap();
    assert!(client.starts_with("comfyume-"), "{client}");
    assert_eq!(first["load-a"]["prompt"][3]["client_id"], client);
    sim.shutdown().await;
}

/// An input of several upload pieces (streamed from disk, never read whole) arrives byte
/// for byte; an input that is gone is the participant's error, not the GPU's.
#[tokio::test]
async fn a_large_input_is_uploaded_whole_and_a_missing_one_is_refused() {
    let sim = sim(0).await;
    let b = arc(backend(&sim));
    let f = folders();
    // 3 MiB and a bit, not a multiple of any buffer size; not all zeros.
    let big: Vec<u8> = (0..3 * 1024 * 1024 + 4321u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(f.inputs.join("big.png"), &big).unwrap();
    let prompt = json!({
        "1": {"class_type": "LoadImage", "inputs": {"image": "big.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "big"}}
    });
    let mut spec = job("big", "user003", prompt.clone(), &["2"], &f);
    spec.inputs = vec![InputFile {
        local: f.inputs.join("big.png"),
        name: "big.png".into(),
    }];
    // Not a real picture: how the run ends does not matter here, the upload does.
    let _ = run(&b, spec).await;
    let on_backend = sim
        .input_dir()
        .join("comfyume")
        .join("user003")
        .join("big.png");
    assert!(
        read(&on_backend) == big,
        "the backend has the file, byte for byte"
    );

    let mut gone = job("gone", "user003", prompt, &["2"], &f);
    gone.inputs = vec![InputFile {
        local: f.inputs.join("missing.png"),
        name: "big.png".into(),
    }];
    match run(&b, gone).await.0 {
        Err(BackendError::Rejected(v)) => {
            assert_eq!(
                v["error"]["message"],
                "Input file big.png could not be read"
            )
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn runtime_error_is_an_execution_error_outcome() {
    let sim = sim(0).await;
    let b = arc(backend(&sim));
    let f = folders();
    let (res, events) = run(
        &b,
        job(
            "job-err",
            "user001",
            workflow("runtime_error.json"),
            &["3"],
            &f,
        ),
    )
    .await;
    let outcome = res.unwrap();
    let OutcomeKind::ExecutionError(data) = &outcome.kind else {
        panic!("expected an execution error, got {:?}", outcome.kind);
    };
    assert_eq!(data["node_id"], "2");
    assert_eq!(data["node_type"], "ImageScaleBy");
    assert_eq!(data["prompt_id"], "job-err");
    let relayed = messages(&events)
        .into_iter()
        .find(|m| m["type"] == "execution_error")
        .unwrap();
    assert_eq!(&relayed["data"], data);
    assert!(outcome.outputs.is_empty());
    sim.shutdown().await;
}

#[tokio::test]
async fn a_rejected_prompt_is_not_retryable() {
    let sim = sim(0).await;
    let b = arc(backend(&sim));
    let f = folders();
    let bad = json!({"1": {"class_type": "NoSuchNode", "inputs": {}}});
    let err = run(&b, job("job-bad", "user001", bad, &["1"], &f))
        .await
        .0
        .unwrap_err();
    let BackendError::Rejected(body) = &err else {
        panic!("{err:?}")
    };
    assert_eq!(body["error"]["type"], "invalid_prompt");
    assert!(!err.retryable());
    sim.shutdown().await;
}

#[tokio::test]
async fn only_the_selected_outputs_run() {
    let sim = sim(0).await;
    let b = arc(backend(&sim));
    let f = folders();
    let mut prompt = workflow("nomodel.json");
    prompt["4"] = json!({"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "other"}});
    let outcome = run(
        &b,
        job("job-partial", "user001", prompt.clone(), &["3"], &f),
    )
    .await
    .0
    .unwrap();
    assert_eq!(outcome.outputs.keys().collect::<Vec<_>>(), ["3"]);
    let both = run(&b, job("job-both", "user001", prompt, &["3", "4"], &f))
        .await
        .0
        .unwrap();
    assert_eq!(both.outputs.len(), 2);
    let info = b.object_info().await.unwrap();
    assert!(info["SaveImage"].is_object());
    sim.shutdown().await;
}

#[tokio::test]
async fn interrupt_stops_only_our_running_prompt() {
    let sim = sim(20).await;
    let b = arc(backend(&sim));
    let f = folders();
    let mut job_run = start(&b, job("job-slow", "user001", slow_blur(), &["4"], &f));
    job_run
        .until(|e| is_message(e, "executing", Some("2")))
        .await;
    job_run.interrupt.send(true).unwrap();
    let (res, events) = job_run.finish().await;
    let outcome = res.unwrap();
    let OutcomeKind::Interrupted(data) = &outcome.kind else {
        panic!("{:?}", outcome.kind)
    };
    assert_eq!(data["node_id"], "3");
    assert_eq!(data["node_type"], "ImageInvert");
    assert!(types(&events).contains(&"execution_interrupted".to_string()));
    assert_eq!(sim.state().jobs_interrupted, 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn interrupt_while_pending_deletes_it_from_the_backend_queue() {
    let sim = sim(20).await;
    let b = arc(backend(&sim));
    let f = folders();
    let mut busy = start(&b, job("job-busy", "user002", slow_blur(), &["4"], &f));
    busy.until(is_started).await;
    let mut waiting = start(
        &b,
        job(
            "job-waiting",
            "user001",
            workflow("nomodel.json"),
            &["3"],
            &f,
        ),
    );
    waiting
        .until(|e| matches!(e, BackendEvent::Submitted))
        .await;
    waiting.interrupt.send(true).unwrap();
    let (res, events) = waiting.finish().await;
    let OutcomeKind::Interrupted(data) = res.unwrap().kind else {
        panic!("not interrupted")
    };
    assert_eq!(data["prompt_id"], "job-waiting");
    assert!(data["node_id"].is_null());
    assert_eq!(data["executed"], json!([]));
    assert!(!events.iter().any(is_started));
    assert_eq!(
        busy.finish().await.0.unwrap().kind,
        OutcomeKind::Success,
        "the other job is not touched"
    );
    let s = sim.state();
    assert_eq!((s.jobs_run, s.jobs_interrupted, s.queue_pending), (1, 0, 0));
    sim.shutdown().await;
}

#[tokio::test]
async fn previews_are_relayed_as_type4_frames() {
    let sim = sim(5).await;
    let b = arc(backend(&sim));
    let f = folders();
    let prompt = json!({
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux-2-klein-4b.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": "qwen_3_4b.safetensors", "type": "flux2", "device": "default"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "flux2-vae.safetensors"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse at dusk", "clip": ["2", 0]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 0]}},
        "6": {"class_type": "EmptyFlux2LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": {"class_type": "Flux2Scheduler", "inputs": {"steps": 3, "width": 64, "height": 64}},
        "8": {"class_type": "CFGGuider", "inputs": {"model": ["1", 0], "positive": ["4", 0], "negative": ["5", 0], "cfg": 1.0}},
        "9": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "10": {"class_type": "RandomNoise", "inputs": {"noise_seed": 7}},
        "11": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["10", 0], "guider": ["8", 0], "sampler": ["9", 0], "sigmas": ["7", 0], "latent_image": ["6", 0]}},
        "12": {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["3", 0]}},
        "13": {"class_type": "SaveImage", "inputs": {"images": ["12", 0], "filename_prefix": "flux2"}}
    });
    assert_eq!(
        model_files(&prompt),
        [
            "flux-2-klein-4b.safetensors",
            "flux2-vae.safetensors",
            "qwen_3_4b.safetensors"
        ]
    );
    let (res, events) = run(&b, job("job-flux", "user001", prompt, &["13"], &f)).await;
    assert_eq!(res.unwrap().kind, OutcomeKind::Success);
    let frames: Vec<&bytes::Bytes> = events
        .iter()
        .filter_map(|e| match e {
            BackendEvent::Binary(b) => Some(b),
            _ => None,
        })
        .collect();
    assert_eq!(frames.len(), 3, "one preview per step");
    for frame in frames {
        assert_eq!(&frame[..4], &4u32.to_be_bytes());
        let len = u32::from_be_bytes(frame[4..8].try_into().unwrap()) as usize;
        let meta: Value = serde_json::from_slice(&frame[8..8 + len]).unwrap();
        assert_eq!(meta["prompt_id"], "job-flux");
        assert_eq!(&frame[8 + len..8 + len + 2], b"\xff\xd8", "JPEG preview");
    }
    assert_eq!(
        types(&events).iter().filter(|t| *t == "progress").count(),
        3
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn refused_connections_are_unreachable() {
    let sim = sim(0).await;
    let b = arc(backend(&sim));
    let f = folders();
    sim.set_fault(Fault::RefuseConnections { for_ms: None });
    let err = run(
        &b,
        job(
            "job-refused",
            "user001",
            workflow("nomodel.json"),
            &["3"],
            &f,
        ),
    )
    .await
    .0
    .unwrap_err();
    assert!(matches!(err, BackendError::Unreachable(_)), "{err:?}");
    assert!(err.retryable());
    assert!(
        !err.to_string().contains("127.0.0.1"),
        "no URL in errors: {err}"
    );
    sim.clear_faults();
    assert_eq!(sim.state().prompts_received, 0);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_500_on_prompt_is_a_retryable_protocol_error() {
    let sim = sim(0).await;
    let b = arc(backend(&sim));
    let f = folders();
    sim.set_fault(Fault::PromptError);
    let err = run(
        &b,
        job("job-500", "user001", workflow("nomodel.json"), &["3"], &f),
    )
    .await
    .0
    .unwrap_err();
    assert!(matches!(err, BackendError::Protocol(_)), "{err:?}");
    assert!(err.retryable());
    sim.shutdown().await;
}

#[tokio::test]
async fn a_dropped_websocket_is_reconnected_and_the_job_succeeds() {
    let sim = sim(10).await;
    let b = arc(backend(&sim));
    let f = folders();
    sim.set_fault(Fault::DropWebsocket);
    let (res, events) = run(&b, job("job-drop", "user001", slow_blur(), &["4"], &f)).await;
    let outcome = res.unwrap();
    assert_eq!(outcome.kind, OutcomeKind::Success);
    assert!(!sim.state().faults.drop_websocket, "the fault fired");
    let file = outcome.outputs["4"]["images"][0]["filename"]
        .as_str()
        .unwrap();
    assert!(f.outputs.join(file).is_file());
    // The output reached the participant once, over the new socket or from history.
    let executed: Vec<_> = messages(&events)
        .into_iter()
        .filter(|m| m["type"] == "executed")
        .collect();
    assert_eq!(executed.len(), 1);
    assert_eq!(executed[0]["data"]["output"]["images"][0]["filename"], file);
    assert_eq!(sim.state().prompts_received, 1);
    sim.shutdown().await;
}

/// The future ends by itself: a liveness guard far above the test's own short
/// limits, so load on the machine cannot make it flake.
async fn ends<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .expect("the job never ended")
}

#[tokio::test]
async fn a_hung_backend_times_out_within_the_limits() {
    let sim = sim(20).await;
    let b = arc(backend(&sim));
    let f = folders();
    let mut job_run = start(&b, job("job-hang", "user001", slow_blur(), &["4"], &f));
    job_run.until(is_started).await;
    sim.set_fault(Fault::Hang { for_ms: None });
    // Ends by itself (silence 1 s + one request limit 1 s here); the bound at
    // production values is tested in virtual time (tests/failure_paths.rs).
    let err = ends(job_run.finish()).await.0.unwrap_err();
    assert!(
        matches!(err, BackendError::Timeout(_) | BackendError::Lost(_)),
        "{err:?}"
    );
    assert!(err.retryable());
    sim.clear_faults();
    sim.shutdown().await;
}

#[tokio::test]
async fn a_backend_that_forgot_the_job_lost_it() {
    let sim = sim(20).await;
    let b = arc(backend(&sim));
    let f = folders();
    let mut busy = start(&b, job("job-first", "user002", slow_blur(), &["4"], &f));
    busy.until(is_started).await;
    let mut queued = start(
        &b,
        job(
            "job-forgotten",
            "user001",
            workflow("nomodel.json"),
            &["3"],
            &f,
        ),
    );
    queued.until(|e| matches!(e, BackendEvent::Submitted)).await;
    sim.set_fault(Fault::ForgetHistory);
    let err = ends(queued.finish()).await.0.unwrap_err();
    assert!(
        matches!(&err, BackendError::Lost(m) if m.contains("forgot")),
        "{err:?}"
    );
    // The running job survives a fresh replica's empty history (it lands there).
    assert_eq!(busy.finish().await.0.unwrap().kind, OutcomeKind::Success);
    sim.shutdown().await;
}

/// The server ends the job, shows it on the socket, then loses its history (a restart right
/// after it): the success and its output, already in the participant's folder, are the
/// outcome. Running it again elsewhere would run it twice (docs/RELIABILITY.md R4).
#[tokio::test]
async fn a_success_seen_on_the_socket_outlives_a_lost_history() {
    let sim = sim(0).await;
    let b = arc(backend(&sim));
    let f = folders();
    sim.set_fault(Fault::ForgetNextHistory);
    let (res, events) = run(&b, nomodel_job("job-forgot-after", &f)).await;
    let outcome = res.unwrap();
    assert_eq!(outcome.kind, OutcomeKind::Success);
    let local = json!({"filename": "nomodel_00001_.png", "subfolder": "", "type": "output"});
    assert_eq!(outcome.outputs["3"]["images"][0], local);
    assert_eq!(
        read(f.outputs.join("nomodel_00001_.png")),
        read(sim.output_dir().join("nomodel_00001_.png"))
    );
    assert_eq!(
        message_kinds(&outcome),
        ["execution_start", "execution_cached", "execution_success"]
    );
    assert_eq!(outcome.meta["3"]["display_node"], "3");
    assert!(types(&events).contains(&"executed".to_string()));
    // The server really had forgotten it, and ran it once.
    let h: Value = reqwest::get(format!("{}/history/job-forgot-after", sim.url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(h, json!({}));
    assert_eq!(sim.state().prompts_received, 1);
    sim.shutdown().await;
}

/// The same for a rerun answered from the server's cache: ComfyUI sends `executed` for a
/// cached output node too, with its cached output, so the rerun still delivers it.
#[tokio::test]
async fn a_cached_rerun_with_a_lost_history_still_delivers_its_output() {
    let sim = sim(0).await;
    let b = arc(backend(&sim));
    let f = folders();
    let (first, _) = run(&b, nomodel_job("job-cache-1", &f)).await;
    assert_eq!(first.unwrap().kind, OutcomeKind::Success);
    sim.set_fault(Fault::ForgetNextHistory);
    let (res, events) = run(&b, nomodel_job("job-cache-2", &f)).await;
    let outcome = res.unwrap();
    let cached = messages(&events)
        .into_iter()
        .find(|m| m["type"] == "execution_cached")
        .unwrap()["data"]["nodes"]
        .clone();
    assert!(cached.as_array().unwrap().contains(&json!("3")), "{cached}");
    let file = outcome.outputs["3"]["images"][0]["filename"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(file, "nomodel_00001_.png", "a file of its own");
    assert_eq!(
        read(f.outputs.join(&file)),
        read(sim.output_dir().join("nomodel_00001_.png"))
    );
    assert_eq!(sim.state().prompts_received, 2);
    sim.shutdown().await;
}

#[tokio::test]
async fn slow_downloads_still_succeed_within_the_transfer_limit() {
    let sim = sim(0).await;
    let b = arc(backend(&sim));
    let f = folders();
    sim.set_fault(Fault::SlowView { ms: 1500 });
    let t0 = Instant::now();
    let outcome = run(
        &b,
        job(
            "job-slowview",
            "user001",
            workflow("nomodel.json"),
            &["3"],
            &f,
        ),
    )
    .await
    .0
    .unwrap();
    assert!(t0.elapsed() >= Duration::from_millis(1500));
    assert_eq!(outcome.kind, OutcomeKind::Success);
    assert!(f.outputs.join("nomodel_00001_.png").is_file());
    sim.shutdown().await;
}

/// ComfyUI registers a new socket only after it answered the upgrade; a prompt submitted
/// before that loses the messages sent to our client id meanwhile. The first job on a fresh
/// connection, against a server that registers sockets 400 ms late, still relays every one
/// of its messages from `execution_start` on.
#[tokio::test]
async fn the_first_job_on_a_new_socket_misses_none_of_its_messages() {
    let sim = sim(0).await;
    sim.set_fault(Fault::SlowWsRegister { ms: 400 });
    let b = arc(backend(&sim));
    let f = folders();
    let (outcome, events) = run(&b, nomodel_job("job-greeted", &f)).await;
    assert_eq!(outcome.unwrap().kind, OutcomeKind::Success);
    let kinds = types(&events);
    assert_eq!(
        kinds.first().map(String::as_str),
        Some("execution_start"),
        "{kinds:?}"
    );
    assert!(kinds.iter().any(|k| k == "executed"), "{kinds:?}");
    assert!(events.iter().any(is_started));
    sim.shutdown().await;
}

/// A server that answers the upgrade but never greets (never registers the socket) is not
/// ready: the job fails with a retryable timeout within the request limit, and no prompt
/// was sent to it (its messages would have been lost).
#[tokio::test]
async fn a_socket_never_greeted_is_a_retryable_timeout_before_any_prompt() {
    let sim = sim(0).await;
    sim.set_fault(Fault::SlowWsRegister { ms: 60_000 });
    let b = arc(backend(&sim));
    let f = folders();
    // Had it waited for the registration (60 s), the server would have greeted and the job
    // succeeded.
    let err = run(&b, nomodel_job("job-ungreeted", &f))
        .await
        .0
        .unwrap_err();
    assert!(matches!(err, BackendError::Timeout(_)), "{err:?}");
    assert!(err.to_string().contains("greeting"), "{err}");
    assert!(err.retryable());
    assert_eq!(sim.state().prompts_received, 0);
    sim.shutdown().await;
}

/// By default every file is in the job's folder when its `executed` comes out (the worker
/// agent reads the files then); announcing results early, `executed` comes out while the
/// copy still waits on the server, and the file is there, complete, when the job ends.
#[tokio::test]
async fn executed_comes_after_its_files_unless_results_are_announced_early() {
    let sim = sim(0).await;
    sim.set_fault(Fault::SlowView { ms: 1000 });
    for early in [false, true] {
        let b = if early {
            arc(backend(&sim).announcing_results_early())
        } else {
            arc(backend(&sim))
        };
        let f = folders();
        let id = format!("job-early-{early}");
        let mut job = start(
            &b,
            job(&id, "user001", workflow("nomodel.json"), &["3"], &f),
        );
        job.until(|ev| is_message(ev, "executed", None)).await;
        let file = messages(&job.seen)
            .into_iter()
            .find(|m| m["type"] == "executed")
            .unwrap()["data"]["output"]["images"][0]["filename"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(f.outputs.join(&file).is_file(), !early, "early: {early}");
        let (outcome, _) = job.finish().await;
        assert_eq!(outcome.unwrap().kind, OutcomeKind::Success);
        assert!(!read(f.outputs.join(&file)).is_empty());
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn a_backend_that_dies_mid_job_lost_it() {
    let sim = sim(10).await;
    let b = arc(backend(&sim));
    let f = folders();
    sim.set_fault(Fault::DieMidJob);
    let err = ends(run(&b, job("job-die", "user001", slow_blur(), &["4"], &f)))
        .await
        .0
        .unwrap_err();
    assert!(sim.is_dead());
    assert!(matches!(err, BackendError::Lost(_)), "{err:?}");
    assert!(err.retryable());
    let leftovers = std::fs::read_dir(&f.outputs)
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(leftovers, 0, "no partial output");
    sim.shutdown().await;
}

#[tokio::test]
async fn reattach_collects_a_finished_job_without_running_it_again() {
    let sim = sim(0).await;
    let b = arc(backend(&sim));
    let f = folders();
    run(
        &b,
        job("job-again", "user001", workflow("nomodel.json"), &["3"], &f),
    )
    .await
    .0
    .unwrap();
    assert_eq!(sim.state().prompts_received, 1);

    // Our server restarted and lost the local files too.
    let after = folders();
    let mut spec = job(
        "job-again",
        "user001",
        workflow("nomodel.json"),
        &["3"],
        &after,
    );
    spec.reattach = true;
    let (res, events) = run(&arc(backend(&sim)), spec).await;
    let outcome = res.unwrap();
    assert_eq!(outcome.kind, OutcomeKind::Success);
    assert_eq!(sim.state().prompts_received, 1, "not submitted again");
    assert_eq!(
        read(after.outputs.join("nomodel_00001_.png")),
        read(sim.output_dir().join("nomodel_00001_.png"))
    );
    // The participant still sees the result appear.
    assert_eq!(types(&events), ["executed"]);

    // A job the backend never saw is simply submitted.
    let mut fresh = job(
        "job-unknown",
        "user001",
        workflow("nomodel.json"),
        &["3"],
        &after,
    );
    fresh.reattach = true;
    assert_eq!(run(&b, fresh).await.0.unwrap().kind, OutcomeKind::Success);
    assert_eq!(sim.state().prompts_received, 2);
    sim.shutdown().await;
}

#[tokio::test]
async fn reattach_follows_a_job_still_running() {
    let sim = sim(20).await;
    let b = arc(backend(&sim));
    let f = folders();
    let mut first = start(&b, job("job-restart", "user001", slow_blur(), &["4"], &f));
    first.until(is_started).await;
    // Our server "restarts": the job's task is gone, the backend keeps going.
    first.task.abort();

    let mut spec = job("job-restart", "user001", slow_blur(), &["4"], &f);
    spec.reattach = true;
    let (res, events) = run(&arc(backend(&sim)), spec).await;
    let outcome = res.unwrap();
    assert_eq!(outcome.kind, OutcomeKind::Success);
    assert_eq!(sim.state().prompts_received, 1, "not submitted again");
    assert!(types(&events).contains(&"executed".to_string()));
    let file = outcome.outputs["4"]["images"][0]["filename"]
        .as_str()
        .unwrap();
    assert!(f.outputs.join(file).is_file());
    sim.shutdown().await;
}

#[tokio::test]
async fn temp_previews_go_to_the_temp_folder() {
    let sim = sim(0).await;
    let b = arc(backend(&sim));
    let f = folders();
    let mut prompt = workflow("nomodel.json");
    prompt["3"] = json!({"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}});
    let (res, events) = run(&b, job("job-preview", "user001", prompt, &["3"], &f)).await;
    let outcome = res.unwrap();
    let image = &outcome.outputs["3"]["images"][0];
    assert_eq!(image["type"], "temp");
    assert_eq!(image["subfolder"], "");
    let name = image["filename"].as_str().unwrap();
    assert!(f.temp.join(name).is_file());
    assert!(!f.outputs.exists(), "nothing written to outputs");
    let executed = messages(&events)
        .into_iter()
        .find(|m| m["type"] == "executed")
        .unwrap();
    assert_eq!(&executed["data"]["output"]["images"][0], image);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_retry_on_the_same_backend_collects_the_earlier_attempt() {
    let sim = sim(0).await;
    let b = arc(backend(&sim));
    let f = folders();
    run(
        &b,
        job("job-retry", "user001", workflow("nomodel.json"), &["3"], &f),
    )
    .await
    .0
    .unwrap();
    let mut again = job("job-retry", "user001", workflow("nomodel.json"), &["3"], &f);
    again.attempt = 2;
    let outcome = run(&b, again).await.0.unwrap();
    assert_eq!(outcome.kind, OutcomeKind::Success);
    assert_eq!(
        sim.state().prompts_received,
        1,
        "the GPU did not run it twice"
    );
    // Fetched again for this attempt, under a name that overwrites nothing.
    assert_eq!(
        outcome.outputs["3"]["images"][0]["filename"],
        "nomodel_00001__job-retr.png"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn a_cancel_on_a_hung_backend_still_ends_as_interrupted() {
    let sim = sim(20).await;
    let b = arc(backend(&sim));
    let f = folders();
    let mut job_run = start(&b, job("job-stuck", "user001", slow_blur(), &["4"], &f));
    job_run.until(is_started).await;
    sim.set_fault(Fault::Hang { for_ms: None });
    job_run.interrupt.send(true).unwrap();
    let outcome = ends(job_run.finish()).await.0.unwrap();
    let OutcomeKind::Interrupted(data) = outcome.kind else {
        panic!("{:?}", outcome.kind)
    };
    assert_eq!(data["prompt_id"], "job-stuck");
    sim.clear_faults();
    sim.shutdown().await;
}

#[tokio::test]
async fn an_output_that_cannot_be_saved_here_is_a_storage_error_not_the_gpus_fault() {
    let sim = sim(0).await;
    let b = arc(backend(&sim));
    let f = folders();
    // The participant's output folder cannot be made (a file stands where it should be),
    // as when the data disk is full: another GPU would not help.
    std::fs::write(&f.outputs, b"not a folder").unwrap();
    let err = ends(run(
        &b,
        job(
            "job-nodisk",
            "user001",
            workflow("nomodel.json"),
            &["3"],
            &f,
        ),
    ))
    .await
    .0
    .unwrap_err();
    assert!(matches!(err, BackendError::Storage(_)), "{err:?}");
    assert!(!err.retryable());
    sim.shutdown().await;
}
