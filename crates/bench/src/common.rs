//! What the benchmarks share: latency statistics, the printed table and JSON
//! line, the real `comfyume` binary as a child process, HTTP and WebSocket
//! clients, a process's memory, and the workflows the simulator runs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

// ---- statistics -----------------------------------------------------------------------------

/// Latency percentiles in microseconds (nearest rank).
#[derive(Debug, Clone, Copy, Default)]
pub struct Summary {
    pub n: usize,
    pub min_us: f64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

pub fn summarize(samples: &[Duration]) -> Summary {
    if samples.is_empty() {
        return Summary::default();
    }
    let mut us: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e6).collect();
    us.sort_by(f64::total_cmp);
    let rank = |p: f64| {
        let i = ((p / 100.0) * us.len() as f64).ceil() as usize;
        us[i.clamp(1, us.len()) - 1]
    };
    Summary {
        n: us.len(),
        min_us: us[0],
        mean_us: us.iter().sum::<f64>() / us.len() as f64,
        p50_us: rank(50.0),
        p90_us: rank(90.0),
        p99_us: rank(99.0),
        max_us: us[us.len() - 1],
    }
}

impl Summary {
    pub fn json_ms(&self) -> Value {
        let r = |us: f64| us.round() / 1000.0;
        json!({
            "n": self.n, "min_ms": r(self.min_us), "mean_ms": r(self.mean_us), "p50_ms": r(self.p50_us),
            "p90_ms": r(self.p90_us), "p99_ms": r(self.p99_us), "max_ms": r(self.max_us),
        })
    }

    /// `p50 / p90 / p99 / max` in ms.
    pub fn brief(&self) -> String {
        format!(
            "{} / {} / {} / {} ms",
            ms(self.p50_us),
            ms(self.p90_us),
            ms(self.p99_us),
            ms(self.max_us)
        )
    }
}

/// Microseconds as milliseconds with three significant decimals.
pub fn ms(us: f64) -> String {
    format!("{:.3}", us / 1000.0)
}

pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return 0.0;
    }
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

// ---- output ---------------------------------------------------------------------------------

pub fn print_table(title: &str, header: &[&str], rows: &[Vec<String>]) {
    debug_assert!(rows.iter().all(|r| r.len() == header.len()));
    println!("\n{title}");
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < width.len() {
                width[i] = width[i].max(c.len());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = width.get(i).copied().unwrap_or(0)))
            .collect();
        println!("| {} |", parts.join(" | "));
    };
    line(header.to_vec());
    println!(
        "|{}|",
        width
            .iter()
            .map(|w| "-".repeat(w + 2))
            .collect::<Vec<_>>()
            .join("|")
    );
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

/// The machine line every benchmark prints (figures are only comparable on the same machine).
pub fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0);
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    json!({"cores": cores, "cpu": cpu, "mem_gib": (mem_kib as f64 / 1048576.0 * 10.0).round() / 10.0})
}

pub fn print_machine() {
    let m = machine();
    println!(
        "machine: {} cores ({}), {} GiB RAM",
        m["cores"],
        m["cpu"].as_str().unwrap_or(""),
        m["mem_gib"]
    );
}

// ---- the comfyume binary ----------------------------------------------------------------------

/// The variables a child sees: nothing from the caller's environment beyond
/// PATH/HOME/TMPDIR, so a stray `INFERENCE_MODE` or `.env` cannot change a figure.
fn base_env(cmd: &mut tokio::process::Command) {
    cmd.env_clear();
    // RUST_LOG too: a bench's server can be asked for its debug log.
    for k in ["PATH", "HOME", "TMPDIR", "RUST_LOG"] {
        if let Ok(v) = std::env::var(k) {
            cmd.env(k, v);
        }
    }
}

pub fn absolute(p: &Path) -> Result<PathBuf> {
    std::fs::canonicalize(p).with_context(|| format!("{} not found", p.display()))
}

/// Runs `comfyume --data-dir DATA ARGS…` to completion; its stdout.
pub async fn run_cli(bin: &Path, data_dir: &Path, args: &[&str]) -> Result<String> {
    let mut cmd = tokio::process::Command::new(bin);
    base_env(&mut cmd);
    cmd.arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .current_dir(data_dir.parent().unwrap_or(data_dir))
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = cmd
        .output()
        .await
        .with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "comfyume {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `comfyume users create-workshop --count N`: the (name, password) pairs from its CSV.
pub async fn create_workshop(
    bin: &Path,
    data_dir: &Path,
    count: usize,
) -> Result<Vec<(String, String)>> {
    std::fs::create_dir_all(data_dir)?;
    let csv = data_dir.parent().unwrap_or(data_dir).join("sheet.csv");
    let n = count.to_string();
    let csv_arg = csv.to_string_lossy().into_owned();
    run_cli(
        bin,
        data_dir,
        &["users", "create-workshop", "--count", &n, "--csv", &csv_arg],
    )
    .await?;
    let text = std::fs::read_to_string(&csv)?;
    let users: Vec<(String, String)> = text
        .lines()
        .skip(1)
        .filter_map(|l| {
            let mut f = l.split(',');
            Some((f.next()?.to_string(), f.next()?.to_string()))
        })
        .collect();
    if users.len() != count {
        bail!(
            "create-workshop made {} accounts, wanted {count}",
            users.len()
        );
    }
    Ok(users)
}

/// A running `comfyume serve`. Killed (by its own pid) when dropped.
pub struct Serve {
    child: tokio::process::Child,
    pub pid: u32,
    pub addr: SocketAddr,
    pub base: String,
    /// From spawn to the "listening on" line (the listener is bound).
    pub listening_after: Duration,
    pub spawned_at: Instant,
    pub log: PathBuf,
    /// `http://ADDR/metrics`, when metrics are on.
    pub metrics: Option<String>,
}

impl Serve {
    /// `comfyume serve` on 127.0.0.1:0 (and metrics on 127.0.0.1:0) with only `env` set.
    pub async fn start(
        bin: &Path,
        data_dir: &Path,
        frontend: &Path,
        env: &[(&str, String)],
    ) -> Result<Serve> {
        Serve::start_on(bin, data_dir, frontend, env, "127.0.0.1:0").await
    }

    /// `comfyume serve` listening on `listen` (a fixed port: a restart where the
    /// clients already are).
    pub async fn start_on(
        bin: &Path,
        data_dir: &Path,
        frontend: &Path,
        env: &[(&str, String)],
        listen: &str,
    ) -> Result<Serve> {
        let workdir = data_dir.parent().unwrap_or(data_dir).to_path_buf();
        let log = workdir.join(format!(
            "serve-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        let mut cmd = tokio::process::Command::new(bin);
        base_env(&mut cmd);
        cmd.arg("--data-dir")
            .arg(data_dir)
            .arg("serve")
            .args(["--listen", listen, "--metrics-listen", "127.0.0.1:0"])
            .arg("--frontend-dir")
            .arg(frontend)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            // No `.env` there.
            .current_dir(&workdir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true);
        let spawned_at = Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let pid = child.id().ok_or_else(|| anyhow!("no pid"))?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let mut lines = BufReader::new(stdout).lines();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut metrics = None;
        let addr = loop {
            match tokio::time::timeout_at(deadline, lines.next_line()).await {
                Err(_) => bail!("serve did not listen within 60 s; see {}", log.display()),
                Ok(Ok(Some(l))) => {
                    if let Some(m) = l.strip_prefix("metrics on ") {
                        metrics = Some(m.trim().to_string());
                    }
                    if let Some(a) = l.strip_prefix("listening on http://") {
                        break a.trim().parse::<SocketAddr>()?;
                    }
                }
                Ok(_) => bail!(
                    "serve exited before listening: {}",
                    tail(&log, 20).unwrap_or_default()
                ),
            }
        };
        let listening_after = spawned_at.elapsed();
        // Keep the pipe drained so a chatty child never blocks on stdout.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Serve {
            child,
            pid,
            addr,
            base: format!("http://{addr}"),
            listening_after,
            spawned_at,
            log,
            metrics,
        })
    }

    pub fn mem(&self) -> Result<Mem> {
        mem_of(self.pid)
    }

    /// Kills the child and waits for it.
    pub async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

fn tail(path: &Path, n: usize) -> Option<String> {
    let s = std::fs::read_to_string(path).ok()?;
    let lines: Vec<&str> = s.lines().collect();
    Some(lines[lines.len().saturating_sub(n)..].join("\n"))
}

/// Resident memory of a process, from /proc/PID/status.
#[derive(Debug, Clone, Copy)]
pub struct Mem {
    /// VmRSS: resident now.
    pub rss_kib: u64,
    /// VmHWM: the peak resident size so far.
    pub hwm_kib: u64,
}

impl Mem {
    pub fn rss_mib(&self) -> f64 {
        self.rss_kib as f64 / 1024.0
    }
    pub fn hwm_mib(&self) -> f64 {
        self.hwm_kib as f64 / 1024.0
    }
}

pub fn mem_of(pid: u32) -> Result<Mem> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("{name} missing in /proc/{pid}/status"))
    };
    Ok(Mem {
        rss_kib: field("VmRSS:")?,
        hwm_kib: field("VmHWM:")?,
    })
}

/// CPU time (user + system) a process has used, in ms, from /proc/PID/stat
/// (clock ticks of 10 ms, the USER_HZ of Linux on x86_64).
pub fn cpu_ms(pid: u32) -> Result<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after "pid (comm) ": state is the first; utime and stime are the 12th and 13th.
    let rest = s
        .rsplit_once(") ")
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("unreadable /proc/{pid}/stat"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64> {
        f.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .ok_or_else(|| anyhow!("/proc/{pid}/stat has no field {i}"))
    };
    Ok((ticks(11)? + ticks(12)?) * 10.0)
}

// ---- clients --------------------------------------------------------------------------------

/// One HTTP client per benchmark: keep-alive (as browsers), no redirects followed.
pub fn http_client() -> Result<reqwest::Client> {
    // reqwest is built without a bundled TLS provider; loopback HTTP still wants one installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    Ok(reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(512)
        .build()?)
}

/// Signs in through the login form, as a browser does; the `name=value` session cookie.
pub async fn login(client: &reqwest::Client, base: &str, user: &str, pw: &str) -> Result<String> {
    let r = client
        .post(format!("{base}/login"))
        .form(&[("username", user), ("password", pw), ("next", "")])
        .send()
        .await?;
    r.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|c| c.starts_with("comfyume_session=") && !c.starts_with("comfyume_session=;"))
        .map(|c| c.split(';').next().unwrap_or("").to_string())
        .ok_or_else(|| anyhow!("login of {user} gave no session cookie ({})", r.status()))
}

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub async fn ws_connect(url: &str, headers: &[(&str, String)]) -> Result<Ws> {
    let mut req = url.into_client_request()?;
    for (k, v) in headers {
        req.headers_mut().insert(
            reqwest::header::HeaderName::from_bytes(k.as_bytes())?,
            v.parse()?,
        );
    }
    let (ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .with_context(|| format!("WebSocket {url}"))?;
    Ok(ws)
}

/// The next text message as JSON (binary frames skipped), before `deadline`.
pub async fn next_json(ws: &mut Ws, deadline: tokio::time::Instant) -> Result<Value> {
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => bail!("no WebSocket message in time"),
            Ok(None) => bail!("WebSocket closed"),
            Ok(Some(Err(e))) => bail!("WebSocket error: {e}"),
            Ok(Some(Ok(Message::Text(t)))) => return Ok(serde_json::from_str(t.as_str())?),
            Ok(Some(Ok(_))) => {}
        }
    }
}

/// Reads until `executing` with `node: null` for `prompt_id` (ComfyUI's end of a job).
pub async fn until_done(ws: &mut Ws, prompt_id: &str, within: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let v = next_json(ws, deadline)
            .await
            .with_context(|| format!("waiting for the end of {prompt_id}"))?;
        if v["type"] == "executing"
            && v["data"]["node"].is_null()
            && v["data"]["prompt_id"] == prompt_id
        {
            return Ok(());
        }
        if v["type"] == "execution_error" && v["data"]["prompt_id"] == prompt_id {
            bail!("job {prompt_id} failed: {}", v["data"]["exception_message"]);
        }
    }
}

// ---- the simulator and its workflows ------------------------------------------------------------

pub async fn spawn_sim(step_ms: u64) -> Result<comfyume_sim::SimHandle> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let cfg = comfyume_sim::SimConfig {
        step_ms,
        ..Default::default()
    };
    Ok(comfyume_sim::try_spawn(cfg, listener).await?)
}

/// The smallest job the simulator runs: an 8×8 image saved. `color` makes each
/// one distinct (the classic cache would otherwise answer a repeat at once).
pub fn tiny_prompt(color: u64) -> Value {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": color % 16_777_216}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "bench"}}
    })
}

/// The captured no-model workflow (tests/fixtures/comfyui/workflows/nomodel.json: a 64×64
/// image, inverted, saved) with its colour varied.
pub fn nomodel_prompt(color: u64) -> Value {
    static NOMODEL: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    let mut p = NOMODEL
        .get_or_init(|| {
            serde_json::from_str(include_str!(
                "../../../tests/fixtures/comfyui/workflows/nomodel.json"
            ))
            .expect("the captured workflow is JSON")
        })
        .clone();
    p["1"]["inputs"]["color"] = json!(color % 16_777_216);
    p
}

/// A Flux.2 text-to-image graph of the workshop template kind: `steps` sampler
/// steps (each `step_ms` on the simulator, with progress and a preview frame).
pub fn flux_prompt(steps: u32, seed: u64, size: u32) -> Value {
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

/// Stores the simulator's node definitions in a data directory with
/// `comfyume object-info import` (for a server that has no backend to ask).
pub async fn import_sim_object_info(
    client: &reqwest::Client,
    bin: &Path,
    data_dir: &Path,
) -> Result<usize> {
    let sim = spawn_sim(0).await?;
    let info: Value = client
        .get(format!("{}/object_info", sim.url()))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    sim.shutdown().await;
    let n = info.as_object().map(|m| m.len()).unwrap_or(0);
    let file = data_dir
        .parent()
        .unwrap_or(data_dir)
        .join("sim_object_info.json");
    std::fs::write(&file, info.to_string())?;
    run_cli(
        bin,
        data_dir,
        &["object-info", "import", &file.to_string_lossy()],
    )
    .await?;
    Ok(n)
}

/// A run's wall-clock guard: every loop of a benchmark stops by itself.
pub fn check_deadline(deadline: Instant, what: &str) -> Result<()> {
    if Instant::now() > deadline {
        bail!("{what}: gave up (time limit)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        let s = summarize(&v);
        assert_eq!(s.p50_us, 50.0);
        assert_eq!(s.p90_us, 90.0);
        assert_eq!(s.p99_us, 99.0);
        assert_eq!(s.max_us, 100.0);
        assert_eq!(s.min_us, 1.0);
        let one = summarize(&[Duration::from_micros(7)]);
        assert_eq!((one.p50_us, one.p99_us), (7.0, 7.0));
    }

    #[test]
    fn median_of_even_and_odd() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn own_cpu_time_grows() {
        let before = cpu_ms(std::process::id()).unwrap();
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(60) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(cpu_ms(std::process::id()).unwrap() > before);
    }

    #[test]
    fn own_memory_is_readable() {
        let m = mem_of(std::process::id()).unwrap();
        assert!(m.rss_kib > 0 && m.hwm_kib >= m.rss_kib);
    }
}
