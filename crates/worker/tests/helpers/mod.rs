//! Shared test support: the ComfyUI simulator in-process, the worker in-process (port 0,
//! fresh data directory) or as its real binary, and a reader of its event streams.
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use comfyume_sim::{SimConfig, SimHandle};
use comfyume_wire::worker::SseParser;
use comfyume_worker::Args;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

pub async fn sim(step_ms: u64) -> SimHandle {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    comfyume_sim::spawn(
        SimConfig {
            step_ms,
            ..SimConfig::default()
        },
        listener,
    )
    .await
}

/// A worker running in this process.
pub struct Worker {
    pub url: String,
    stop: Option<oneshot::Sender<()>>,
    pub task: Option<tokio::task::JoinHandle<Result<(), comfyume_worker::WorkerError>>>,
    pub data: tempfile::TempDir,
}

impl Worker {
    /// What SIGTERM does in the binary.
    pub fn sigterm(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }

    /// Waits for `serve` to return.
    pub async fn stopped(&mut self) -> Result<(), comfyume_worker::WorkerError> {
        self.task.take().expect("running").await.unwrap()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// Default settings against `comfyui_url`, with short ComfyUI timeouts for tests.
pub fn args(comfyui_url: &str) -> Args {
    let mut a = Args::for_comfyui(comfyui_url);
    a.comfyui_request_timeout_secs = 5;
    a.comfyui_transfer_timeout_secs = 60;
    a.comfyui_silence_timeout_secs = 30;
    a
}

pub async fn start_worker(mut args: Args) -> Worker {
    let data = tempfile::tempdir().unwrap();
    if args.data_dir.is_none() {
        args.data_dir = Some(data.path().to_path_buf());
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(comfyume_worker::serve(args, listener, async move {
        let _ = rx.await;
    }));
    Worker {
        url,
        stop: Some(tx),
        task: Some(task),
        data,
    }
}

pub fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// `GET /health` → (status, body["status"]).
pub async fn health(url: &str) -> (u16, String) {
    match client().get(format!("{url}/health")).send().await {
        Ok(r) => {
            let code = r.status().as_u16();
            let body: Value = r.json().await.unwrap_or(Value::Null);
            (code, body["status"].as_str().unwrap_or_default().to_owned())
        }
        Err(e) => (0, format!("unreachable: {e:?}")),
    }
}

/// Polls `/health` until it says `want`; returns every distinct status seen on the way.
pub async fn wait_health(url: &str, want: &str, limit: Duration) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut seen: Vec<String> = Vec::new();
    loop {
        let (_, s) = health(url).await;
        if seen.last() != Some(&s) {
            seen.push(s.clone());
        }
        if s == want {
            return seen;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "health never said {want}; saw {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn run_body(job_id: &str, prompt: Value) -> Value {
    json!({
        "job_id": job_id,
        "prompt": prompt,
        "extra_data": {"extra_pnginfo": {"workflow": {"nodes": []}}},
        "user": "user001",
    })
}

pub async fn post_run(url: &str, body: &Value) -> reqwest::Response {
    client()
        .post(format!("{url}/run"))
        .header("accept", "text/event-stream")
        .json(body)
        .send()
        .await
        .unwrap()
}

/// Reads an SSE answer event by event, checking the framing on the way: every data
/// line is one JSON object, no `event:` or `id:` fields.
pub struct Events {
    resp: reqwest::Response,
    parser: SseParser,
    pending: VecDeque<Value>,
    partial_line: Vec<u8>,
    pub data_lines: usize,
    pub keepalive_comments: usize,
}

impl Events {
    pub fn new(resp: reqwest::Response) -> Self {
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        Events {
            resp,
            parser: SseParser::new(4 * 1024 * 1024),
            pending: VecDeque::new(),
            partial_line: Vec::new(),
            data_lines: 0,
            keepalive_comments: 0,
        }
    }

    fn check_lines(&mut self, bytes: &[u8]) {
        self.partial_line.extend_from_slice(bytes);
        while let Some(pos) = self.partial_line.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial_line.drain(..=pos).collect();
            let line = std::str::from_utf8(&line[..line.len() - 1]).unwrap();
            if line.is_empty() {
                continue;
            }
            if line.starts_with(':') {
                self.keepalive_comments += 1;
                continue;
            }
            let data = line
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data line: {line:.200}"));
            let v: Value = serde_json::from_str(data)
                .unwrap_or_else(|e| panic!("data line is not one JSON value ({e}): {data:.200}"));
            assert!(v.is_object(), "data line is not an object: {data:.200}");
            self.data_lines += 1;
        }
    }

    /// The next event (keep-alives included), `None` at the end of the stream.
    pub async fn next(&mut self) -> Option<Value> {
        loop {
            if let Some(v) = self.pending.pop_front() {
                return Some(v);
            }
            let chunk = self.resp.chunk().await.ok()??;
            self.check_lines(&chunk);
            for ev in self.parser.feed(&chunk).unwrap() {
                assert!(ev.event.is_none(), "the worker sent an event name");
                self.pending
                    .push_back(serde_json::from_str(&ev.data).unwrap());
            }
        }
    }

    /// The next event that is not a keep-alive, within `limit`.
    pub async fn next_within(&mut self, limit: Duration) -> Option<Value> {
        tokio::time::timeout(limit, async {
            loop {
                match self.next().await {
                    Some(v) if v["type"] == "keepalive" => continue,
                    other => return other,
                }
            }
        })
        .await
        .expect("no event in time")
    }

    /// Every event to the end of the stream (keep-alives left out).
    pub async fn rest(&mut self) -> Vec<Value> {
        let mut out = Vec::new();
        while let Some(v) = self.next().await {
            if v["type"] != "keepalive" {
                out.push(v);
            }
        }
        out
    }

    /// Events until one of type `kind` (included).
    pub async fn until(&mut self, kind: &str) -> Vec<Value> {
        let mut out = Vec::new();
        loop {
            let v = self
                .next_within(Duration::from_secs(60))
                .await
                .unwrap_or_else(|| panic!("stream ended before {kind}; got {out:?}"));
            let done = v["type"] == kind;
            out.push(v);
            if done {
                return out;
            }
        }
    }
}

pub fn types(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["type"].as_str().unwrap_or("?").to_owned())
        .collect()
}

/// The inline files of a stream, checked against their `output_end` size and digest.
pub fn inline_files(events: &[Value]) -> HashMap<String, Vec<u8>> {
    let mut files: HashMap<String, Vec<u8>> = HashMap::new();
    let mut next_index: HashMap<String, u64> = HashMap::new();
    for e in events {
        let name = || e["file"]["filename"].as_str().unwrap().to_owned();
        match e["type"].as_str() {
            Some("output_file") => {
                files.insert(name(), Vec::new());
                next_index.insert(name(), 0);
            }
            Some("output_chunk") => {
                let n = name();
                let idx = next_index.get_mut(&n).expect("chunk before output_file");
                assert_eq!(e["index"].as_u64().unwrap(), *idx, "chunks in order");
                *idx += 1;
                let data = B64.decode(e["data"].as_str().unwrap()).unwrap();
                files.get_mut(&n).unwrap().extend_from_slice(&data);
            }
            Some("output_end") => {
                let data = &files[&name()];
                assert_eq!(data.len() as u64, e["size"].as_u64().unwrap());
                assert_eq!(hex(&Sha256::digest(data)), e["sha256"].as_str().unwrap());
            }
            _ => {}
        }
    }
    files
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes nothing, reads nothing: a bare API-format workflow that saves one image.
pub fn nomodel(prefix: &str) -> Value {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 16711680}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}}
    })
}

/// The stock frontend's default graph with `steps` sampler steps and a small picture.
pub fn sampler(steps: u32, seed: u64) -> Value {
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

/// Loads `image` (a file in the simulator's input folder) and saves it again: the output
/// is as large as the picture (noise does not compress).
pub fn resave(image: &str, prefix: &str) -> Value {
    json!({
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}}
    })
}

/// A PNG of random pixels (does not compress: about 3 bytes a pixel).
pub fn noise_png(w: u32, h: u32) -> Vec<u8> {
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
