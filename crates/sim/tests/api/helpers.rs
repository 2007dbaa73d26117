//! Test harness: a fresh simulator on 127.0.0.1:0 and clients that talk to it like ComfyUI
//! clients do (reqwest for HTTP, tokio-tungstenite for the WebSocket).

#![allow(dead_code)]

use comfyume_sim::{SimConfig, SimHandle};
use futures_util::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const SHARED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/comfyui");

/// Upper bound for anything a test waits for.
pub const WAIT: Duration = Duration::from_secs(10);

pub fn shared_file(rel: &str) -> String {
    format!("{SHARED}/{rel}")
}

pub fn workflow(name: &str) -> Value {
    let text = std::fs::read_to_string(shared_file(&format!("workflows/{name}"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The message types of a capture in traces/, in order.
pub fn trace_types(name: &str) -> Vec<String> {
    trace_messages(name)
        .iter()
        .map(|m| m["type"].as_str().unwrap().to_string())
        .collect()
}

pub fn trace_messages(name: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(shared_file(&format!("traces/{name}"))).unwrap();
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(_, json)| serde_json::from_str(json).unwrap())
        .collect()
}

/// A fresh directory for a simulator whose end is not graceful (die/kill leave their files).
pub struct Scratch(pub std::path::PathBuf);

impl Scratch {
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("comfyume-sim-test-{}", uuid_like()));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

pub struct TestSim {
    pub sim: SimHandle,
    pub http: reqwest::Client,
}

pub async fn spawn_sim(config: SimConfig) -> TestSim {
    // reqwest is built without a default TLS provider in this workspace.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim = comfyume_sim::spawn(config, listener).await;
    let http = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    TestSim { sim, http }
}

/// A simulator with short steps, for most tests.
pub async fn quick_sim() -> TestSim {
    spawn_sim(SimConfig {
        step_ms: 10,
        ..SimConfig::default()
    })
    .await
}

impl TestSim {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.sim.url())
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http.get(self.url(path)).send().await.unwrap()
    }

    pub async fn get_json(&self, path: &str) -> Value {
        let r = self.get(path).await;
        assert_eq!(r.status(), StatusCode::OK, "GET {path}");
        r.json().await.unwrap()
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// POST /prompt; returns status and JSON body.
    pub async fn queue_prompt(
        &self,
        prompt: &Value,
        client_id: Option<&str>,
    ) -> (StatusCode, Value) {
        let mut body = json!({"prompt": prompt});
        if let Some(c) = client_id {
            body["client_id"] = json!(c);
        }
        self.submit(&body).await
    }

    pub async fn submit(&self, body: &Value) -> (StatusCode, Value) {
        let r = self.post_json("/prompt", body).await;
        let status = r.status();
        (status, r.json().await.unwrap())
    }

    /// Queue and return the prompt id (the prompt must be valid).
    pub async fn queue_ok(&self, prompt: &Value, client_id: Option<&str>) -> String {
        let (status, body) = self.queue_prompt(prompt, client_id).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["prompt_id"].as_str().unwrap().to_string()
    }

    pub async fn history_entry(&self, prompt_id: &str) -> Option<Value> {
        let h = self.get_json(&format!("/history/{prompt_id}")).await;
        h.get(prompt_id).cloned()
    }

    /// Poll /history/{id} until the entry exists.
    pub async fn wait_history(&self, prompt_id: &str) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(e) = self.history_entry(prompt_id).await {
                return e;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no history for {prompt_id}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Wait until the worker is running a job (optionally a given one) that has reached a node.
    pub async fn wait_running(&self, prompt_id: &str) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let s = self.sim.state();
            if s.current_job
                .as_ref()
                .is_some_and(|j| j.prompt_id == prompt_id && j.node.is_some())
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "job {prompt_id} never ran"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Wait until `prompt_id` executes `node`.
    pub async fn wait_node(&self, prompt_id: &str, node: &str) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let s = self.sim.state();
            if s.current_job
                .as_ref()
                .is_some_and(|j| j.prompt_id == prompt_id && j.node.as_deref() == Some(node))
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "job {prompt_id} never reached node {node}"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    pub async fn ws(&self, client_id: Option<&str>) -> Ws {
        Ws::connect(&self.sim.ws_url(), client_id).await
    }
}

#[derive(Debug, Clone)]
pub enum Frame {
    Json(Value),
    Binary(Vec<u8>),
}

impl Frame {
    pub fn json(&self) -> Option<&Value> {
        match self {
            Frame::Json(v) => Some(v),
            Frame::Binary(_) => None,
        }
    }
    pub fn ty(&self) -> String {
        match self {
            Frame::Json(v) => v["type"].as_str().unwrap_or_default().to_string(),
            Frame::Binary(b) => format!("binary:{}", u32::from_be_bytes([b[0], b[1], b[2], b[3]])),
        }
    }
}

pub struct Ws {
    stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// What a socket saw when it stopped yielding frames.
#[derive(Debug, PartialEq, Eq)]
pub enum WsEnd {
    Timeout,
    /// The server closed with or without a close frame.
    Closed,
}

impl Ws {
    pub async fn connect(base: &str, client_id: Option<&str>) -> Ws {
        let url = match client_id {
            Some(c) => format!("{base}?clientId={c}"),
            None => base.to_string(),
        };
        let (stream, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        Ws { stream }
    }

    pub async fn send_text(&mut self, text: &str) {
        self.stream.send(Message::Text(text.into())).await.unwrap();
    }

    /// What the stock frontend sends on open.
    pub async fn send_feature_flags(&mut self) {
        self.send_text(r#"{"type": "feature_flags", "data": {"supports_preview_metadata": true, "supports_manager_v4_ui": true}}"#)
            .await;
    }

    /// The next text or binary frame, or how the socket ended.
    pub async fn next_within(&mut self, d: Duration) -> Result<Frame, WsEnd> {
        loop {
            match tokio::time::timeout(d, self.stream.next()).await {
                Err(_) => return Err(WsEnd::Timeout),
                Ok(None) | Ok(Some(Err(_))) => return Err(WsEnd::Closed),
                Ok(Some(Ok(Message::Text(t)))) => {
                    return Ok(Frame::Json(serde_json::from_str(t.as_str()).unwrap()));
                }
                Ok(Some(Ok(Message::Binary(b)))) => return Ok(Frame::Binary(b.to_vec())),
                Ok(Some(Ok(Message::Close(_)))) => return Err(WsEnd::Closed),
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    /// The next text frame verbatim.
    pub async fn next_text(&mut self) -> String {
        loop {
            match tokio::time::timeout(WAIT, self.stream.next())
                .await
                .expect("websocket frame")
            {
                Some(Ok(Message::Text(t))) => return t.as_str().to_string(),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    pub async fn next(&mut self) -> Frame {
        self.next_within(WAIT).await.expect("websocket frame")
    }

    pub async fn next_json(&mut self) -> Value {
        match self.next().await {
            Frame::Json(v) => v,
            Frame::Binary(_) => panic!("expected a text frame"),
        }
    }

    /// Everything up to and including `executing` with `node: null` for `prompt_id`.
    pub async fn until_done(&mut self, prompt_id: &str) -> Vec<Frame> {
        let mut out = Vec::new();
        loop {
            let f = self.next().await;
            let done = f.json().is_some_and(|v| {
                v["type"] == "executing"
                    && v["data"]["node"].is_null()
                    && v["data"]["prompt_id"] == prompt_id
            });
            out.push(f);
            if done {
                return out;
            }
        }
    }

    /// Everything that arrives within `d` of quiet.
    pub async fn drain(&mut self, d: Duration) -> Vec<Frame> {
        let mut out = Vec::new();
        while let Ok(f) = self.next_within(d).await {
            out.push(f);
        }
        out
    }
}

pub fn types(frames: &[Frame]) -> Vec<String> {
    frames.iter().map(Frame::ty).collect()
}

/// A Flux.2-style text-to-image graph of the workshop template kind.
pub fn flux_workflow(steps: u32, seed: u64, size: u32) -> Value {
    json!({
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux-2-klein-4b.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": "qwen_3_4b.safetensors", "type": "flux2", "device": "default"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "flux2-vae.safetensors"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse at dusk", "clip": ["2", 0]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 0]}},
        "6": {"class_type": "EmptyFlux2LatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "7": {"class_type": "Flux2Scheduler", "inputs": {"steps": steps, "width": size, "height": size}},
        "8": {"class_type": "CFGGuider", "inputs": {"model": ["1", 0], "positive": ["4", 0], "negative": ["5", 0], "cfg": 1.0}},
        "9": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "10": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
        "11": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["10", 0], "guider": ["8", 0], "sampler": ["9", 0], "sigmas": ["7", 0], "latent_image": ["6", 0]}},
        "12": {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["3", 0]}},
        "13": {"class_type": "SaveImage", "inputs": {"images": ["12", 0], "filename_prefix": "flux2"}}
    })
}

/// An LTX-2-style text-to-video graph.
pub fn ltx_workflow(steps: u32, frames: u32) -> Value {
    json!({
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "ltx-2-19b-dev-fp8.safetensors"}},
        "2": {"class_type": "LTXAVTextEncoderLoader", "inputs": {"text_encoder": "gemma_3_12B_it.safetensors", "ckpt_name": "ltx-2-19b-dev-fp8.safetensors", "device": "default"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "waves on a beach", "clip": ["2", 0]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 0]}},
        "5": {"class_type": "LTXVConditioning", "inputs": {"positive": ["3", 0], "negative": ["4", 0], "frame_rate": 25.0}},
        "6": {"class_type": "EmptyLTXVLatentVideo", "inputs": {"width": 128, "height": 96, "length": frames, "batch_size": 1}},
        "7": {"class_type": "LTXVScheduler", "inputs": {"steps": steps, "max_shift": 2.05, "base_shift": 0.95, "stretch": true, "terminal": 0.1, "latent": ["6", 0]}},
        "8": {"class_type": "CFGGuider", "inputs": {"model": ["1", 0], "positive": ["5", 0], "negative": ["5", 1], "cfg": 3.0}},
        "9": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "10": {"class_type": "RandomNoise", "inputs": {"noise_seed": 7}},
        "11": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["10", 0], "guider": ["8", 0], "sampler": ["9", 0], "sigmas": ["7", 0], "latent_image": ["6", 0]}},
        "12": {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["1", 2]}},
        "13": {"class_type": "CreateVideo", "inputs": {"images": ["12", 0], "fps": 25.0}},
        "14": {"class_type": "SaveVideo", "inputs": {"video": ["13", 0], "filename_prefix": "video/ltx", "format": "auto", "codec": "auto"}}
    })
}

/// The stock frontend's default graph ("Load Default"), as its `graphToPrompt` sends it.
pub fn default_graph(seed: u64) -> Value {
    json!({
        "3": {"class_type": "KSampler", "inputs": {"seed": seed, "steps": 20, "cfg": 8, "sampler_name": "euler", "scheduler": "normal", "denoise": 1, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly-fp16.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "beautiful scenery nature glass bottle landscape, , purple galaxy bottle,", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "text, watermark", "clip": ["4", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}}
    })
}

/// What a test needs to know of an MP4 file, read from its boxes.
#[derive(Debug, Default)]
pub struct Mp4 {
    /// The sample entry's type (`avc1` for H.264).
    pub codec: String,
    /// `AVCProfileIndication` of the `avcC` box (66: Baseline).
    pub profile: u8,
    pub width: u32,
    pub height: u32,
    /// Samples (frames) in `stsz`.
    pub samples: u32,
    pub duration_ms: u32,
    pub handler: String,
}

impl Mp4 {
    pub fn parse(data: &[u8]) -> Mp4 {
        let mut out = Mp4::default();
        assert_eq!(&data[4..8], b"ftyp", "not an MP4 file");
        Self::walk(data, &mut out);
        assert!(out.samples > 0, "no samples: {out:?}");
        out
    }

    fn be32(b: &[u8]) -> u32 {
        u32::from_be_bytes(b[..4].try_into().unwrap())
    }

    fn walk(data: &[u8], out: &mut Mp4) {
        let mut pos = 0;
        while pos + 8 <= data.len() {
            let size = Self::be32(&data[pos..]) as usize;
            assert!(
                size >= 8 && pos + size <= data.len(),
                "box overruns at {pos}"
            );
            let kind = &data[pos + 4..pos + 8];
            let body = &data[pos + 8..pos + size];
            match kind {
                b"moov" | b"trak" | b"mdia" | b"minf" | b"stbl" => Self::walk(body, out),
                b"mvhd" => out.duration_ms = Self::be32(&body[16..]),
                b"hdlr" => {
                    out.handler = String::from_utf8_lossy(&body[24..])
                        .trim_end_matches('\0')
                        .to_string()
                }
                b"stsz" => out.samples = Self::be32(&body[8..]),
                b"stsd" => {
                    let entry = &body[8..];
                    out.codec = String::from_utf8_lossy(&entry[4..8]).to_string();
                    out.width = u32::from(u16::from_be_bytes([entry[32], entry[33]]));
                    out.height = u32::from(u16::from_be_bytes([entry[34], entry[35]]));
                    // avcC follows the 78-byte visual sample entry.
                    let avcc = &entry[8 + 78..];
                    assert_eq!(&avcc[4..8], b"avcC");
                    out.profile = avcc[9];
                }
                _ => {}
            }
            pos += size;
        }
    }
}

/// The `tEXt` chunks of a PNG file, in order.
pub fn png_text(png: &[u8]) -> Vec<(String, String)> {
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "not a PNG file");
    let mut out = Vec::new();
    let mut pos = 8;
    while pos + 8 <= png.len() {
        let len = u32::from_be_bytes(png[pos..pos + 4].try_into().unwrap()) as usize;
        let body = &png[pos + 8..pos + 8 + len];
        if &png[pos + 4..pos + 8] == b"tEXt"
            && let Some(nul) = body.iter().position(|b| *b == 0)
        {
            let latin1 = |b: &[u8]| b.iter().map(|c| char::from(*c)).collect::<String>();
            out.push((latin1(&body[..nul]), latin1(&body[nul + 1..])));
        }
        pos += len + 12;
    }
    out
}

/// The `comfyume-sim` note of a PNG the simulator wrote.
pub fn sim_note(png: &[u8]) -> String {
    png_text(png)
        .into_iter()
        .find(|(k, _)| k == "comfyume-sim")
        .map(|(_, v)| v)
        .expect("the PNG has a comfyume-sim note")
}
