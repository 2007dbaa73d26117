//! The serverless backend against small in-test servers that speak the worker
//! protocol (docs/worker-protocol.md) the way a worker or the provider's gateway
//! would, including the hostile and broken ways.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use comfyume_dispatch::{Backend, BackendError, BackendEvent, JobSpec, OutcomeKind};
use comfyume_serverless::config::from_vars;
use comfyume_serverless::{Host, ServerlessBackend};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};

/// What the fake endpoint answers to the next `POST /run`.
#[derive(Clone)]
enum Answer {
    /// SSE events (each a JSON value), re-framed as the provider does; then the
    /// stream ends (`cut: false`) or breaks (`cut: true`).
    Events { events: Vec<Value>, cut: bool },
    /// Waits this long before answering.
    After(Duration, Box<Answer>),
    /// Headers, then nothing ever.
    Silent,
    /// A plain status with a body.
    Status(u16, Value),
    /// One JSON document (the async answer of a worker reached directly).
    Document(Vec<Value>),
}

#[derive(Default)]
struct Fake {
    script: Mutex<VecDeque<Answer>>,
    seen: Mutex<Vec<(HeaderMap, Value)>>,
}

async fn run(State(f): State<Arc<Fake>>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    f.seen.lock().unwrap().push((headers, body));
    let answer = f.script.lock().unwrap().pop_front();
    respond(answer.unwrap_or(Answer::Status(500, json!({"error": "no script"})))).await
}

fn respond(a: Answer) -> std::pin::Pin<Box<dyn Future<Output = Response> + Send>> {
    Box::pin(async move {
        match a {
            Answer::After(d, next) => {
                tokio::time::sleep(d).await;
                respond(*next).await
            }
            Answer::Status(code, body) => {
                (StatusCode::from_u16(code).unwrap(), axum::Json(body)).into_response()
            }
            Answer::Document(events) => {
                axum::Json(json!({"job_id": "x", "protocol": 1, "events": events})).into_response()
            }
            Answer::Silent => {
                let s = futures_util::stream::pending::<Result<bytes::Bytes, std::io::Error>>();
                Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(Body::from_stream(s))
                    .unwrap()
            }
            Answer::Events { events, cut } => {
                use futures_util::StreamExt;
                let chunks: Vec<Result<bytes::Bytes, std::io::Error>> = events
                    .iter()
                    .map(|e| Ok(bytes::Bytes::from(format!("event:response\ndata:{e}\n\n"))))
                    .collect();
                // The cut comes after the events are out (a replica killed mid-job).
                let tail = futures_util::stream::once(async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Err(std::io::Error::other("replica gone"))
                })
                .filter(move |_| std::future::ready(cut));
                let body = futures_util::stream::iter(chunks).chain(tail);
                Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(Body::from_stream(body))
                    .unwrap()
            }
        }
    })
}

async fn fake() -> (Arc<Fake>, String) {
    let f = Arc::new(Fake::default());
    let app = axum::Router::new()
        .route("/dep/run", axum::routing::post(run))
        .with_state(f.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/dep", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (f, url)
}

/// The store's meta table, in memory (SQLite's pool does not like virtual time).
#[derive(Default)]
struct MemMeta(Mutex<BTreeMap<String, String>>);

#[async_trait::async_trait]
impl comfyume_store::MetaStore for MemMeta {
    async fn get_meta(
        &self,
        key: &str,
    ) -> Result<Option<comfyume_store::MetaEntry>, comfyume_store::StoreError> {
        Ok(self
            .0
            .lock()
            .unwrap()
            .get(key)
            .map(|v| comfyume_store::MetaEntry {
                value: v.clone(),
                updated_at_ms: 0,
                source: "test".into(),
            }))
    }
    async fn put_meta(
        &self,
        key: &str,
        value: &str,
        _: &str,
    ) -> Result<(), comfyume_store::StoreError> {
        self.0.lock().unwrap().insert(key.into(), value.into());
        Ok(())
    }
}

#[derive(Default)]
struct Told(Mutex<Vec<(Vec<String>, String)>>);

#[async_trait::async_trait]
impl Host for Told {
    fn announce(&self, users: &[String], message: &str) {
        self.0
            .lock()
            .unwrap()
            .push((users.to_vec(), message.to_owned()));
    }
    async fn node_definitions(&self, _: Value) {}
}

struct Setup {
    b: Arc<ServerlessBackend>,
    spot: Arc<Fake>,
    od: Arc<Fake>,
    told: Arc<Told>,
    dir: tempfile::TempDir,
}

async fn setup(extra: &[(&str, &str)]) -> Setup {
    let (spot, spot_url) = fake().await;
    let (od, od_url) = fake().await;
    let mut vars: BTreeMap<String, String> = [
        ("SERVERLESS_ENDPOINT_H200_SPOT", spot_url.as_str()),
        ("SERVERLESS_ENDPOINT_H200_ON_DEMAND", od_url.as_str()),
        ("SERVERLESS_FAILOVER", "h200-on-demand"),
        ("SERVERLESS_ACTIVE", "h200-spot"),
        ("SERVERLESS_API_KEY", "inference-key"),
        ("SERVERLESS_WORKER_TOKEN", "worker-token"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for (k, v) in extra {
        vars.insert(k.to_string(), v.to_string());
    }
    let cfg = from_vars(&vars, &|_| Err(std::io::Error::other("no files"))).unwrap();
    let store = Arc::new(MemMeta::default());
    let told = Arc::new(Told::default());
    let b = ServerlessBackend::new(cfg, store, told.clone())
        .await
        .unwrap();
    Setup {
        b,
        spot,
        od,
        told,
        dir: tempfile::tempdir().unwrap(),
    }
}

impl Setup {
    fn job(&self, id: &str, attempt: u32) -> JobSpec {
        JobSpec {
            id: id.into(),
            user: "user001".into(),
            prompt: json!({"9": {"class_type": "SaveImage", "inputs": {}}}),
            extra_data: json!({}),
            outputs_to_execute: vec![],
            inputs: vec![],
            output_dir: self.dir.path().join("out"),
            temp_dir: self.dir.path().join("temp"),
            attempt,
            reattach: false,
        }
    }

    /// Runs a job; returns its outcome and the events it sent.
    async fn run(
        &self,
        job: JobSpec,
        interrupt: watch::Receiver<bool>,
    ) -> (
        Result<comfyume_dispatch::Outcome, BackendError>,
        Vec<BackendEvent>,
    ) {
        let (tx, mut rx) = mpsc::channel(1024);
        let res = self.b.run(job, tx, interrupt).await;
        let mut evs = Vec::new();
        while let Ok(e) = rx.try_recv() {
            evs.push(e);
        }
        (res, evs)
    }

    fn outputs(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.dir.path().join("out"))
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

fn no_interrupt() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    std::mem::forget(tx);
    rx
}

fn file(name: &str) -> Value {
    json!({"filename": name, "subfolder": "", "type": "output"})
}

/// A whole successful job's events, with one inline output of `data`.
fn good_job(id: &str, data: &[u8]) -> Vec<Value> {
    let b64 = base64::engine::general_purpose::STANDARD.encode(data);
    let sha = hex::encode(Sha256::digest(data));
    let f = file("ComfyUI_00001_.png");
    vec![
        json!({"type": "accepted", "job_id": id, "worker": "gpu-1", "protocol": 1, "replay": false}),
        json!({"type": "submitted", "job_id": id}),
        json!({"type": "started", "job_id": id}),
        json!({"type": "comfyui", "job_id": id, "message": {"type": "execution_start", "data": {"prompt_id": id, "timestamp": 1}}}),
        json!({"type": "comfyui", "job_id": id, "message": {"type": "progress", "data": {"value": 1, "max": 2, "prompt_id": id, "node": "3"}}}),
        json!({"type": "keepalive"}),
        json!({"type": "preview", "job_id": id, "frame": base64::engine::general_purpose::STANDARD.encode(b"\0\0\0\x01\0\0\0\x02img")}),
        json!({"type": "output_file", "job_id": id, "file": f, "size": data.len(), "chunks": 1}),
        json!({"type": "output_chunk", "job_id": id, "file": f, "index": 0, "data": b64}),
        json!({"type": "output_end", "job_id": id, "file": f, "size": data.len(), "sha256": sha}),
        json!({"type": "comfyui", "job_id": id, "message": {"type": "executed", "data": {"node": "9", "display_node": "9", "output": {"images": [f]}, "prompt_id": id}}}),
        json!({"type": "comfyui", "job_id": id, "message": {"type": "execution_success", "data": {"prompt_id": id, "timestamp": 2}}}),
        json!({"type": "future_event", "job_id": id}),
        json!({"type": "result", "job_id": id, "outputs": {"9": {"images": [f]}}, "files": [],
               "status": {"status_str": "success", "completed": true, "messages": [["execution_start", {"prompt_id": id, "timestamp": 1}]]},
               "meta": {}, "timing": {"total_ms": 900, "execution_ms": 750}}),
    ]
}

#[tokio::test]
async fn a_job_streams_its_events_and_outputs_with_the_right_headers() {
    let s = setup(&[]).await;
    let png = b"\x89PNG fake image bytes";
    s.spot.script.lock().unwrap().push_back(Answer::Events {
        events: good_job("j1", png),
        cut: false,
    });
    let (res, evs) = s.run(s.job("j1", 1), no_interrupt()).await;
    let outcome = res.unwrap();
    assert_eq!(outcome.kind, OutcomeKind::Success);
    assert_eq!(
        outcome.outputs["9"]["images"][0]["filename"],
        "ComfyUI_00001_.png"
    );
    assert_eq!(s.outputs(), ["ComfyUI_00001_.png"]);
    assert_eq!(
        std::fs::read(s.dir.path().join("out/ComfyUI_00001_.png")).unwrap(),
        png
    );
    // Relayed in order: submitted, started, ComfyUI's messages, the preview frame.
    let kinds: Vec<String> = evs
        .iter()
        .map(|e| match e {
            BackendEvent::Submitted => "submitted".into(),
            BackendEvent::Started => "started".into(),
            BackendEvent::Message(m) => m["type"].as_str().unwrap().to_owned(),
            BackendEvent::Binary(_) => "binary".into(),
            BackendEvent::Notice(n) => format!("notice:{n}"),
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "submitted",
            "started",
            "execution_start",
            "progress",
            "binary",
            "executed",
            "execution_success"
        ]
    );
    // The request: one POST per job, as the protocol and the provider want it.
    let seen = s.spot.seen.lock().unwrap();
    let (h, body) = &seen[0];
    assert_eq!(h["authorization"], "Bearer inference-key");
    assert_eq!(h["x-worker-token"], "worker-token");
    assert_eq!(h["x-inference-id"], "j1");
    assert_eq!(h["accept"], "text/event-stream");
    assert_eq!(body["job_id"], "j1");
    assert_eq!(body["attempt"], 1);
    assert_eq!(body["user"], "user001");
    // GPU time is counted for the participant and the endpoint.
    let costs = s.b.costs();
    assert_eq!(costs["participants_today"][0]["gpu_seconds"], 0.75);
    assert_eq!(
        s.b.banner("user001")["gpu_time_text"],
        "your GPU time today: 0 s"
    );
    let st = s.b.status();
    assert_eq!(
        st["endpoints"][0]["jobs"].as_u64().unwrap() + st["endpoints"][1]["jobs"].as_u64().unwrap(),
        1
    );
}

#[tokio::test]
async fn a_broken_stream_is_retried_on_the_failover_endpoint_with_the_same_id() {
    let s = setup(&[]).await;
    let mut evs = good_job("j2", b"x");
    evs.truncate(5);
    s.spot.script.lock().unwrap().push_back(Answer::Events {
        events: evs,
        cut: true,
    });
    let (res, _) = s.run(s.job("j2", 1), no_interrupt()).await;
    let err = res.unwrap_err();
    assert!(err.retryable(), "{err}");
    assert!(s.outputs().is_empty());
    // The dispatcher's next attempt: the failover endpoint, same job id.
    s.od.script.lock().unwrap().push_back(Answer::Events {
        events: good_job("j2", b"x"),
        cut: false,
    });
    let (res, _) = s.run(s.job("j2", 2), no_interrupt()).await;
    assert_eq!(res.unwrap().kind, OutcomeKind::Success);
    assert_eq!(s.od.seen.lock().unwrap()[0].0["x-inference-id"], "j2");
    assert_eq!(s.spot.seen.lock().unwrap().len(), 1);
    // A stream that simply ends without its final event fails the same way.
    let mut evs = good_job("j3", b"x");
    evs.truncate(3);
    s.spot.script.lock().unwrap().push_back(Answer::Events {
        events: evs,
        cut: false,
    });
    let (res, _) = s.run(s.job("j3", 1), no_interrupt()).await;
    assert!(matches!(res, Err(BackendError::Lost(_))), "{res:?}");
}

#[tokio::test]
async fn damaged_outputs_and_garbage_fail_the_attempt_and_leave_nothing() {
    let s = setup(&[("SERVERLESS_FAIL_THRESHOLD", "100")]).await;
    let mut bad_digest = good_job("j4", b"hello");
    bad_digest[9]["sha256"] = json!("0".repeat(64));
    let mut too_long = good_job("j5", b"hello");
    too_long[7]["size"] = json!(2);
    let mut out_of_order = good_job("j6", b"hello");
    out_of_order[8]["index"] = json!(3);
    let mut not_base64 = good_job("j7", b"hello");
    not_base64[8]["data"] = json!("***");
    let mut wrong_type = good_job("j8", b"hello");
    wrong_type[7]["file"]["type"] = json!("input");
    for (id, evs) in [
        ("j4", bad_digest),
        ("j5", too_long),
        ("j6", out_of_order),
        ("j7", not_base64),
        ("j8", wrong_type),
    ] {
        s.spot.script.lock().unwrap().push_back(Answer::Events {
            events: evs,
            cut: false,
        });
        let (res, _) = s.run(s.job(id, 1), no_interrupt()).await;
        assert!(
            matches!(res, Err(BackendError::Protocol(_))),
            "{id}: {res:?}"
        );
    }
    // Not JSON at all.
    s.od.script.lock().unwrap().push_back(Answer::Events {
        events: vec![json!("not an object")],
        cut: false,
    });
    let (res, _) = s.run(s.job("j9", 2), no_interrupt()).await;
    assert!(res.is_err());
    assert!(s.outputs().is_empty(), "{:?}", s.outputs());
}

#[tokio::test]
async fn the_jobs_own_errors_are_final_and_aborted_is_retried() {
    let s = setup(&[]).await;
    let timing = json!({"total_ms": 5, "execution_ms": 3});
    let data = json!({"prompt_id": "e1", "node_id": "2", "exception_message": "boom", "exception_type": "RuntimeError"});
    s.spot.script.lock().unwrap().extend([
        Answer::Events {
            events: vec![json!({"type": "error", "job_id": "e1", "kind": "execution_error", "data": data, "outputs": {}, "files": [], "status": {"messages": []}, "meta": {}, "timing": timing})],
            cut: false,
        },
        Answer::Events {
            events: vec![json!({"type": "error", "job_id": "e2", "kind": "rejected", "data": {"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation"}, "node_errors": {}}, "timing": timing})],
            cut: false,
        },
        Answer::Events {
            events: vec![json!({"type": "error", "job_id": "e3", "kind": "worker", "reason": "output_too_large", "message": "too big", "timing": timing})],
            cut: false,
        },
        Answer::Events {
            events: vec![json!({"type": "aborted", "job_id": "e4", "reason": "sigterm", "message": "scale-down", "timing": timing})],
            cut: false,
        },
        Answer::Status(401, json!({"error": "a valid inference API key is required"})),
        Answer::Status(503, json!({"error": {"type": "not_ready", "message": "starting"}})),
    ]);
    let (res, _) = s.run(s.job("e1", 1), no_interrupt()).await;
    let o = res.unwrap();
    assert_eq!(o.kind, OutcomeKind::ExecutionError(data.clone()));
    assert_eq!(o.messages, vec![json!(["execution_error", data])]);
    let (res, _) = s.run(s.job("e2", 1), no_interrupt()).await;
    assert!(
        matches!(&res, Err(BackendError::Rejected(b)) if b["error"]["message"] == "Prompt outputs failed validation"),
        "{res:?}"
    );
    let (res, _) = s.run(s.job("e3", 1), no_interrupt()).await;
    assert!(
        matches!(&res, Err(BackendError::Rejected(b)) if b["error"]["type"] == "output_too_large"),
        "{res:?}"
    );
    let (res, _) = s.run(s.job("e4", 1), no_interrupt()).await;
    let e = res.unwrap_err();
    assert!(e.retryable() && e.to_string().contains("sigterm"), "{e}");
    let (res, _) = s.run(s.job("e5", 1), no_interrupt()).await;
    assert!(
        matches!(&res, Err(BackendError::Rejected(b)) if b["error"]["message"].as_str().unwrap().contains("401")),
        "{res:?}"
    );
    let (res, _) = s.run(s.job("e6", 1), no_interrupt()).await;
    assert!(res.unwrap_err().retryable());
}

#[tokio::test(start_paused = true)]
async fn a_cold_gpu_is_announced_and_its_start_learnt() {
    let s = setup(&[]).await;
    // The provider holds the request 100 s (a cold start), then a worker takes it.
    s.spot.script.lock().unwrap().push_back(Answer::After(
        Duration::from_secs(100),
        Box::new(Answer::Events {
            events: good_job("c1", b"x"),
            cut: false,
        }),
    ));
    let (res, evs) = s.run(s.job("c1", 1), no_interrupt()).await;
    assert_eq!(res.unwrap().kind, OutcomeKind::Success);
    let notices: Vec<&String> = evs
        .iter()
        .filter_map(|e| match e {
            BackendEvent::Notice(n) => Some(n),
            _ => None,
        })
        .collect();
    assert_eq!(notices[0], "GPU starting, about 3 min", "{notices:?}");
    assert!(notices[1].starts_with("GPU ready"), "{notices:?}");
    let told = s.told.0.lock().unwrap().clone();
    assert_eq!(
        told[0],
        (
            vec!["user001".to_string()],
            "GPU starting, about 3 min".to_string()
        )
    );
    let st = s.b.status();
    let spot = &st["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "h200-spot")
        .unwrap()
        .clone();
    // Measured from the request (virtual time may move on while sockets connect).
    let learnt = spot["cold_start_secs"][0].as_u64().unwrap();
    assert!((100..=110).contains(&learnt), "{spot}");
    assert_eq!(spot["cold_start_estimate_secs"], learnt);

    // The next cold start is estimated from the learnt one.
    s.spot.script.lock().unwrap().push_back(Answer::After(
        Duration::from_secs(10),
        Box::new(Answer::Events {
            events: good_job("c2", b"x"),
            cut: false,
        }),
    ));
    let (_, evs) = s.run(s.job("c2", 1), no_interrupt()).await;
    assert!(
        evs.iter()
            .any(|e| matches!(e, BackendEvent::Notice(n) if n == "GPU starting, about 2 min")),
        "{evs:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_silent_stream_is_given_up_at_the_production_silence_limit() {
    let s = setup(&[]).await;
    s.spot.script.lock().unwrap().push_back(Answer::Silent);
    let started = tokio::time::Instant::now();
    let (res, _) = s.run(s.job("s1", 1), no_interrupt()).await;
    let e = res.unwrap_err();
    assert!(
        e.to_string().contains("no word from the GPU for 45 s"),
        "{e}"
    );
    assert!(started.elapsed() >= Duration::from_secs(45));
}

#[tokio::test(start_paused = true)]
async fn an_interrupt_closes_the_stream_and_reports_interrupted() {
    let s = setup(&[]).await;
    s.spot.script.lock().unwrap().push_back(Answer::Silent);
    let (tx, rx) = watch::channel(false);
    let stop = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(3)).await;
        tx.send(true).unwrap();
        tx
    });
    let (res, _) = s.run(s.job("i1", 1), rx).await;
    assert!(matches!(res.unwrap().kind, OutcomeKind::Interrupted(_)));
    drop(stop.await);
}

#[tokio::test]
async fn streams_that_keep_being_cut_switch_the_endpoint_to_async_mode() {
    let s = setup(&[("SERVERLESS_FAIL_THRESHOLD", "100")]).await;
    for id in ["a1", "a2", "a0"] {
        let mut evs = good_job(id, b"x");
        evs.truncate(4);
        s.spot.script.lock().unwrap().push_back(Answer::Events {
            events: evs,
            cut: true,
        });
        let (res, _) = s.run(s.job(id, 1), no_interrupt()).await;
        assert!(res.is_err());
    }
    // A worker reached directly answers the async mode with one document.
    s.spot
        .script
        .lock()
        .unwrap()
        .push_back(Answer::Document(good_job("a3", b"doc")));
    let (res, evs) = s.run(s.job("a3", 1), no_interrupt()).await;
    assert_eq!(res.unwrap().kind, OutcomeKind::Success);
    assert!(
        evs.iter()
            .any(|e| matches!(e, BackendEvent::Message(m) if m["type"] == "executed"))
    );
    let seen = s.spot.seen.lock().unwrap();
    assert_eq!(seen[3].0["prefer"], "respond-async");
    assert!(seen[0].0.get("prefer").is_none());
    assert_eq!(
        s.b.status()["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "h200-spot")
            .unwrap()["mode"],
        "async"
    );
}

#[tokio::test]
async fn an_endpoint_that_keeps_failing_is_passed_over() {
    let s = setup(&[("SERVERLESS_FAIL_THRESHOLD", "2")]).await;
    for i in 0..2 {
        s.spot
            .script
            .lock()
            .unwrap()
            .push_back(Answer::Status(502, json!({"error": "replica failed"})));
        let (res, _) = s.run(s.job(&format!("p{i}"), 1), no_interrupt()).await;
        assert!(res.unwrap_err().retryable());
    }
    let st = s.b.status();
    assert_eq!(st["primary"], "h200-on-demand", "{st}");
    let spot = st["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "h200-spot")
        .unwrap()
        .clone();
    assert_eq!(spot["state"], "failing");
    assert!(
        spot["passed_over"]["reason"]
            .as_str()
            .unwrap()
            .contains("2 failed attempts"),
        "{spot}"
    );
    // New jobs now go to the failover endpoint first.
    s.od.script.lock().unwrap().push_back(Answer::Events {
        events: good_job("p9", b"x"),
        cut: false,
    });
    let (res, _) = s.run(s.job("p9", 1), no_interrupt()).await;
    assert_eq!(res.unwrap().kind, OutcomeKind::Success);
    assert_eq!(s.spot.seen.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn routing_changes_take_effect_at_once_and_are_checked() {
    let s = setup(&[]).await;
    let r =
        s.b.set_routing(comfyume_serverless::Routing {
            active: "H200-ON-DEMAND".into(),
            failover: vec!["h200-spot".into()],
        })
        .await
        .unwrap();
    assert_eq!(r.active, "h200-on-demand");
    assert!(
        s.b.set_routing(comfyume_serverless::Routing {
            active: "b300-spot".into(),
            failover: vec![],
        })
        .await
        .is_err()
    );
    s.od.script.lock().unwrap().push_back(Answer::Events {
        events: good_job("r1", b"x"),
        cut: false,
    });
    let (res, _) = s.run(s.job("r1", 1), no_interrupt()).await;
    assert_eq!(res.unwrap().kind, OutcomeKind::Success);
    assert!(s.spot.seen.lock().unwrap().is_empty());
}

/// A management API: token, one deployment's status, replicas and scaling.
async fn management(status: &'static str, replicas: Value) -> String {
    let app = axum::Router::new()
        .route(
            "/v1/oauth2/token",
            axum::routing::post(|body: axum::body::Bytes| async move {
                let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                if v["client_id"] == "cid" && v["client_secret"] == "csecret" {
                    axum::Json(json!({"access_token": "tok", "expires_in": 3600})).into_response()
                } else {
                    StatusCode::UNAUTHORIZED.into_response()
                }
            }),
        )
        .route(
            "/v1/container-deployments/dep/status",
            axum::routing::get(move |h: HeaderMap| async move {
                if h["authorization"] != "Bearer tok" {
                    return StatusCode::UNAUTHORIZED.into_response();
                }
                axum::Json(json!({"status": status})).into_response()
            }),
        )
        .route(
            "/v1/container-deployments/dep/replicas",
            axum::routing::get(move || {
                let r = replicas.clone();
                async move { axum::Json(json!({"list": r})) }
            }),
        )
        .route(
            "/v1/container-deployments/dep/scaling",
            axum::routing::get(|| async { axum::Json(json!({"queue_message_ttl_seconds": 900})) }),
        );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    url
}

async fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    for _ in 0..200 {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}

#[tokio::test]
async fn a_deployment_without_capacity_is_passed_over_and_replicas_are_billed() {
    let api = management(
        "quota_reached",
        json!([{"id": "r1", "status": "running", "started_at": "2026-01-01T00:00:00Z"}]),
    )
    .await;
    let s = setup(&[
        ("VERDA_API_URL", &api),
        ("VERDA_CLIENT_ID", "cid"),
        ("VERDA_CLIENT_SECRET", "csecret"),
        ("SERVERLESS_POLL_SECS", "1"),
        ("SERVERLESS_DEPLOYMENT_H200_SPOT", "dep"),
        // Unknown to this management API: its polls fail and change nothing.
        ("SERVERLESS_DEPLOYMENT_H200_ON_DEMAND", "other"),
    ])
    .await;
    s.b.start();
    let b = s.b.clone();
    assert!(
        eventually(|| b.status()["primary"] == "h200-on-demand").await,
        "{}",
        s.b.status()
    );
    let st = s.b.status();
    let spot = st["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "h200-spot")
        .unwrap()
        .clone();
    assert_eq!(spot["state"], "failing");
    assert_eq!(spot["deployment_status"], "quota_reached");
    assert_eq!(
        spot["passed_over"]["reason"],
        "deployment status quota_reached"
    );
    assert_eq!(spot["request_ttl_secs"], 900);
    assert_eq!(spot["replicas_running"], 1);
    // A replica running since New Year: many 10-minute intervals, priced at 0.97/h.
    let intervals = spot["replica_intervals"].as_u64().unwrap();
    assert!(intervals > 1000, "{spot}");
    let cost = spot["replica_cost_eur"].as_f64().unwrap();
    assert!(
        (cost - intervals as f64 * 0.97 / 6.0).abs() < 0.01,
        "{spot}"
    );
}

#[tokio::test]
async fn a_warm_up_fetches_the_node_definitions_from_the_worker() {
    #[derive(Default)]
    struct Nodes(Mutex<Option<Value>>);
    #[async_trait::async_trait]
    impl Host for Nodes {
        fn announce(&self, _: &[String], _: &str) {}
        async fn node_definitions(&self, info: Value) {
            *self.0.lock().unwrap() = Some(info);
        }
    }
    let app = axum::Router::new().route(
        "/dep/object_info",
        axum::routing::get(|h: HeaderMap| async move {
            assert_eq!(h["x-worker-token"], "worker-token");
            axum::Json(json!({"KSampler": {"input": {}}}))
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/dep", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    let vars: BTreeMap<String, String> = [
        ("SERVERLESS_ENDPOINT_H200_SPOT", url.as_str()),
        ("SERVERLESS_WORKER_TOKEN", "worker-token"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let cfg = from_vars(&vars, &|_| Err(std::io::Error::other("no files"))).unwrap();
    let nodes = Arc::new(Nodes::default());
    let b = ServerlessBackend::new(cfg, Arc::new(MemMeta::default()), nodes.clone())
        .await
        .unwrap();
    // Never asked at start: only a warm-up reaches the endpoint.
    assert!(b.object_info().await.is_err());
    assert!(b.warmup(Some("nowhere")).is_err());
    assert_eq!(b.warmup(None).unwrap(), "h200-spot");
    let n = nodes.clone();
    assert!(eventually(|| n.0.lock().unwrap().is_some()).await);
    assert_eq!(
        b.object_info().await.unwrap()["KSampler"],
        json!({"input": {}})
    );
}
