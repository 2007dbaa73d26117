//! `ui-load`: start time and memory of the real `comfyume serve` process while N
//! participants load the stock frontend and keep their WebSocket open.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use serde_json::json;

use crate::common::{self, Serve, Ws};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Participants loading the page (each then keeps one WebSocket open).
    #[arg(long, default_value_t = 20)]
    pub participants: usize,
    /// The `comfyume` binary to measure.
    #[arg(long, default_value = "target/release/comfyume")]
    pub bin: PathBuf,
    /// The installed frontend (`scripts/install-frontend.sh target/test-data`).
    #[arg(long, default_value = "target/test-data/frontend/1.37.11")]
    pub frontend: PathBuf,
    /// Start-ups measured (each on a fresh copy of the data directory); the last one is loaded.
    #[arg(long, default_value_t = 5)]
    pub starts: usize,
    /// The Accept-Encoding the participants send (Chromium's by default; "identity" for none).
    #[arg(long, default_value = "gzip, deflate, br, zstd")]
    pub accept_encoding: String,
    /// Extra environment for the server, KEY=VALUE (diagnosis, e.g. MALLOC_MMAP_THRESHOLD_=131072).
    #[arg(long, value_parser = parse_kv)]
    pub serve_env: Vec<(String, String)>,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

/// One request of the page load: method, path under `/userNNN/`, body, the
/// statuses ComfyUI gives (PROTOCOL.md §8).
struct Call {
    method: &'static str,
    path: String,
    body: Option<&'static str>,
    ok: &'static [u16],
}

fn call(method: &'static str, path: &str, body: Option<&'static str>, ok: &'static [u16]) -> Call {
    Call {
        method,
        path: path.to_string(),
        body,
        ok,
    }
}

/// The page-load API calls in the order the frontend makes them
/// (traces/frontend_load_requests.txt), split at the WebSocket upgrade.
fn api_calls() -> (Vec<Call>, Vec<Call>) {
    const OK: &[u16] = &[200];
    const MISSING: &[u16] = &[404];
    let before_ws = vec![
        call("GET", "api/system_stats", None, OK),
        call("GET", "api/users", None, OK),
        call("GET", "api/i18n", None, OK),
        call("GET", "api/settings", None, OK),
        call(
            "POST",
            "api/settings/Comfy.InstalledVersion",
            Some("\"1.37.11\""),
            OK,
        ),
        call(
            "GET",
            "api/userdata?dir=workflows&recurse=true&split=false&full_info=true",
            None,
            OK,
        ),
        call(
            "GET",
            "api/userdata?dir=subgraphs&recurse=true&split=false&full_info=true",
            None,
            &[200, 404],
        ),
        call("GET", "api/extensions", None, OK),
        call("GET", "api/global_subgraphs", None, OK),
        call("GET", "api/userdata/comfy.templates.json", None, MISSING),
    ];
    let after_ws = vec![
        call("GET", "api/object_info", None, OK),
        call(
            "POST",
            "api/settings/Comfy.TutorialCompleted",
            Some("true"),
            OK,
        ),
        call("GET", "api/queue", None, OK),
        call("GET", "api/history?max_items=64", None, OK),
        call("GET", "api/workflow_templates", None, OK),
        call("GET", "api/workflow_templates", None, OK),
        call("GET", "templates/fuse_options.json", None, &[200, 404]),
        call("GET", "templates/index.json", None, OK),
        call("GET", "templates/index.json", None, OK),
        call("GET", "api/experiment/models", None, OK),
    ];
    (before_ws, after_ws)
}

/// `href="…"` and `src="…"` targets of index.html, relative to the page.
pub(crate) fn referenced_assets(html: &str) -> Vec<String> {
    let mut out = Vec::new();
    for attr in ["href=\"", "src=\""] {
        let mut rest = html;
        while let Some(i) = rest.find(attr) {
            rest = &rest[i + attr.len()..];
            let Some(end) = rest.find('"') else { break };
            let target = rest[..end].trim_start_matches("./");
            if !target.is_empty() && !target.contains("://") && !target.starts_with('/') {
                out.push(target.to_string());
            }
            rest = &rest[end..];
        }
    }
    out
}

struct PageLoad {
    requests: usize,
    bytes: u64,
    unexpected: Vec<String>,
    elapsed: Duration,
    ws: Ws,
}

struct Participant<'a> {
    client: &'a reqwest::Client,
    base: &'a str,
    user: &'a str,
    pw: &'a str,
    cookie: Option<String>,
    accept_encoding: &'a str,
}

impl Participant<'_> {
    /// One request as the browser sends it (Basic Auth, plus the session cookie once it has one).
    async fn send(&self, c: &Call) -> Result<(u16, u64)> {
        let url = format!("{}/{}/{}", self.base, self.user, c.path);
        let mut rb = match c.method {
            "POST" => self.client.post(url),
            _ => self.client.get(url),
        }
        .basic_auth(self.user, Some(self.pw))
        .header("accept-encoding", self.accept_encoding);
        if let Some(cookie) = &self.cookie {
            rb = rb.header("cookie", cookie);
        }
        if let Some(b) = c.body {
            rb = rb
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        let r = rb.send().await?;
        let status = r.status().as_u16();
        let bytes = r.bytes().await?.len() as u64;
        Ok((status, bytes))
    }

    async fn load(&mut self, extensions: &[String]) -> Result<PageLoad> {
        let started = Instant::now();
        let mut tally = Tally::default();
        // index.html; with Basic Auth the server also hands out the session cookie.
        let index = call("GET", "", None, &[200]);
        let r = self
            .client
            .get(format!("{}/{}/", self.base, self.user))
            .basic_auth(self.user, Some(self.pw))
            .header("accept", "text/html,application/xhtml+xml")
            .header("accept-encoding", "identity")
            .send()
            .await?;
        let status = r.status().as_u16();
        self.cookie = r
            .headers()
            .get_all("set-cookie")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find(|c| c.starts_with("comfyume_session="))
            .map(|c| c.split(';').next().unwrap_or("").to_string());
        let html = r.text().await?;
        tally.note(&index, status, html.len() as u64);
        // The static files index.html references, six at a time as a browser fetches them.
        let assets: Vec<Call> = referenced_assets(&html)
            .into_iter()
            .map(|p| {
                let ok: &'static [u16] = if p == "user.css" || p == "api/userdata/user.css" {
                    &[200, 404]
                } else {
                    &[200]
                };
                call("GET", &p, None, ok)
            })
            .collect();
        self.fetch_all(&assets, &mut tally).await?;
        let (before_ws, after_ws) = api_calls();
        for c in &before_ws {
            let (s, n) = self.send(c).await?;
            tally.note(c, s, n);
        }
        // The frontend imports every extension script /api/extensions lists.
        let ext_calls: Vec<Call> = extensions
            .iter()
            .map(|e| call("GET", e.trim_start_matches('/'), None, &[200]))
            .collect();
        self.fetch_all(&ext_calls, &mut tally).await?;
        // The socket authenticates with the cookie (browsers do not resend Basic credentials there).
        let ws_url = format!(
            "ws://{}/{}/ws?clientId=bench-{}",
            self.base.trim_start_matches("http://"),
            self.user,
            self.user
        );
        let mut headers = Vec::new();
        if let Some(c) = &self.cookie {
            headers.push(("cookie", c.clone()));
        }
        let mut ws = common::ws_connect(&ws_url, &headers).await?;
        let hello = common::next_json(
            &mut ws,
            tokio::time::Instant::now() + Duration::from_secs(10),
        )
        .await?;
        if hello["type"] != "status" {
            bail!("first WebSocket message of {} was {hello}", self.user);
        }
        tally.requests += 1;
        for c in &after_ws {
            let (s, n) = self.send(c).await?;
            tally.note(c, s, n);
        }
        Ok(PageLoad {
            requests: tally.requests,
            bytes: tally.bytes,
            unexpected: tally.unexpected,
            elapsed: started.elapsed(),
            ws,
        })
    }

    /// Static files, six at a time (a browser's connections per host).
    async fn fetch_all(&self, calls: &[Call], tally: &mut Tally) -> Result<()> {
        let results: Vec<_> = futures_util::stream::iter(calls.iter())
            .map(|c| async move { (c, self.send(c).await) })
            .buffer_unordered(6)
            .collect()
            .await;
        for (c, r) in results {
            let (s, n) = r?;
            tally.note(c, s, n);
        }
        Ok(())
    }
}

#[derive(Default)]
struct Tally {
    requests: usize,
    bytes: u64,
    unexpected: Vec<String>,
}

impl Tally {
    fn note(&mut self, c: &Call, status: u16, n: u64) {
        self.requests += 1;
        self.bytes += n;
        if !c.ok.contains(&status) {
            self.unexpected
                .push(format!("{} /{}: {status}", c.method, c.path));
        }
    }
}

/// Polls an authenticated `GET /api/system_stats` every 5 ms until it answers 200.
async fn first_ok(
    client: &reqwest::Client,
    serve: &Serve,
    user: &str,
    pw: &str,
) -> Result<Duration> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        common::check_deadline(deadline, "waiting for the first 200")?;
        let r = client
            .get(format!("{}/api/system_stats", serve.base))
            .basic_auth(user, Some(pw))
            .send()
            .await;
        if let Ok(r) = r
            && r.status() == 200
        {
            return Ok(serve.spawned_at.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let target = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &target)?;
        } else {
            std::fs::copy(e.path(), target)?;
        }
    }
    Ok(())
}

pub async fn run(args: Args) -> Result<()> {
    let bin = common::absolute(&args.bin)?;
    let frontend = common::absolute(&args.frontend)
        .context("install it with scripts/install-frontend.sh target/test-data")?;
    let client = common::http_client()?;
    let tmp = tempfile::tempdir()?;
    let template = tmp.path().join("template").join("data");
    let users = common::create_workshop(&bin, &template, args.participants).await?;
    let (u1, p1) = users[0].clone();
    let mut env = vec![("INFERENCE_MODE", "simulator".to_string())];
    env.extend(args.serve_env.iter().map(|(k, v)| (k.as_str(), v.clone())));

    // Start-up, several times (fresh copy of the data directory each time).
    let mut listen_ms = Vec::new();
    let mut ready_ms = Vec::new();
    let mut serve = None;
    for i in 0..args.starts.max(1) {
        if let Some(s) = serve.take() {
            Serve::stop(s).await;
        }
        let data = tmp.path().join(format!("run{i}")).join("data");
        copy_dir(&template, &data)?;
        let s = Serve::start(&bin, &data, &frontend, &env).await?;
        let ready = first_ok(&client, &s, &u1, &p1).await?;
        listen_ms.push(s.listening_after.as_secs_f64() * 1000.0);
        ready_ms.push(ready.as_secs_f64() * 1000.0);
        serve = Some(s);
    }
    let serve = serve.context("no server started")?;

    // Idle: started, one authenticated request answered, nobody connected.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = serve.mem()?;

    // The extension scripts the frontend imports (the same list for everyone).
    let extensions: Vec<String> = client
        .get(format!("{}/api/extensions", serve.base))
        .basic_auth(&u1, Some(&p1))
        .send()
        .await?
        .json()
        .await?;

    // Every participant loads the page at once, then keeps the WebSocket open.
    let started = Instant::now();
    let loads: Vec<Result<PageLoad>> =
        futures_util::future::join_all(users.iter().map(|(u, p)| {
            let client = client.clone();
            let base = serve.base.clone();
            let extensions = &extensions;
            let accept_encoding = args.accept_encoding.as_str();
            async move {
                let mut who = Participant {
                    client: &client,
                    base: &base,
                    user: u,
                    pw: p,
                    cookie: None,
                    accept_encoding,
                };
                who.load(extensions)
                    .await
                    .with_context(|| format!("page load of {u}"))
            }
        }))
        .await;
    let all_loaded = started.elapsed();
    let mut times = Vec::new();
    let mut sockets = Vec::new();
    let (mut requests, mut bytes) = (0, 0);
    let mut unexpected = Vec::new();
    for l in loads {
        let l = l?;
        times.push(l.elapsed);
        requests = l.requests;
        bytes = l.bytes;
        unexpected.extend(l.unexpected);
        sockets.push(l.ws);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let loaded = serve.mem()?;
    // The sockets are still open: the server answers a ping on each.
    for ws in &mut sockets {
        use futures_util::SinkExt;
        ws.send(tokio_tungstenite::tungstenite::Message::Ping(
            b"bench".to_vec().into(),
        ))
        .await?;
    }
    let open = sockets.len();
    let page = common::summarize(&times);
    let log = serve.log.clone();
    Serve::stop(serve).await;
    drop(sockets);

    let listen = common::median(&mut listen_ms.clone());
    let ready = common::median(&mut ready_ms.clone());
    let n = args.participants;
    common::print_machine();
    println!(
        "binary: {} (INFERENCE_MODE=simulator{}), frontend {}, {n} participants, Accept-Encoding: {}; server log {}",
        bin.display(),
        args.serve_env
            .iter()
            .map(|(k, v)| format!(", {k}={v}"))
            .collect::<String>(),
        frontend.display(),
        args.accept_encoding,
        log.display()
    );
    let predecessor_gib = n as f64 * 1.04;
    let rows = vec![
        vec![
            "start: spawn -> listening (median)".into(),
            format!("{listen:.1} ms"),
            format!("runs: {}", fmt_list(&listen_ms)),
            String::new(),
        ],
        vec![
            "start: spawn -> first authenticated 200 (median)".into(),
            format!("{ready:.1} ms"),
            format!("runs: {}", fmt_list(&ready_ms)),
            "< 1000 ms".into(),
        ],
        vec![
            "RSS idle (started, no participant)".into(),
            format!("{:.1} MiB", idle.rss_mib()),
            format!("peak so far {:.1} MiB", idle.hwm_mib()),
            String::new(),
        ],
        vec![
            format!("RSS, {n} page loads done, {open} WebSockets open"),
            format!("{:.1} MiB", loaded.rss_mib()),
            format!("{:.2} x idle", loaded.rss_kib as f64 / idle.rss_kib as f64),
            "< 100 MB".into(),
        ],
        vec![
            "peak RSS (VmHWM) over the whole run".into(),
            format!("{:.1} MiB", loaded.hwm_mib()),
            format!("predecessor: {n} x 1.04 GiB = {predecessor_gib:.1} GiB (stated)"),
            "< 100 MB".into(),
        ],
        vec![
            format!("page load per participant ({n} at once)"),
            format!("p50 {:.0} ms", page.p50_us / 1000.0),
            format!(
                "max {:.0} ms; all {n} done in {:.0} ms",
                page.max_us / 1000.0,
                all_loaded.as_secs_f64() * 1000.0
            ),
            String::new(),
        ],
        vec![
            "requests per page load (+1 WebSocket)".into(),
            format!("{requests}"),
            format!(
                "{:.1} MiB transferred each (as sent)",
                bytes as f64 / 1048576.0
            ),
            String::new(),
        ],
        vec![
            "unexpected statuses".into(),
            format!("{}", unexpected.len()),
            unexpected.first().cloned().unwrap_or_default(),
            "0".into(),
        ],
    ];
    common::print_table("ui-load", &["figure", "value", "comparison", "goal"], &rows);
    let summary = json!({
        "bench": "ui-load",
        "machine": common::machine(),
        "participants": n,
        "accept_encoding": args.accept_encoding,
        "serve_env": args.serve_env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
        "start_listening_ms": round1(listen),
        "start_first_auth_200_ms": round1(ready),
        "start_runs_ms": ready_ms.iter().map(|v| round1(*v)).collect::<Vec<_>>(),
        "rss_idle_mib": round1(idle.rss_mib()),
        "rss_loaded_mib": round1(loaded.rss_mib()),
        "rss_ratio_loaded_idle": (loaded.rss_kib as f64 / idle.rss_kib as f64 * 100.0).round() / 100.0,
        "vmhwm_mib": round1(loaded.hwm_mib()),
        "websockets_open": open,
        "requests_per_load": requests,
        "page_load": page.json_ms(),
        "unexpected_statuses": unexpected.len(),
        "predecessor_gib": predecessor_gib,
        "goal": {"rss_mb": 100, "start_ms": 1000},
    });
    println!("{summary}");
    Ok(())
}

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

fn fmt_list(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:.0}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_assets_of_index_html() {
        let html = r#"<link rel="stylesheet" href="user.css"><link href="api/userdata/user.css"><script type="module" src="./assets/index-B.js"></script><link rel="modulepreload" href="./assets/vendor-v.js"><a href="https://x.example/">"#;
        assert_eq!(
            referenced_assets(html),
            vec![
                "user.css",
                "api/userdata/user.css",
                "assets/vendor-v.js",
                "assets/index-B.js"
            ]
        );
    }
}
